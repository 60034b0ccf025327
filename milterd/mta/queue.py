"""Durable on-disk mail queue.

Why this shape: a 250 reply to DATA is a promise. The message file is written
to a temporary name, fsynced, renamed into ``active/`` and the directory is
fsynced — all before the 250 goes out — so a ``kill -9`` (or power loss)
right after the reply cannot lose it. One file per message: a JSON metadata
line, then the raw message. Updates (remaining recipients, attempt count,
next retry) rewrite the file the same atomic way. Messages that exhaust their
attempts move to ``failed/`` (kept for inspection; no bounces are generated).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Optional


def new_queue_id() -> str:
    """Sortable by time, unique enough for one host (like Postfix long queue ids)."""
    return "%011X%s" % (time.time_ns() // 1000, secrets.token_hex(3).upper())


@dataclass(frozen=True)
class QueuedMessage:
    queue_id: str
    mail_from: str
    recipients: tuple[str, ...]
    created: float
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MailQueue:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.active = root / "active"
        self.failed = root / "failed"
        self.tmp = root / "tmp"
        for d in (self.active, self.failed, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def _write(self, meta: QueuedMessage, content: bytes, directory: Path) -> None:
        tmp = self.tmp / ("%s.%s" % (meta.queue_id, secrets.token_hex(4)))
        line = json.dumps(asdict(meta), separators=(",", ":")).encode("utf-8") + b"\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(line + content)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / meta.queue_id)
        _fsync_dir(directory)

    def enqueue(self, queue_id: str, mail_from: str, recipients: tuple[str, ...],
                content: bytes) -> QueuedMessage:
        """Durably store a message; returns only after it is on stable storage."""
        meta = QueuedMessage(queue_id, mail_from, tuple(recipients), time.time())
        self._write(meta, content, self.active)
        return meta

    def load(self, queue_id: str) -> tuple[QueuedMessage, bytes]:
        raw = (self.active / queue_id).read_bytes()
        line, _, content = raw.partition(b"\n")
        data = json.loads(line)
        data["recipients"] = tuple(data["recipients"])
        return QueuedMessage(**data), content

    def ids(self) -> Iterator[str]:
        for p in sorted(self.active.iterdir()):
            if p.is_file():
                yield p.name

    def __len__(self) -> int:
        return sum(1 for _ in self.ids())

    def update(self, meta: QueuedMessage, content: bytes, *, recipients: tuple[str, ...],
               retry_in: float, error: str) -> QueuedMessage:
        new = replace(meta, recipients=recipients, attempts=meta.attempts + 1,
                      next_attempt=time.time() + retry_in, last_error=error)
        self._write(new, content, self.active)
        return new

    def remove(self, queue_id: str) -> None:
        try:
            (self.active / queue_id).unlink()
        except FileNotFoundError:
            return
        _fsync_dir(self.active)

    def give_up(self, meta: QueuedMessage, content: bytes, error: str) -> None:
        self._write(replace(meta, last_error=error), content, self.failed)
        self.remove(meta.queue_id)

    def next_due(self) -> Optional[float]:
        """Earliest next_attempt among active messages (None when empty)."""
        due: Optional[float] = None
        for qid in self.ids():
            try:
                meta, _ = self.load(qid)
            except (OSError, ValueError):
                continue
            due = meta.next_attempt if due is None else min(due, meta.next_attempt)
        return due
