"""Follow Postfix's ``maillog_file`` and turn smtp(8) delivery lines into typed outbound results.

What is parsed (Postfix 3.x formats; syslog ``Mmm dd hh:mm:ss[.ffffff]`` or RFC 3339 prefixes;
any program name ending in ``/smtp`` or ``/lmtp``, e.g. ``postfix/smtp``, ``postfix-out/smtp``):

* ``Verified|Trusted|Untrusted|Anonymous TLS connection established to host[addr]:port: …``
  (also ``… reused to …``) — remembered per smtp process id and per peer;
* ``certificate verification failed for host[addr]:port: untrusted issuer …`` (and the
  ``server``/``CA`` prefixed, self-signed, expired, not-yet-valid, "not trusted by local or TLSA
  policy" variants from tls_verify.c), ``SSL_connect error to host[addr]:port…``;
* ``QUEUEID: to=<rcpt>, [orig_to=<…>,] relay=host[addr]:port, [conn_use=N,] delay=…, delays=…,
  dsn=X.Y.Z, status=sent|deferred|bounced (text)``.

The TLS level of a delivery is the level of the last TLS line of the same process to the same
peer (within ``session_window`` seconds), else of the last TLS line to that peer from any process
(cached connections can move between smtp processes), else ``none``.  Failure reasons come
from the delivery text plus the remembered process state:

==========================================================  =======================
``TLS is required, but was not offered by host …``,          ``starttls_not_offered``
``… refused to start TLS``
``Server certificate not trusted``, ``certificate             ``untrusted_cert``
verification failed …``, ``Server certificate not verified``
after an *Untrusted* session
``Server certificate not verified`` after a *Trusted*         ``name_mismatch``
session (chain good, name not matched), or after
``verification failed …: num=62:hostname mismatch`` (real
Postfix 3.7 output), ``certificate name mismatch``
``Cannot start TLS: handshake failure``, ``SSL_connect        ``handshake_failed``
error``
anything else                                                 ``other``
==========================================================  =======================

Counting: each (queue id, recipient, status) is reported once — a recipient deferred five times
for the same message yields one ``deferred`` and, later, one ``sent``.  Restart safety: the
byte offset and inode of the file (plus the recently reported keys) are saved atomically to a
small state file after every batch; on start the follower resumes there, and if the file was
rotated while it was down it first finishes the rotated file (found by inode in the same
directory).  Rotation while running (new inode) drains the old file first; truncation
(``copytruncate``) restarts at 0.  A crash between a callback and the state save can replay at
most that batch, and the saved recent keys suppress even that.

Every delivery line (smtp only, with a relay) is also appended to ``sessions_file`` as one JSON
line for TLS-RPT (:mod:`milterd.outbound.tlsrpt`), annotated with the policy that applied
(``policy_lookup(domain)``, e.g. :meth:`milterd.outbound.tlspolicy.PolicyResolver.peek`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Callable, Literal

from milterd.policy import reasons
from milterd.policy.reasons import OutboundReason

__all__ = [
    "OutboundResult",
    "MaillogParser",
    "MaillogFollower",
    "FollowerHandle",
    "tlsrpt_result_type",
]

log = logging.getLogger(__name__)

TlsLevel = Literal["verified", "trusted", "untrusted", "anonymous", "none"]
_MAX_LINE = 64 * 1024


@dataclass(frozen=True)
class OutboundResult:
    """One delivery attempt outcome for one recipient."""

    queue_id: str
    recipient_domain: str
    relay: str                     # "mx.example.com[192.0.2.1]:25" or "none"
    status: Literal["sent", "deferred", "bounced"]
    tls_level: TlsLevel
    reason: OutboundReason | None  # None when sent (milterd.policy.reasons, outbound)
    timestamp: datetime            # timezone-aware (UTC)
    recipient: str = ""
    dsn: str = ""
    detail: str = ""               # the delivery text / certificate problem, for humans
    service: str = "smtp"

    @property
    def relay_host(self) -> str:
        return self.relay.split("[", 1)[0] if self.relay != "none" else ""

    @property
    def relay_ip(self) -> str:
        m = re.search(r"\[([^\]]*)\]", self.relay)
        return m.group(1) if m else ""

    @property
    def tls_failure(self) -> bool:
        """True when the attempt failed because of TLS (not e.g. a full mailbox)."""
        return self.reason in reasons.OUTBOUND_TLS_FAILURES


# -- line formats ------------------------------------------------------------------------------
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_PREFIX = re.compile(
    r"(?:(?P<mon>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) (?P<hms>\d\d:\d\d:\d\d)(?:\.\d+)?"
    r"|(?P<iso>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?))"
    r" (?P<host>\S+) (?P<prog>\S*/(?P<svc>smtp|lmtp))\[(?P<pid>\d+)\]: (?P<msg>.*)\Z")
_TLS_EST = re.compile(
    r"(?P<level>Verified|Trusted|Untrusted|Anonymous) TLS connection (?:established|reused)"
    r" (?:to|from) (?P<peer>[^\s\[]*\[[^\]]*\](?::\d+)?)")
_CERT_FAIL = re.compile(
    r"(?:(?:server|CA|client) )?certificate verification failed for "
    r"(?P<peer>[^\s\[]*\[[^\]]*\](?::\d+)?): (?P<why>.*)")
_SSL_ERR = re.compile(r"SSL_connect error to (?P<peer>[^\s\[]*\[[^\]]*\](?::\d+)?)")
_DELIVERY = re.compile(
    r"(?P<qid>[0-9A-Za-z]+): to=<(?P<rcpt>[^>]*)>, (?:orig_to=<[^>]*>, )?"
    r"relay=(?P<relay>[^,\s]+), (?:conn_use=\d+, )?delay=[^,]*, delays=[^,]*, "
    r"dsn=(?P<dsn>[^,]*), status=(?P<status>sent|deferred|bounced)(?: \((?P<text>.*)\))?\Z")


@dataclass
class _PeerState:
    peer: str
    level: TlsLevel
    when: datetime
    cert_problem: str | None = None


def _peer_key(peer: str) -> str:
    return peer.lower()


def _relay_matches(relay: str, peer: str) -> bool:
    r, p = relay.lower(), peer.lower()
    return r == p or r.split(":")[0] == p.split(":")[0] or r.startswith(p) or p.startswith(r)


class MaillogParser:
    """Pure line parser with the little per-process state the smtp log format needs.

    :param now: ``datetime``-returning clock (for the year of syslog timestamps).
    :param tz: time zone of syslog timestamps without one (default: local time).
    :param session_window: seconds a TLS line stays attributable to later delivery lines.
    """

    def __init__(self, *, now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 tz: tzinfo | None = None, session_window: float = 600.0,
                 max_peers: int = 4096) -> None:
        self._now = now
        self._tz = tz
        self._window = timedelta(seconds=session_window)
        self._max_peers = max_peers
        self._by_pid: OrderedDict[str, _PeerState] = OrderedDict()
        self._by_peer: OrderedDict[str, _PeerState] = OrderedDict()

    def _timestamp(self, m: re.Match) -> datetime:
        if m.group("iso"):
            iso = m.group("iso").replace("Z", "+00:00")
            ts = datetime.fromisoformat(iso)
            if ts.tzinfo is None:
                ts = ts.replace(tzinfo=self._tz or datetime.now().astimezone().tzinfo)
            return ts.astimezone(timezone.utc)
        now = self._now()
        tz = self._tz or datetime.now().astimezone().tzinfo
        h, mi, s = (int(x) for x in m.group("hms").split(":"))
        month, day = _MONTHS[m.group("mon")], int(m.group("day"))
        year = now.year
        try:
            ts = datetime(year, month, day, h, mi, s, tzinfo=tz)
            if ts - now > timedelta(days=2):  # December lines read in January
                ts = ts.replace(year=year - 1)
        except ValueError:  # Feb 29 of a non-leap year: it was last year's
            ts = datetime(year - 1, month, day, h, mi, s, tzinfo=tz)
        return ts.astimezone(timezone.utc)

    def _remember(self, table: OrderedDict[str, _PeerState], key: str, st: _PeerState) -> None:
        table[key] = st
        table.move_to_end(key)
        while len(table) > self._max_peers:
            table.popitem(last=False)

    def feed(self, line: str) -> OutboundResult | None:
        """Parse one line; returns a result for a delivery line, else None."""
        m = _PREFIX.match(line.rstrip("\r\n"))
        if not m:
            return None
        msg, pid, svc = m.group("msg"), m.group("pid"), m.group("svc")
        if msg.startswith(("warning: ", "info: ")):
            msg = msg.split(": ", 1)[1]
        t = _TLS_EST.match(msg)
        if t:
            when = self._timestamp(m)
            st = _PeerState(t.group("peer"), t.group("level").lower(), when)  # type: ignore[arg-type]
            prev = self._by_pid.get(pid)
            if prev and prev.cert_problem and _relay_matches(prev.peer, st.peer):
                st.cert_problem = prev.cert_problem
            self._remember(self._by_pid, pid, st)
            self._remember(self._by_peer, _peer_key(st.peer), st)
            return None
        c = _CERT_FAIL.match(msg) or _SSL_ERR.match(msg)
        if c:
            why = c.groupdict().get("why") or "SSL_connect error"
            st = _PeerState(c.group("peer"), "none", self._timestamp(m), why)
            self._remember(self._by_pid, pid, st)
            return None
        d = _DELIVERY.match(msg)
        if not d:
            return None
        when = self._timestamp(m)
        relay = d.group("relay")
        rcpt = d.group("rcpt")
        domain = rcpt.rsplit("@", 1)[1].lower().rstrip(".") if "@" in rcpt else ""
        text = d.group("text") or ""
        status = d.group("status")
        state = self._by_pid.get(pid)
        if state is None or not _relay_matches(relay, state.peer) or when - state.when > self._window:
            state = self._by_peer.get(_peer_key(relay))
            if state is not None and when - state.when > self._window:
                state = None
        level: TlsLevel = state.level if state else "none"
        reason: OutboundReason | None = None
        detail = text
        if status != "sent":
            reason, level = self._classify(text, level, state)
            if state and state.cert_problem and reason in (reasons.OUTBOUND_UNTRUSTED_CERT,
                                                           reasons.OUTBOUND_NAME_MISMATCH):
                detail = f"{text}: {state.cert_problem}"
        return OutboundResult(d.group("qid"), domain, relay, status, level, reason, when,  # type: ignore[arg-type]
                              rcpt, d.group("dsn"), detail[:500], svc)

    @staticmethod
    def _classify(text: str, level: TlsLevel, state: _PeerState | None
                  ) -> tuple[OutboundReason, TlsLevel]:
        low = text.lower()
        if "tls is required, but was not offered" in low or "refused to start tls" in low:
            return reasons.OUTBOUND_STARTTLS_NOT_OFFERED, "none"
        if "name mismatch" in low:
            return reasons.OUTBOUND_NAME_MISMATCH, level
        if "server certificate not trusted" in low:
            return reasons.OUTBOUND_UNTRUSTED_CERT, level
        if "server certificate not verified" in low:
            # Postfix 3.7 logs a chain that is fine but names another host as
            # "verification failed for …: num=62:hostname mismatch", then "Untrusted TLS".
            problem = (state.cert_problem or "").lower() if state else ""
            if level == "trusted" or "hostname mismatch" in problem or "num=62:" in problem:
                return reasons.OUTBOUND_NAME_MISMATCH, level
            return reasons.OUTBOUND_UNTRUSTED_CERT, level
        if "cannot start tls" in low or "tls handshake" in low or "ssl_connect" in low:
            return reasons.OUTBOUND_HANDSHAKE_FAILED, level
        if "certificate verification failed" in low:
            return reasons.OUTBOUND_UNTRUSTED_CERT, level
        return reasons.OUTBOUND_OTHER, level


# -- TLS-RPT session records --------------------------------------------------------------------
def tlsrpt_result_type(result: OutboundResult, policy_type: str) -> str | None:
    """RFC 8460 §4.3 result type for a failed session, None for a successful one."""
    if result.status == "sent":
        return None if result.tls_level != "none" else "starttls-not-supported"
    if result.reason == reasons.OUTBOUND_STARTTLS_NOT_OFFERED:
        return "starttls-not-supported"
    if result.reason in (reasons.OUTBOUND_UNTRUSTED_CERT, reasons.OUTBOUND_NAME_MISMATCH):
        if policy_type == "tlsa":
            return "tlsa-invalid"
        if result.reason == reasons.OUTBOUND_NAME_MISMATCH:
            return "certificate-host-mismatch"
        return "certificate-expired" if "expired" in result.detail.lower() else "certificate-not-trusted"
    if result.reason == reasons.OUTBOUND_HANDSHAKE_FAILED:
        return "validation-failure"
    return None  # a non-TLS failure after TLS was established: the TLS session succeeded


def session_record(result: OutboundResult, policy: Any | None) -> dict | None:
    """The JSON-line record for TLS-RPT, or None when the line is not a TLS session."""
    if result.service != "smtp" or result.relay == "none" or not result.recipient_domain:
        return None
    if (result.status != "sent" and result.reason == reasons.OUTBOUND_OTHER
            and result.tls_level == "none"):
        return None  # no TLS session was attempted (connection error, plain-text refusal)
    pol = policy.to_json() if policy is not None and hasattr(policy, "to_json") else {}
    policy_type = pol.get("policy_type", "no-policy-found")
    rtype = tlsrpt_result_type(result, policy_type)
    return {
        "ts": result.timestamp.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "queue_id": result.queue_id,
        "policy_domain": result.recipient_domain,
        "policy_type": policy_type,
        "policy_string": pol.get("policy_string", []),
        "mx_host": pol.get("mx_host", []),
        "receiving_mx_hostname": result.relay_host,
        "receiving_ip": result.relay_ip,
        "status": result.status,
        "tls_level": result.tls_level,
        "result": "failure" if rtype else "success",
        "result_type": rtype,
        "failure_reason_code": result.detail[:200] if rtype else None,
    }


# -- follower ----------------------------------------------------------------------------------
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
