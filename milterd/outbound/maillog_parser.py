"""Parse Postfix smtp(8) log lines into typed outbound results (one delivery attempt each).

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
(cached connections can move between smtp processes), else ``none``.  Failure reasons (the
outbound set of :mod:`milterd.policy.reasons`) come from the delivery text plus the remembered
process state:

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

Following the file (rotation, restart safety, counting once) is
:mod:`milterd.outbound.maillog_follower`; the TLS-RPT record of a result is
:func:`milterd.outbound.tlsrpt.session_record`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Callable, Literal

from milterd.core.cache import TtlLruCache
from milterd.policy import reasons
from milterd.policy.reasons import OutboundReason

__all__ = ["OutboundResult", "MaillogParser", "TlsLevel"]

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
        # the last TLS state per smtp process id and per peer, bounded (the window is log time)
        self._by_pid: TtlLruCache[str, _PeerState] = TtlLruCache(max_peers)
        self._by_peer: TtlLruCache[str, _PeerState] = TtlLruCache(max_peers)

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
            self._by_pid.put(pid, st)
            self._by_peer.put(_peer_key(st.peer), st)
            return None
        c = _CERT_FAIL.match(msg) or _SSL_ERR.match(msg)
        if c:
            why = c.groupdict().get("why") or "SSL_connect error"
            st = _PeerState(c.group("peer"), "none", self._timestamp(m), why)
            self._by_pid.put(pid, st)
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
