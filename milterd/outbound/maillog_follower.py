"""Follow Postfix's ``maillog_file`` and report each delivery result once (restart safe).

Lines are parsed by :class:`milterd.outbound.maillog_parser.MaillogParser`.

Counting: each (queue id, recipient, status) is reported once — a recipient deferred five times
for the same message yields one ``deferred`` and, later, one ``sent``.

Where to start: with saved state, where it ended; without, at the end of the file
(``start_at="end"``) or its beginning — but a file that did not exist when the follower started
is read from its first byte when it appears (it is all new).

Position: the byte offset, the file's identity (device, inode) and two fingerprints (hashes of
the file's first bytes and of the bytes just before the offset).  Rotation by rename (new inode)
drains the old file first, also across a restart (the rotated file is found by inode in the same
directory).  Truncation is detected by the fingerprints, not the size, so ``copytruncate``
followed by regrowth past the old offset is noticed; the copy (a sibling with the same
fingerprints) is then finished from the old offset before the new content is read from 0.

TLS-RPT records (``sessions_file``, one JSON line per SMTP session and recipient domain, see
:func:`milterd.outbound.tlsrpt.session_record`) are written exactly once:

1. a record is appended only if its ``key`` is not among the keys already written;
2. after each batch the sessions file is flushed and fsync'd, *then* the state (offset, parser
   state incl. the per-process TLS view, result keys, record keys, and the sessions file's
   identity and size) is saved atomically (temp file, fsync, rename);
3. on start, the keys of the records beyond the saved size of the sessions file (written after
   the last save, before a crash) are read back, so replaying the lines after the saved offset
   does not write them again; a torn last line is cut off first.

A failed append (disk full, permissions) aborts the batch: the state is not saved past it and the
next poll starts again from the last saved state, so no record is skipped.  :func:`build_report`
also counts a key once.  Result callbacks can repeat only after a crash (the process's counters
are gone then anyway); the saved result keys suppress the replays they cover.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Literal

from milterd.core.files import atomic_write
from milterd.outbound.maillog_parser import MaillogParser, OutboundResult
from milterd.outbound.tlsrpt import session_record

__all__ = ["MaillogFollower", "FollowerHandle"]

log = logging.getLogger(__name__)

_MAX_LINE = 64 * 1024
_FP = 256             # bytes hashed for each fingerprint
_SCAN_RECORDS = 8 << 20   # on start, read back at most this much of the sessions file
STATE_VERSION = 2


class _RecordWriteError(Exception):
    pass


def _fingerprint(fh: Any, start: int, end: int) -> str | None:
    """sha256 of bytes [start, end) of ``fh`` (None when the file is shorter)."""
    if end <= start:
        return ""
    try:
        data = os.pread(fh.fileno(), end - start, start)
    except OSError:
        return None
    if len(data) != end - start:
        return None
    return hashlib.sha256(data).hexdigest()


class MaillogFollower:
    """Follow ``path`` (rotation/truncation/restart safe) and report :class:`OutboundResult`\\ s.

    :param path: Postfix ``maillog_file``.
    :param state_file: where the position/parser state is saved (created; atomic replace).
    :param on_result: called once per (queue id, recipient, status); exceptions are logged.
    :param sessions_file: optional JSON-lines file for TLS-RPT session records.
    :param policy_lookup: ``domain -> PolicyAnswer | None`` used to annotate session records.
    :param start_at: where to begin without saved state in a file that already exists:
        ``"end"`` (default) or ``"beginning"``.
    :param parser: a :class:`MaillogParser` (time zone / clock options).
    :param recent_keys: result keys remembered in memory; ``saved_keys`` of them in the state.
    :param record_keys: TLS-RPT record keys remembered (memory and state).
    """

    def __init__(self, path: str | os.PathLike, state_file: str | os.PathLike,
                 on_result: Callable[[OutboundResult], None], *,
                 sessions_file: str | os.PathLike | None = None,
                 policy_lookup: Callable[[str], Any] | None = None,
                 start_at: Literal["end", "beginning"] = "end",
                 parser: MaillogParser | None = None,
                 recent_keys: int = 10000, saved_keys: int = 2000,
                 record_keys: int = 2000) -> None:
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
        self._written: OrderedDict[str, None] = OrderedDict()
        self._written_max = max(record_keys, 1)
        self._fh: Any = None
        self._ino: tuple[int, int] | None = None
        self._offset = 0
        self._pending: list[tuple[Any, int]] = []  # rotated files to finish first (fh, offset)
        self._started = False
        self._dirty = False
        self._first_poll = True
        self._absent_at_start = False
        self._out: Any = None                     # the sessions file, open for appending
        self._out_dirty = False
        self._fp: dict = {"head": None, "tail": None}
        self._lock = threading.Lock()

    # -- state -------------------------------------------------------------------------------
    def _load_state(self) -> dict | None:
        try:
            with open(self.state_file, encoding="utf-8") as f:
                st = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("maillog: state %s unreadable (%s): starting without it",
                        self.state_file, exc)
            return None
        if not isinstance(st, dict) or not isinstance(st.get("offset"), int):
            log.warning("maillog: state %s malformed: starting without it", self.state_file)
            return None
        for key in st.get("recent", []):
            if isinstance(key, list) and len(key) == 3 and all(isinstance(x, str) for x in key):
                self._remember(tuple(key))  # type: ignore[arg-type]
        for key in st.get("records", []):
            if isinstance(key, str):
                self._mark_written(key)
        snap = st.get("parser")
        if snap is not None and not self._parser.restore(snap):
            log.warning("maillog: saved parser state malformed: TLS view starts empty")
            self._parser.gap()
        elif snap is None:
            self._parser.gap()   # an old state: the per-process TLS view was not saved
        return st

    def _save_state(self) -> None:
        if self._ino is None:
            return
        data: dict[str, Any] = {
            "version": STATE_VERSION, "dev": self._ino[0], "inode": self._ino[1],
            "offset": self._offset,
            "head": _fingerprint(self._fh, 0, min(self._offset, _FP)),
            "tail": _fingerprint(self._fh, max(0, self._offset - _FP), self._offset),
            "recent": [list(k) for k in list(self._recent)[-self._saved_keys:]],
            "records": list(self._written),
            "parser": self._parser.snapshot(),
        }
        if self._out is not None:
            st = os.fstat(self._out.fileno())
            data["sessions"] = {"dev": st.st_dev, "inode": st.st_ino, "size": st.st_size}
        atomic_write(self.state_file, json.dumps(data, separators=(",", ":")).encode())

    def _remember(self, key: tuple[str, str, str]) -> None:
        self._recent[key] = None
        self._recent.move_to_end(key)
        while len(self._recent) > self._recent_max:
            self._recent.popitem(last=False)

    def _mark_written(self, key: str) -> None:
        self._written[key] = None
        self._written.move_to_end(key)
        while len(self._written) > self._written_max:
            self._written.popitem(last=False)

    # -- the sessions file -------------------------------------------------------------------
    def _recover_sessions(self, saved: Any) -> None:
        """Read back the record keys written after the last state save; cut a torn line."""
        if not self._sessions_file:
            return
        try:
            fd = os.open(self._sessions_file, os.O_RDWR)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("maillog: cannot open %s: %s", self._sessions_file, exc)
            return
        try:
            st = os.fstat(fd)
            start = 0
            if (isinstance(saved, dict) and saved.get("dev") == st.st_dev
                    and saved.get("inode") == st.st_ino
                    and isinstance(saved.get("size"), int) and saved["size"] <= st.st_size):
                start = saved["size"]
            start = max(start, st.st_size - _SCAN_RECORDS)
            data = os.pread(fd, st.st_size - start, start)
            if start > 0 and not (isinstance(saved, dict) and start == saved.get("size")):
                data = data[data.find(b"\n") + 1:] if b"\n" in data else b""  # mid-line
                start = st.st_size - len(data)
            if data and not data.endswith(b"\n"):
                # a record torn by a crash while it was appended: cut it, it is written again
                cut = data.rfind(b"\n") + 1
                os.ftruncate(fd, start + cut)
                os.fsync(fd)
                log.warning("maillog: cut a torn record at the end of %s", self._sessions_file)
                data = data[:cut]
            lines = data.split(b"\n")
            for raw in lines:
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("key"), str):
                    self._mark_written(rec["key"])
        finally:
            os.close(fd)

    def _append_record(self, rec: dict) -> None:
        assert self._sessions_file is not None
        try:
            if self._out is not None:
                try:
                    st = os.stat(self._sessions_file)
                    cur = os.fstat(self._out.fileno())
                    moved = (st.st_dev, st.st_ino) != (cur.st_dev, cur.st_ino)
                except FileNotFoundError:
                    moved = True
                if moved:   # rotated by its reader: continue in a new file
                    self._close_out()
            if self._out is None:
                self._out = open(self._sessions_file, "a", encoding="utf-8")
            self._out.write(json.dumps(rec, separators=(",", ":")) + "\n")
            self._out.flush()
            self._out_dirty = True
        except OSError as exc:
            raise _RecordWriteError(str(exc)) from exc

    def _sync_out(self) -> None:
        if self._out is not None and self._out_dirty:
            try:
                self._out.flush()
                os.fsync(self._out.fileno())
            except OSError as exc:
                raise _RecordWriteError(str(exc)) from exc
            self._out_dirty = False

    def _close_out(self) -> None:
        if self._out is not None:
            try:
                self._out.close()
            except OSError:
                pass
            self._out = None

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
        first = self._first_poll
        self._first_poll = False
        state = self._load_state()
        if not self._open_current():
            if first and state is None:
                self._absent_at_start = True   # when it appears, all of it is new
            return False
        if state is not None:
            self._recover_sessions(state.get("sessions"))
        size = os.fstat(self._fh.fileno()).st_size
        if state is not None:
            saved = (state.get("dev"), state.get("inode"))
            off = state["offset"]
            if saved == self._ino:
                if self._same_content(self._fh, off, state):
                    self._offset = off
                else:   # replaced in place (copytruncate) while we were down
                    self._queue_copy(off, state)
                    self._offset = 0
            else:
                rotated = self._find_sibling(lambda st: (st.st_dev, st.st_ino) == saved)
                if rotated is not None:
                    self._pending.append((rotated, off))
                else:
                    self._queue_copy(off, state)
                self._offset = 0
        elif self._absent_at_start:
            self._offset = 0
        elif self._start_at == "end":
            self._offset = size
            self._parser.gap(datetime.now(timezone.utc))
        else:
            self._offset = 0
            self._parser.gap()
        self._fp = {"head": _fingerprint(self._fh, 0, min(self._offset, _FP)),
                    "tail": _fingerprint(self._fh, max(0, self._offset - _FP), self._offset)}
        if state is None:
            self._save_state()   # the starting point itself: a failed first batch resumes here
        self._started = True
        self._dirty = True
        return True

    @staticmethod
    def _same_content(fh: Any, offset: int, fp: dict) -> bool:
        """Does ``fh`` still hold, up to ``offset``, what the fingerprints ``fp`` describe?"""
        if os.fstat(fh.fileno()).st_size < offset:
            return False
        head, tail = fp.get("head"), fp.get("tail")
        if head is None and tail is None:
            return True   # an old state without fingerprints: size is all we know
        return (head == _fingerprint(fh, 0, min(offset, _FP))
                and tail == _fingerprint(fh, max(0, offset - _FP), offset))

    def _queue_copy(self, offset: int, fp: dict) -> None:
        """After a copytruncate, finish the copy (found by fingerprints) from ``offset``."""
        if offset <= 0 or fp.get("head") is None:
            return
        fh = self._find_sibling(lambda st: st.st_size >= offset, check=(offset, fp))
        if fh is not None:
            self._pending.append((fh, offset))
        else:
            log.warning("maillog: %s was truncated; its copy was not found (compressed?): "
                        "lines after offset %d may be missing", self.path, offset)
            self._parser.gap()

    def _find_sibling(self, pred: Callable[[os.stat_result], bool],
                      check: tuple[int, dict] | None = None) -> Any:
        directory = os.path.dirname(self.path) or "."
        base = os.path.basename(self.path)
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return None
        for name in names:
            if not name.startswith(base) or name == base or name.endswith(
                    (".gz", ".bz2", ".xz", ".zst", ".tmp")):
                continue
            full = os.path.join(directory, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            if not pred(st):
                continue
            try:
                fh = open(full, "rb")
            except OSError:
                continue
            if check is None or self._same_content(fh, check[0], check[1]):
                return fh
            fh.close()
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
        self._record_session(result)        # may raise _RecordWriteError: batch aborted
        key = (result.queue_id, result.recipient.lower(), result.status)
        if key in self._recent:
            return
        self._remember(key)
        try:
            self._on_result(result)
        except Exception:
            log.exception("maillog: result callback failed")

    def _record_session(self, result: OutboundResult) -> None:
        if not self._sessions_file or not result.session_key:
            return
        if result.session_key in self._written:
            return                          # written before (replay after a crash/restart)
        policy = None
        if self._policy_lookup is not None:
            try:
                policy = self._policy_lookup(result.recipient_domain)
            except Exception:
                log.exception("maillog: policy lookup failed")
        rec = session_record(result, policy)
        if rec is None:
            return
        self._append_record(rec)
        self._mark_written(result.session_key)

    def poll_once(self) -> int:
        """Read whatever is new; returns the number of lines processed."""
        with self._lock:
            try:
                return self._poll()
            except _RecordWriteError as exc:
                log.warning("maillog: cannot append to %s (%s): will retry from the last "
                            "saved position", self._sessions_file, exc)
                self._restart_from_saved()
                return 0

    def _restart_from_saved(self) -> None:
        """Forget the unsaved progress; the next poll resumes from the saved state."""
        self._close_files()
        self._close_out()
        self._parser.restore({"procs": [], "horizon": None})
        self._started = False

    def _poll(self) -> int:
        if not self._started and not self._start():
            return 0
        n = 0
        while self._pending:
            fh, off = self._pending[0]
            try:
                _, k = self._read_from(fh, off)
                n += k
            finally:
                fh.close()
                self._pending.pop(0)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None  # rotated away, not yet re-created: keep the old file
        if st is not None and (st.st_dev, st.st_ino) != self._ino:
            self._offset, k = self._read_from(self._fh, self._offset)  # drain the old file
            n += k
            self._fh.close()
            if self._open_current():
                self._offset, k = self._read_from(self._fh, 0)
                n += k
            self._dirty = True
        else:
            if not self._same_content(self._fh, self._offset, self._fp):
                # truncated in place (copytruncate), perhaps grown again past our offset
                self._queue_copy(self._offset, self._fp)
                while self._pending:
                    fh, off = self._pending.pop(0)
                    try:
                        _, k = self._read_from(fh, off)
                        n += k
                    finally:
                        fh.close()
                self._offset = 0
                self._dirty = True
            self._offset, k = self._read_from(self._fh, self._offset)
            n += k
        if n or self._dirty:
            self._sync_out()
            self._save_state()
            self._dirty = False
        self._fp = {"head": _fingerprint(self._fh, 0, min(self._offset, _FP)),
                    "tail": _fingerprint(self._fh, max(0, self._offset - _FP), self._offset)}
        return n

    def _close_files(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for fh, _ in self._pending:
            fh.close()
        self._pending.clear()

    def close(self) -> None:
        with self._lock:
            self._close_files()
            self._close_out()
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
