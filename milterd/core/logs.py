"""Logging: the two line formats and the connection id every session's line carries.

Named ``logs``, not ``logging``, so that no relative import can shadow the standard library.

The connection id.  The milter adapter sets :data:`connection_id` around each libmilter callback
(see :mod:`milterd.inbound.milter_adapter`); every record created while it is set — the adapter's
own lines, the dispatcher's plugin-error lines, anything a plugin logs — gets a ``conn``
attribute, which both formats print (text: ``conn=c12`` after the logger name; JSON: a ``conn``
key).  The attribute is added where the record is *made* (a record factory), not by a handler
filter: a handler may run in another thread (a ``QueueListener``), where the session's context
is not set.  Records made outside a session have ``conn = None`` and print no connection.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any, Callable

#: The id of the MTA connection whose callback the current thread is running ("c12"), or None.
connection_id: ContextVar[str | None] = ContextVar("milterd_connection_id", default=None)

_installed: list[Callable[..., logging.LogRecord]] = []


def install_connection_ids() -> None:
    """Make every new log record carry ``conn`` (the current :data:`connection_id`).  Idempotent."""
    if _installed:
        return
    previous = logging.getLogRecordFactory()
    get = connection_id.get

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.conn = get()
        return record

    _installed.append(previous)
    logging.setLogRecordFactory(factory)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts level logger msg``, ``conn`` inside a session, then the
    record's structured ``fields`` (the message log's), ``exc`` for a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        conn = getattr(record, "conn", None)
        if conn is not None:
            entry["conn"] = conn
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """Plain lines: ``time level logger: [conn=cN ]message``; structured ``fields`` (if any)
    follow as ``key=value``, strings repr-quoted so a peer-chosen value (a certificate name with
    CR/LF) cannot start a forged log line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # strftime once per second, not once per line (a line per message is the hot path)
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime("%Y-%m-%d %H:%M:%S",
                                                           self.converter(record.created)))
        return f"{cached[1]},{int(record.msecs):03d}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        conn = getattr(record, "conn", None)
        fields = getattr(record, "fields", None)
        if conn is not None and not (isinstance(fields, dict) and "conn" in fields):
            record.message = f"conn={conn} {record.message}"
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            text += " " + " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                                   for k, v in fields.items() if v is not None)
        return text


def setup_logging(config: Any, log_format: str | None = None) -> None:
    """stderr (the journal under systemd), in ``log_format`` or ``[log] format``, at
    ``[log] level``; every record made from now on carries its connection id."""
    # Neither formatter prints thread or process fields: don't compute them for every record.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    install_connection_ids()
    handler = logging.StreamHandler(sys.stderr)
    if (log_format or config.log.format) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log.level.upper())


def set_level(config: Any) -> None:
    """Apply ``[log] level`` (at reload)."""
    logging.getLogger().setLevel(config.log.level.upper())
