"""Follow Postfix's ``maillog_file`` and report each delivery result once (restart safe).

Lines are parsed by :class:`milterd.outbound.maillog_parser.MaillogParser`.

Counting: each (queue id, recipient, status) is reported once — a recipient deferred five times
for the same message yields one ``deferred`` and, later, one ``sent``.  Restart safety: the
byte offset and inode of the file (plus the recently reported keys) are saved atomically to a
small state file after every batch; on start the follower resumes there, and if the file was
rotated while it was down it first finishes the rotated file (found by inode in the same
directory).  Rotation while running (new inode) drains the old file first; truncation
(``copytruncate``) restarts at 0.  A crash between a callback and the state save can replay at
most that batch, and the saved recent keys suppress even that.

Every delivery line (smtp only, with a relay) is also appended to ``sessions_file`` as one JSON
line for TLS-RPT (:func:`milterd.outbound.tlsrpt.session_record`), annotated with the policy
that applied (``policy_lookup(domain)``, e.g.
:meth:`milterd.outbound.tlspolicy.PolicyResolver.peek`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from milterd.outbound.maillog_parser import MaillogParser, OutboundResult
from milterd.outbound.tlsrpt import session_record

__all__ = ["MaillogFollower", "FollowerHandle"]

log = logging.getLogger(__name__)

_MAX_LINE = 64 * 1024


class MaillogFollower:
    """Follow ``path`` (rotation/truncation/restart safe) and report :class:`OutboundResult`\\ s.

    :param path: Postfix ``maillog_file``.
    :param state_file: where the offset/inode state is saved (created; atomic replace).
    :param on_result: called once per (queue id, recipient, status); exceptions are logged.
    :param sessions_file: optional JSON-lines file for TLS-RPT session records.
    :param policy_lookup: ``domain -> PolicyAnswer | None`` used to annotate session records.
    :param start_at: where to begin without saved state: ``"end"`` (default) or ``"beginning"``.
    :param parser: a :class:`MaillogParser` (time zone / clock options).
    """

    def __init__(self, path: str | os.PathLike, state_file: str | os.PathLike,
                 on_result: Callable[[OutboundResult], None], *,
                 sessions_file: str | os.PathLike | None = None,
                 policy_lookup: Callable[[str], Any] | None = None,
                 start_at: Literal["end", "beginning"] = "end",
                 parser: MaillogParser | None = None,
                 recent_keys: int = 10000, saved_keys: int = 2000) -> None:
        self.path = os.fspath(path)
        self.state_file = os.fspath(state_file)
        self._on_result = on_result
        self._sessions_file = os.fspath(sessions_file) if sessions_file else None
        self._policy_lookup = policy_lookup
        self._start_at = start_at
        self._parser = parser or MaillogParser()
        self._recent: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._recent_max = recent_keys
        self._saved_keys = saved_keys
        self._fh: Any = None
        self._ino: tuple[int, int] | None = None
        self._offset = 0
        self._pending: list[tuple[Any, int]] = []  # rotated files to finish first (fh, offset)
        self._started = False
        self._dirty = False

    # -- state -------------------------------------------------------------------------------
    def _load_state(self) -> dict | None:
        try:
            with open(self.state_file, encoding="utf-8") as f:
                st = json.load(f)
            if not isinstance(st, dict) or not isinstance(st.get("offset"), int):
                return None
            for key in st.get("recent", []):
                if isinstance(key, list) and len(key) == 3:
                    self._recent[tuple(key)] = None  # type: ignore[index]
            return st
        except (OSError, ValueError):
            return None

    def _save_state(self) -> None:
        if self._ino is None:
            return
        keys = list(self._recent)[-self._saved_keys:]
        data = {"dev": self._ino[0], "inode": self._ino[1], "offset": self._offset,
                "recent": [list(k) for k in keys]}
        tmp = f"{self.state_file}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)

    # -- file handling -----------------------------------------------------------------------
    def _open_current(self) -> bool:
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            return False
        st = os.fstat(fh.fileno())
        self._fh, self._ino, self._offset = fh, (st.st_dev, st.st_ino), 0
        return True

    def _start(self) -> bool:
        state = self._load_state()
        if not self._open_current():
            return False
        size = os.fstat(self._fh.fileno()).st_size
        if state is not None:
            saved = (state.get("dev"), state.get("inode"))
            if saved == self._ino:
                self._offset = state["offset"] if state["offset"] <= size else 0
            else:
                rotated = self._find_by_inode(saved)
                if rotated is not None:
                    self._pending.append((rotated, state["offset"]))
                self._offset = 0
        else:
            self._offset = size if self._start_at == "end" else 0
        self._started = True
        self._dirty = True
        return True

    def _find_by_inode(self, ino: tuple[Any, Any]) -> Any:
        directory = os.path.dirname(self.path) or "."
        base = os.path.basename(self.path)
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return None
        for name in names:
            if not name.startswith(base) or name == base:
                continue
            full = os.path.join(directory, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == ino:
                try:
                    return open(full, "rb")
                except OSError:
                    return None
        return None

    def _read_from(self, fh: Any, offset: int) -> tuple[int, int]:
        """Process complete lines of ``fh`` from ``offset``; returns (new offset, lines)."""
        n = 0
        fh.seek(offset)
        while True:
            chunk = fh.read(1 << 20)
            if not chunk:
                break
            end = chunk.rfind(b"\n")
            if end < 0:
                if len(chunk) >= _MAX_LINE:  # an absurdly long line: skip it
                    offset += len(chunk)
                    continue
                break
            for raw in chunk[: end + 1].split(b"\n")[:-1]:
                if len(raw) <= _MAX_LINE:
                    self._line(raw.decode("utf-8", "replace"))
                    n += 1
            offset += end + 1
            fh.seek(offset)
        return offset, n

    def _line(self, line: str) -> None:
        try:
            result = self._parser.feed(line)
        except Exception:
            log.exception("maillog: cannot parse line")
            return
        if result is None:
            return
        self._record_session(result)
        key = (result.queue_id, result.recipient.lower(), result.status)
        if key in self._recent:
            return
        self._recent[key] = None
        while len(self._recent) > self._recent_max:
            self._recent.popitem(last=False)
        try:
            self._on_result(result)
        except Exception:
            log.exception("maillog: result callback failed")

    def _record_session(self, result: OutboundResult) -> None:
        if not self._sessions_file:
            return
        policy = None
        if self._policy_lookup is not None:
            try:
                policy = self._policy_lookup(result.recipient_domain)
            except Exception:
                log.exception("maillog: policy lookup failed")
        rec = session_record(result, policy)
        if rec is None:
            return
        try:
            with open(self._sessions_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        except OSError as exc:
            log.warning("maillog: cannot append to %s: %s", self._sessions_file, exc)

    def poll_once(self) -> int:
        """Read whatever is new; returns the number of lines processed."""
        if not self._started and not self._start():
            return 0
        n = 0
        while self._pending:
            fh, off = self._pending.pop(0)
            try:
                _, k = self._read_from(fh, off)
                n += k
            finally:
                fh.close()
        self._offset, k = self._read_from(self._fh, self._offset)
        n += k
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None  # rotated away, not yet re-created: keep the old file
        if st is not None:
            if (st.st_dev, st.st_ino) != self._ino:
                self._offset, k = self._read_from(self._fh, self._offset)  # drain the old file
                n += k
                self._fh.close()
                if self._open_current():
                    self._offset, k = self._read_from(self._fh, 0)
                    n += k
                self._dirty = True
            elif st.st_size < self._offset:  # truncated in place
                self._offset, k = self._read_from(self._fh, 0)
                n += k
                self._dirty = True
        if n or self._dirty:
            self._save_state()
            self._dirty = False
        return n

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for fh, _ in self._pending:
            fh.close()
        self._pending.clear()
        self._started = False

    def start_in_thread(self, poll_interval: float = 1.0) -> "FollowerHandle":
        """Poll in a daemon thread every ``poll_interval`` seconds until ``stop()``."""
        stop = threading.Event()

        def run() -> None:
            try:
                while not stop.is_set():
                    try:
                        self.poll_once()
                    except Exception:
                        log.exception("maillog: poll failed")
                    stop.wait(poll_interval)
            finally:
                self.close()

        t = threading.Thread(target=run, name="milterd-maillog", daemon=True)
        t.start()
        return FollowerHandle(stop, t)


@dataclass
class FollowerHandle:
    _stop: threading.Event
    thread: threading.Thread = field(repr=False)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.thread.join(timeout)
