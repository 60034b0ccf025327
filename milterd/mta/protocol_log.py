"""Verbose per-session SMTP protocol log, in the spirit of Exchange's.

Why: Domain Security is debugged by reading what each side said and which
certificates were exchanged (Exchange's "Verbose" protocol logging, see the
How-to-Configure-Mutual-TLS example). One CSV line per event, with the
Exchange field list::

    date-time,connector-id,session-id,sequence-number,local-endpoint,remote-endpoint,event,data,context

Events: ``+`` connect, ``-`` disconnect, ``<`` received, ``>`` sent,
``*`` information (certificates, TLS parameters, queue ids). Direction is
from this MTA's point of view for both receive and send sessions.

Never logged: message bodies (DATA content is not passed here at all) and
AUTH secrets (:func:`redact_command` keeps only the mechanism).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
import threading
from pathlib import Path
from typing import Optional, TextIO

from .tls import CertFacts, TlsHandshakeFacts

FIELDS = ("date-time", "connector-id", "session-id", "sequence-number", "local-endpoint",
          "remote-endpoint", "event", "data", "context")

_session_counter = itertools.count(1)


def redact_command(line: str) -> str:
    """AUTH arguments (and any SASL continuation) are replaced by ``****``."""
    verb, _, rest = line.partition(" ")
    if verb.upper() == "AUTH":
        mech = rest.split(" ", 1)[0]
        return "AUTH %s ****" % mech if mech else "AUTH"
    return line


class ProtocolLog:
    """Thread-safe appender shared by all sessions (receive and send).

    ``path=None`` keeps the log in memory only (tests read :attr:`lines`).
    """

    def __init__(self, path: Optional[Path]) -> None:
        self._lock = threading.Lock()
        self._fh: Optional[TextIO] = None
        self.lines: list[str] = []
        self._keep_in_memory = path is None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not path.exists() or path.stat().st_size == 0
            self._fh = open(path, "a", encoding="utf-8", newline="")
            if new:
                self._fh.write("#Software: milterd reference MTA\r\n#Fields: %s\r\n"
                               % ",".join(FIELDS))
                self._fh.flush()

    def session(self, connector: str, local: str, remote: str) -> "SessionLog":
        return SessionLog(self, connector, "%016X" % next(_session_counter), local, remote)

    def write(self, row: tuple[str, ...]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\r\n").writerow(row)
        line = buf.getvalue()
        with self._lock:
            if self._keep_in_memory:
                self.lines.append(line.rstrip("\r\n"))
            if self._fh is not None:
                self._fh.write(line)
                self._fh.flush()

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class SessionLog:
    """The log of one SMTP session; sequence numbers are per session."""

    def __init__(self, log: ProtocolLog, connector: str, session_id: str, local: str,
                 remote: str) -> None:
        self._log = log
        self.connector = connector
        self.session_id = session_id
        self.local = local
        self.remote = remote
        self._seq = itertools.count(0)

    def _emit(self, event: str, data: str, context: str = "") -> None:
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        self._log.write((now.replace("+00:00", "Z"), self.connector, self.session_id,
                         str(next(self._seq)), self.local, self.remote, event, data, context))

    def connect(self) -> None:
        self._emit("+", "", "")

    def disconnect(self, context: str = "") -> None:
        self._emit("-", "", context)

    def received(self, line: str) -> None:
        self._emit("<", redact_command(line))

    def sent(self, line: str) -> None:
        self._emit(">", line)

    def info(self, data: str, context: str = "") -> None:
        self._emit("*", data, context)

    def certificate(self, what: str, cert: CertFacts) -> None:
        """``what`` is "Sending certificate" or "Received certificate"."""
        self.info("", what)
        self.info(cert.subject_exchange, "Certificate subject")
        self.info(cert.issuer_exchange, "Certificate issuer name")
        self.info(cert.serial, "Certificate serial number")
        self.info(cert.sha1, "Certificate thumbprint")
        self.info(cert.sha256, "Certificate SHA-256 fingerprint")
        self.info(";".join(cert.dns_names), "Certificate alternate names")

    def tls(self, facts: TlsHandshakeFacts) -> None:
        if facts.local_cert is not None:
            self.certificate("Sending certificate", facts.local_cert)
        if facts.peer_cert is not None:
            self.certificate("Received certificate", facts.peer_cert)
            self.info("verify=%s" % ("OK" if facts.verified else "FAIL"),
                      facts.verify_reason)
        else:
            self.info("verify=NO", "no peer certificate")
        self.info("%s %s %d" % (facts.version, facts.cipher, facts.bits), "TLS negotiated")
