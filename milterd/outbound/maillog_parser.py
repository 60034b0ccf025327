"""Parse Postfix smtp(8) log lines into typed outbound results — believing only Postfix's words.

The grammar is Postfix's own (``src/global/log_adhoc.c``, ``src/tls/tls_misc.c``,
``src/tls/tls_verify.c``, ``src/smtp/smtp_proto.c``), never a search in free text:

* the syslog prefix (``Mmm dd hh:mm:ss[.ffffff]`` or RFC 3339), a program ending in ``/smtp`` or
  ``/lmtp`` and its ``[pid]``;
* ``{Verified|Trusted|Untrusted|Anonymous} TLS connection {established|reused} to
  host[addr]:port: …`` (``tls_log_summary``) — the TLS outcome of that process's connection;
* ``[server |CA ]certificate verification failed for host[addr]:port: WHY`` where WHY is one of
  Postfix's fixed phrases (``certificate has expired``, ``untrusted issuer …``, ``num=N:…``, …)
  and ``SSL_connect error to host[addr]:port: …`` — before/instead of the summary line;
* ``QID: to=<ADDR>, [orig_to=<ADDR>, ]relay=R, [conn_use=N, ]delay=D, delays=a/b/c/d,
  [tls=…, ]dsn=X.Y.Z, status=S (TEXT)``.  ``ADDR`` is read as ``quote_822_local`` writes it (a
  local part that is not a dot-string is one quoted string with ``\\"`` and ``\\\\`` escaped, so it
  ends where the quotes end); the domain must be a plain domain name or ``[literal]``; ``TEXT``
  is one opaque field.  A line that could be read two ways is refused (``None``).

TLS outcome comes only from the TLS lines of the same process (``prog[pid]``) to the same peer as
the delivery's ``relay=``.  A delivery reason is one of Postfix's locally generated texts (an
exact, anchored match: ``TLS is required, but was not offered by host H``, ``Cannot start TLS:
handshake failure``, ``Server certificate not verified`` …); anything a remote server said is
``host … said: …`` and therefore ``other``.  Reasons (:mod:`milterd.policy.reasons`):

=============================================================  =======================
``TLS is required, but was not offered by host <relay>``,       ``starttls_not_offered``
``TLS is required, but host <relay> refused to start TLS: …``
``Server certificate not verified`` after a *Trusted* session   ``name_mismatch``
(chain good, name not matched — Postfix's own TLSRPT mapping),
or after ``verification failed …: num=62:…`` (hostname
mismatch); ``certificate name mismatch``
``Server certificate not verified`` otherwise,                  ``untrusted_cert``
``Server certificate not trusted``
``Cannot start TLS: handshake failure``                         ``handshake_failed``
anything else                                                   ``other``
=============================================================  =======================

Sessions (RFC 8460 counts sessions, not recipients): each process has one current connection.
A TLS line (or the certificate/``SSL_connect`` lines before it) opens it; the delivery lines of
that process with the same ``relay=`` and the same queue id belong to it (Postfix opens a new
connection per delivery request unless it logs ``conn_use=N`` — a cached connection — and TLS
connections are only reused with a ``… TLS connection reused …`` line).  A delivery line that
belongs to no open connection opens a plain-text one.  The first delivery line of a session for
a recipient domain carries ``session_key`` (deterministic: a hash of the line that opened the
session, the queue id and the domain); reused connections carry none (Postfix's own TLSRPT does
not report them again).  The per-process view is bounded by the number of processes
(``max_procs``, least recently active dropped first), not by age, and survives a restart through
:meth:`MaillogParser.snapshot` / :meth:`MaillogParser.restore`.

After a gap (the follower skipped history), a delivery line of a process with no known state
whose connection (``delays`` c+d before the line) began before the gap is in doubt: TLS level
``none`` (never counted as secured) and no TLS-RPT record.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Callable, Literal

from milterd.policy import reasons
from milterd.policy.reasons import OutboundReason

__all__ = ["OutboundResult", "MaillogParser", "TlsLevel", "CERT_ERROR_TEXT", "parse_delivery"]

TlsLevel = Literal["verified", "trusted", "untrusted", "anonymous", "none"]


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
    # The TLS-RPT session this line opens for its recipient domain ("" when it opens none:
    # a later recipient of the same session, a reused connection, a doubtful line).
    session_key: str = ""
    # Postfix's certificate problem of the session, as a fixed code (CERT_ERROR_TEXT), or
    # "ssl_connect" for an SSL_connect error; "" when none was logged.
    cert_error: str = ""

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


#: Postfix's fixed certificate-problem phrases (tls_verify.c), by code.
CERT_ERROR_TEXT = {
    "expired": "certificate has expired",
    "not_yet_valid": "certificate not yet valid",
    "not_trusted": "not trusted by local or TLSA policy",
    "self_signed": "self-signed certificate",
    "untrusted_issuer": "untrusted issuer",
    "purpose": "certificate not designated for this use",
    "chain_too_long": "certificate chain longer than limit",
    "external_policy": "external policy failure",
    "hostname_mismatch": "hostname mismatch",
    "ssl_connect": "SSL_connect error",
    "other": "certificate verification failed",
}

# -- line formats ------------------------------------------------------------------------------
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_TS = re.compile(
    r"(?:(?P<mon>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) (?P<hms>\d\d:\d\d:\d\d)(?:\.\d+)?"
    r"|(?P<iso>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?)) ")
_PROG = re.compile(r"(?P<host>\S+) (?P<prog>\S*/(?P<svc>smtp|lmtp))\[(?P<pid>\d+)\]: (?P<msg>.*)\Z")
# host[addr]:port as Postfix's namaddrport: a host name without spaces/brackets, an address.
_PEER = r"[^\s\[\]]*\[[^\s\[\]]*\](?::\d+)?"
_TLS_EST = re.compile(
    rf"(?P<level>Verified|Trusted|Untrusted|Anonymous) TLS connection (?P<use>established|reused)"
    rf" to (?P<peer>{_PEER}): \S")
_CERT_FAIL = re.compile(
    rf"(?:(?:server|CA) )?certificate verification failed for (?P<peer>{_PEER}): (?P<why>.*)\Z")
_SSL_ERR = re.compile(rf"SSL_connect error to (?P<peer>{_PEER}): ")
_CERT_WHY = [
    (re.compile(r"certificate has expired\Z"), "expired"),
    (re.compile(r"certificate not yet valid\Z"), "not_yet_valid"),
    (re.compile(r"not trusted by local or TLSA policy\Z"), "not_trusted"),
    (re.compile(r"self-signed certificate\Z"), "self_signed"),
    (re.compile(r"untrusted issuer "), "untrusted_issuer"),
    (re.compile(r"not designated for use as a (?:server|CA) certificate\Z"), "purpose"),
    (re.compile(r"certificate chain longer than limit\(\d+\)\Z"), "chain_too_long"),
    (re.compile(r"external policy failure \("), "external_policy"),
    (re.compile(r"num=62:"), "hostname_mismatch"),          # X509_V_ERR_HOSTNAME_MISMATCH
    (re.compile(r"num=10:"), "expired"),                    # X509_V_ERR_CERT_HAS_EXPIRED
    (re.compile(r"num=9:"), "not_yet_valid"),               # X509_V_ERR_CERT_NOT_YET_VALID
    (re.compile(r"num=\d+:"), "other"),
]
_QID = re.compile(r"(?P<qid>[0-9A-Za-z]+): to=<")
_TAIL = re.compile(
    r", relay=(?P<relay>[^\s,]+)(?:, conn_use=(?P<conn_use>\d+))?, delay=(?P<delay>[\d.]+), "
    r"delays=(?P<delays>[\d.]+/[\d.]+/[\d.]+/[\d.]+)(?:, tls=[^\s,]*)?, "
    r"dsn=(?P<dsn>\d\.\d{1,3}\.\d{1,3}), "
    r"status=(?P<status>sent|deferred|bounced|deliverable|undeliverable) \((?P<text>.*)\)\Z")
# Any second place a to=<…> field could end and the fixed fields begin: an ambiguous line.
_TAIL_ANYWHERE = re.compile(
    r">, (?:orig_to=<.*>, )?relay=[^\s,]+(?:, conn_use=\d+)?, delay=[\d.]+, delays=[\d./]+"
    r"(?:, tls=[^\s,]*)?, dsn=\d\.\d{1,3}\.\d{1,3}, status=\w+ \(")
_DOMAIN = re.compile(r"\[[^\s\[\]\\\"]*\]|[^\s<>()\[\]@,;:\\\"]+")
_LOCAL_SPECIALS = set('()<>,;:\\"[] @')

_NOT_OFFERED = re.compile(r"TLS is required, but was not offered by host (?P<host>\S+)\Z")
_REFUSED = re.compile(r"TLS is required, but host (?P<host>\S+) refused to start TLS: ")


def _address(msg: str, pos: int) -> tuple[str, str, int] | None:
    """Read ``ADDR>`` at ``pos`` as quote_822_local writes it: (address, domain, end after '>')."""
    n = len(msg)
    i = pos
    if i < n and msg[i] == '"':
        i += 1
        while i < n and msg[i] != '"':
            i += 2 if msg[i] == "\\" else 1
        if i >= n:
            return None
        i += 1
    else:
        while i < n and msg[i] not in "@>":
            c = msg[i]
            if c in _LOCAL_SPECIALS or ord(c) < 32 or c == "\x7f":
                return None
            i += 1
    if i >= n:
        return None
    domain = ""
    if msg[i] == "@":
        d = _DOMAIN.match(msg, i + 1)
        if not d:
            return None
        domain = d.group(0)
        i = d.end()
    if i >= n or msg[i] != ">":
        return None
    return msg[pos:i], domain, i + 1


def parse_delivery(msg: str) -> dict | None:
    """The fields of a delivery message (after the syslog prefix), or None if it is not one or
    could be read in more than one way."""
    q = _QID.match(msg)
    if not q:
        return None
    a = _address(msg, q.end())
    if a is None:
        return None
    rcpt, domain, pos = a
    orig = ""
    if msg.startswith(", orig_to=<", pos):
        o = _address(msg, pos + len(", orig_to=<"))
        if o is None:
            return None
        orig, _, pos = o
    t = _TAIL.match(msg, pos)
    if not t:
        return None
    if _TAIL_ANYWHERE.search(t.group("text")):
        return None  # a to=<> that might end later: never guess which reading Postfix meant
    out = t.groupdict()
    out.update(qid=q.group("qid"), rcpt=rcpt, domain=domain.lower().rstrip("."), orig_to=orig)
    return out


@dataclass
class _Conn:
    """The current connection of one smtp process."""

    sid: str                       # deterministic id: hash of the line that opened it
    peer: str                      # namaddrport, lower case
    level: str = "none"
    summary: bool = False          # a "… TLS connection …" line was seen
    reused: bool = False           # cached connection (no new TLS-RPT session)
    cert_error: str = ""
    qid: str = ""                  # bound at its first delivery line
    recorded: list[str] = field(default_factory=list)   # domains already given a session_key
    doubt: bool = False


def _sid(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8", "surrogatepass")).hexdigest()[:20]


class MaillogParser:
    """Pure line parser with the per-process connection state the smtp log format needs.

    :param now: ``datetime``-returning clock (for the year of syslog timestamps).
    :param tz: time zone of syslog timestamps without one (default: local time).
    :param max_procs: processes whose connection is remembered (least recently active dropped).
    :param session_window: ignored (kept for compatibility; connections are not aged out).
    """

    MAX_DOMAINS_PER_SESSION = 256

    def __init__(self, *, now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 tz: tzinfo | None = None, session_window: float | None = None,
                 max_procs: int = 2048, max_peers: int | None = None) -> None:
        self._now = now
        self._tz = tz
        self._max = max(1, max_peers or max_procs)
        self._procs: OrderedDict[str, _Conn] = OrderedDict()
        self.horizon: datetime | None = None   # lines before it may be missing (see gap())
        self._gap_pending = False
        self.refused = 0                       # delivery-looking lines refused as ambiguous

    # -- state ---------------------------------------------------------------------------------
    def gap(self, at: datetime | None = None) -> None:
        """Lines before ``at`` (default: before the next line fed) may be missing."""
        if at is not None:
            self.horizon = at.astimezone(timezone.utc)
        else:
            self._gap_pending = True

    def snapshot(self) -> dict:
        """JSON-able state (restore with :meth:`restore`)."""
        return {"horizon": self.horizon.isoformat() if self.horizon else None,
                "gap_pending": self._gap_pending,
                "procs": [[k, asdict(c)] for k, c in self._procs.items()]}

    def restore(self, snap: Any) -> bool:
        """Load a :meth:`snapshot`; False (state unchanged) when it is malformed."""
        try:
            procs: OrderedDict[str, _Conn] = OrderedDict()
            for k, c in snap["procs"]:
                conn = _Conn(**c)
                if not (isinstance(k, str) and isinstance(conn.sid, str)
                        and isinstance(conn.peer, str) and isinstance(conn.recorded, list)):
                    return False
                procs[k] = conn
            horizon = (datetime.fromisoformat(snap["horizon"]) if snap.get("horizon") else None)
            gap_pending = bool(snap.get("gap_pending"))
        except (KeyError, TypeError, ValueError):
            return False
        while len(procs) > self._max:
            procs.popitem(last=False)
        self._procs, self.horizon, self._gap_pending = procs, horizon, gap_pending
        return True

    def _put(self, key: str, conn: _Conn) -> None:
        self._procs[key] = conn
        self._procs.move_to_end(key)
        while len(self._procs) > self._max:
            self._procs.popitem(last=False)

    def _get(self, key: str) -> _Conn | None:
        conn = self._procs.get(key)
        if conn is not None:
            self._procs.move_to_end(key)
        return conn

    # -- lines ---------------------------------------------------------------------------------
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

    def feed(self, line: str) -> OutboundResult | None:
        """Parse one line; returns a result for a delivery line, else None."""
        try:
            return self._feed(line)
        except ValueError:  # an impossible date: not a line Postfix wrote
            return None

    def _feed(self, line: str) -> OutboundResult | None:
        line = line.rstrip("\r\n")
        ts = _TS.match(line)
        if ts is None or (ts.group("mon") and ts.group("mon") not in _MONTHS):
            return None
        if self._gap_pending:  # any program's line dates the gap
            self.horizon, self._gap_pending = self._timestamp(ts), False
        m = _PROG.match(line, ts.end())
        if m is None:
            return None
        msg, pid, svc = m.group("msg"), m.group("pid"), m.group("svc")
        key = f"{m.group('prog')}[{pid}]"
        t = _TLS_EST.match(msg)
        if t:
            peer = t.group("peer").lower()
            cur = self._get(key)
            if not (cur and not cur.summary and not cur.qid and cur.peer == peer):
                cur = _Conn(_sid(line), peer)
            cur.level = t.group("level").lower()
            cur.summary = True
            cur.reused = t.group("use") == "reused"
            self._put(key, cur)
            return None
        c = _CERT_FAIL.match(msg) or _SSL_ERR.match(msg)
        if c:
            peer = c.group("peer").lower()
            why = c.groupdict().get("why")
            code = "ssl_connect"
            if why is not None:
                code = next((k for rx, k in _CERT_WHY if rx.match(why)), "other")
            cur = self._get(key)
            if not (cur and not cur.summary and not cur.qid and cur.peer == peer):
                cur = _Conn(_sid(line), peer)
            if not cur.cert_error:     # Postfix logs the first (innermost) error only
                cur.cert_error = code
            self._put(key, cur)
            return None
        d = parse_delivery(msg)
        if d is None:
            if _QID.match(msg) and " status=" in msg:
                self.refused += 1
            return None
        return self._delivery(line, ts, key, svc, d)

    def _delivery(self, line: str, m: re.Match, key: str, svc: str, d: dict
                  ) -> OutboundResult | None:
        when = self._timestamp(m)
        relay, qid, domain = d["relay"], d["qid"], d["domain"]
        status, text = d["status"], d["text"]
        conn: _Conn | None = None
        if relay != "none":
            cur = self._get(key)
            if cur is not None and cur.peer == relay.lower() and cur.qid in ("", qid):
                conn = cur
                conn.qid = qid
            else:
                conn = _Conn(_sid(line), relay.lower(), qid=qid)
                if d["conn_use"] and int(d["conn_use"]) > 1:
                    conn.reused = True      # a cached plain-text connection: already reported
                elif cur is None and self.horizon is not None:
                    c_, x_ = (float(v) for v in d["delays"].split("/")[2:])
                    if when - timedelta(seconds=c_ + x_) < self.horizon + timedelta(seconds=1):
                        conn.doubt = True   # its TLS line may be in the part we did not read
                self._put(key, conn)
        if status not in ("sent", "deferred", "bounced"):
            return None                     # address verification probes: state only
        level = conn.level if conn and not conn.doubt else "none"
        reason: OutboundReason | None = None
        if status != "sent":
            reason, level = self._classify(text, relay, level, conn)
        cert_error = conn.cert_error if conn else ""
        detail = text
        if cert_error and reason in (reasons.OUTBOUND_UNTRUSTED_CERT,
                                     reasons.OUTBOUND_NAME_MISMATCH,
                                     reasons.OUTBOUND_HANDSHAKE_FAILED):
            detail = f"{text}: {CERT_ERROR_TEXT.get(cert_error, cert_error)}"
        session_key = ""
        if (conn is not None and svc == "smtp" and domain and not conn.reused and not conn.doubt
                and domain not in conn.recorded
                and len(conn.recorded) < self.MAX_DOMAINS_PER_SESSION
                and not (status != "sent" and reason == reasons.OUTBOUND_OTHER
                         and level == "none" and not conn.cert_error)):
            conn.recorded.append(domain)
            session_key = f"{conn.sid}:{qid}:{domain}"
        return OutboundResult(qid, domain, relay, status, level, reason, when,  # type: ignore[arg-type]
                              d["rcpt"], d["dsn"], detail[:500], svc, session_key, cert_error)

    @staticmethod
    def _classify(text: str, relay: str, level: str, conn: _Conn | None
                  ) -> tuple[OutboundReason, TlsLevel]:
        namaddr = relay.lower().rsplit(":", 1)[0] if "]:" in relay else relay.lower()
        m = _NOT_OFFERED.match(text) or _REFUSED.match(text)
        if m:
            if m.group("host").lower() == namaddr:
                return reasons.OUTBOUND_STARTTLS_NOT_OFFERED, "none"
            return reasons.OUTBOUND_OTHER, level  # type: ignore[return-value]
        if text == "Cannot start TLS: handshake failure":
            return reasons.OUTBOUND_HANDSHAKE_FAILED, level  # type: ignore[return-value]
        if text == "certificate name mismatch":
            return reasons.OUTBOUND_NAME_MISMATCH, level  # type: ignore[return-value]
        if text == "Server certificate not trusted":
            return reasons.OUTBOUND_UNTRUSTED_CERT, level  # type: ignore[return-value]
        if text == "Server certificate not verified":
            # Postfix: TLS_CERT_IS_TRUSTED -> host mismatch, else not trusted (smtp_proto.c);
            # 3.7 logs a good chain naming another host as num=62 then "Untrusted".
            if level == "trusted" or (conn is not None and conn.cert_error == "hostname_mismatch"):
                return reasons.OUTBOUND_NAME_MISMATCH, level  # type: ignore[return-value]
            return reasons.OUTBOUND_UNTRUSTED_CERT, level  # type: ignore[return-value]
        return reasons.OUTBOUND_OTHER, level  # type: ignore[return-value]
