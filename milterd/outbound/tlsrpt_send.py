"""``milterd tlsrpt send``: deliver each policy domain its daily RFC 8460 report, exactly once.

For every finished UTC day in the lookback window (:data:`LOOKBACK_DAYS`, or one ``--date``) and
every policy domain with TLS sessions that day (``<[outbound] state_dir>/tlsrpt-sessions.jsonl``,
written by the maillog follower), the TLSRPT record ``_smtp._tls.<domain>`` is looked up
(RFC 8460 §3: exactly one record starting ``v=TLSRPTv1;``, syntactically valid, with a ``rua``;
anything else means the domain does not take reports and gets none).  The domain's report
(:func:`milterd.outbound.tlsrpt.build_report`) goes to every ``rua``:

- ``mailto:`` — RFC 8460 §5.3 mail (``multipart/report; report-type="tlsrpt"``, a text part, the
  ``application/tlsrpt+gzip`` part named per §5.1, ``TLS-Report-Domain`` / ``TLS-Report-Submitter``
  headers and the §5.3 Subject), submitted by SMTP to the local MTA (``[tlsrpt] smtp``, default
  127.0.0.1:25), which DKIM-signs and relays it like any other mail of the host;
- ``https:`` — a POST of the gzip body as ``application/tlsrpt+gzip`` (CA bundle
  ``[tlsrpt] https_ca_file``, else the system's).

State protocol (``<state_dir>/tlsrpt-send.json``, replaced atomically and fsynced at every step,
one run at a time under ``tlsrpt-send.lock``):

- per (day, domain) ``reports`` entry: ``no_record`` (final), ``dns_retry`` (lookup failed
  temporarily), or ``pending``/``done`` with the report-id and the stored report
  (``tlsrpt-reports/<§5.1 file name>``): a retry sends the byte-identical report with the same
  report-id, so a receiver can recognise a duplicate;
- per (day, domain, rua) ``deliveries`` entry: ``claimed`` is written before the first byte goes
  out, ``committing`` just before the byte that completes the transfer (SMTP's final ``.``, the
  last byte of the HTTP body: until then the receiver holds an incomplete message it discards),
  then ``sent``, ``retry`` (with ``next_attempt``) or ``gave_up``.  A run that finds ``claimed``
  left by a crashed run retries (nothing can have been accepted); one that finds ``committing``
  cannot know whether the receiver took it and never resends (``unknown``, logged): a report is
  sent at most once per (day, domain, rua).

Temporary failures (SMTP 4xx, HTTP 408/425/429/5xx, connection/TLS/DNS errors) are retried with
backoff (:data:`BACKOFF`) until :data:`GIVE_UP_AFTER` after the first attempt; permanent ones
(SMTP 5xx, other HTTP statuses) give up at once.

Reporting loop: a report mailed to ``rua`` is itself an SMTP delivery that the follower records
as a TLS session of the rua's domain.  The local MTA's reply to DATA names the queue ID
(``250 2.0.0 Ok: queued as …``); the IDs are kept in the state (``submitted``) and sessions with
those queue IDs are left out of every report — no report is ever about a report delivery.

Outcomes: one log line per (day, domain, rua) — ``sent`` / ``retry later`` / ``gave up`` /
``no record`` — and ``<state_dir>/tlsrpt.prom`` (Prometheus text format, written atomically at the
end of every run): ``milterd_tlsrpt_reports_total{domain,result}`` and run gauges.  The daemon
exports that file on its ``/metrics`` through :class:`TlsRptFileCollector`; a node_exporter
textfile collector can read the same file.  ``domain`` labels are bounded: configured send-list
and partner domains, plus at most :data:`MAX_DOMAIN_LABELS` others, then ``other``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import errno
import fcntl
import gzip
import http.client
import json
import logging
import os
import re
import secrets
import smtplib
import ssl
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from pathlib import Path
from typing import Any, Callable, Iterable

from milterd.outbound.tlsrpt import build_report, load_sessions

__all__ = ["SendError", "TlsRptSender", "Outcome", "parse_tlsrpt_record", "TlsRptFileCollector",
           "STATE_FILE", "METRICS_FILE", "SESSIONS_FILE", "REPORTS_DIR"]

log = logging.getLogger("milterd.tlsrpt")

SESSIONS_FILE = "tlsrpt-sessions.jsonl"
STATE_FILE = "tlsrpt-send.json"
METRICS_FILE = "tlsrpt.prom"
REPORTS_DIR = "tlsrpt-reports"
LOCK_FILE = "tlsrpt-send.lock"

LOOKBACK_DAYS = 7                                # finished days considered by a run
FINISH_GRACE = _dt.timedelta(minutes=5)          # a day is finished this long after midnight UTC
GIVE_UP_AFTER = _dt.timedelta(days=2)            # after the first attempt
BACKOFF = tuple(_dt.timedelta(minutes=m) for m in (15, 30, 60, 120, 240, 480))
KEEP_DAYS = LOOKBACK_DAYS + 7                    # state and stored reports are pruned after this
MAX_DOMAIN_LABELS = 100
SMTP_TIMEOUT = 60.0
HTTP_TIMEOUT = 60.0
DNS_TIMEOUT = 10.0

UTC = _dt.timezone.utc
RESULTS = ("sent", "retry", "gave_up", "no_record", "unknown")


class SendError(Exception):
    """A configuration or environment problem that stops the run (exit 2)."""


class _Temporary(Exception):
    pass


class _Permanent(Exception):
    pass


@dataclass(frozen=True)
class Outcome:
    day: str
    domain: str
    rua: str | None          # None for domain-level outcomes (no record, DNS retry)
    result: str              # one of RESULTS, or "pending" (retry not yet due), "dry_run"
    detail: str = ""


# -- the TLSRPT record (RFC 8460 §3) ------------------------------------------------------------
_VERSION = re.compile(r"v=TLSRPTv1[ \t]*;")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+\Z")


def parse_tlsrpt_record(txts: Iterable[str] | None) -> tuple[list[str], str]:
    """The ``rua`` URIs of a domain's TLSRPT record, or ``([], why)`` when it takes no reports.

    ``txts`` are the TXT strings of ``_smtp._tls.<domain>`` (each record's strings joined, as
    §3 demands).  Records not starting ``v=TLSRPTv1;`` are discarded; unless exactly one is
    left, the domain does not implement TLSRPT.  That record must be syntactically valid (unknown
    extension fields are ignored) with one ``rua``; URIs other than mailto:/https: are ignored.
    """
    records = [t for t in (txts or ()) if _VERSION.match(t)]
    if not records:
        return [], "no TLSRPT record"
    if len(records) > 1:
        return [], f"{len(records)} TLSRPT records (exactly one is required)"
    fields = [f.strip(" \t") for f in records[0].split(";")]
    if fields[-1] == "":
        fields.pop()                         # the optional trailing delimiter
    rua: str | None = None
    for f in fields[1:]:
        name, eq, value = f.partition("=")
        if not eq or not _EXT_NAME.match(name) or not value:
            return [], f"malformed field {f[:40]!r}"
        if name == "rua":
            if rua is not None:
                return [], "more than one rua"
            rua = value
        elif not _EXT_VALUE.match(value):
            return [], f"malformed field {f[:40]!r}"
    if rua is None:
        return [], "no rua"
    uris = [u.strip(" \t") for u in rua.split(",")]
    if any(not u or re.search(r"[\s<>\"]", u) for u in uris):
        return [], "malformed rua"
    usable = [u for u in uris if _rua_kind(u)]
    if not usable:
        return [], "no mailto: or https: rua"
    return list(dict.fromkeys(usable)), ""


def _rua_kind(uri: str) -> str | None:
    scheme = uri.split(":", 1)[0].lower()
    if scheme == "mailto":
        return "mailto" if _mailto_address(uri) else None
    if scheme == "https":
        parts = urllib.parse.urlsplit(uri)
        return "https" if parts.hostname else None
    return None


def _mailto_address(uri: str) -> str | None:
    addr = urllib.parse.unquote(uri.split(":", 1)[1].split("?", 1)[0])
    local, at, domain = addr.rpartition("@")
    if not at or not local or not _hostname(domain) or re.search(r"[\s<>(),;:\\\"\[\]]", local):
        return None
    return addr


def _hostname(name: str) -> bool:
    name = name.rstrip(".")
    return bool(name) and len(name) <= 253 and all(
        re.fullmatch(r"[A-Za-z0-9_](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label)
        for label in name.split("."))


def display_uri(uri: str) -> str:
    """A rua for logs and state keys shown to people: no query, fragment or user info (an https
    endpoint may carry a token there)."""
    if uri.lower().startswith("https:"):
        p = urllib.parse.urlsplit(uri)
        host = p.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if p.port:
            netloc += f":{p.port}"
        return urllib.parse.urlunsplit(("https", netloc, p.path, "…" if p.query else "", ""))
    return uri.split("?", 1)[0]


# -- small helpers ------------------------------------------------------------------------------
def _iso(t: _dt.datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(s: Any) -> _dt.datetime | None:
    if not isinstance(s, str):
        return None
    try:
        t = _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _session_day(rec: dict) -> str | None:
    t = _parse_iso(rec.get("ts"))
    return t.astimezone(UTC).date().isoformat() if t else None


def _queue_ids(rec: dict) -> list[str]:
    out = []
    q = rec.get("queue_id")
    if isinstance(q, str) and q:
        out.append(q)
    qs = rec.get("queue_ids")
    if isinstance(qs, list):
        out += [x for x in qs if isinstance(x, str) and x]
    return out


def atomic_write(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new file, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _temporary_http(status: int) -> bool:
    return status in (408, 425, 429) or 500 <= status <= 599


# -- the sender ---------------------------------------------------------------------------------
@dataclass
class _Ctx:
    day: str
    domain: str
    report_id: str
    filename: str
    gz: bytes


@dataclass
class TlsRptSender:
    """One ``tlsrpt send`` run.  ``now`` and ``hook`` are for tests: ``hook(point, day, domain,
    rua)`` is called at ``claimed``, ``committing`` and ``delivered`` (after the receiver
    accepted, before ``sent`` is recorded); raising there simulates a crash."""

    config: Any
    now: _dt.datetime | None = None
    dry_run: bool = False
    hook: Callable[[str, str, str, str], None] | None = None
    dns: Any = None                       # an object with async txt(name); default DnsClient
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        t = self.config.tlsrpt
        missing = [k for k in ("organization", "contact") if not getattr(t, k).strip()]
        if missing:
            raise SendError("; ".join(f"tlsrpt.{k}: required to send reports" for k in missing))
        if not self.config.outbound.state_dir:
            raise SendError("outbound.state_dir: required (session records and send state)")
        self.state_dir = Path(self.config.outbound.state_dir)
        contact = t.contact.strip()
        addr = contact[7:] if contact.lower().startswith("mailto:") else contact
        addr = parseaddr(addr)[1]
        self.from_addr = addr if "@" in addr and _hostname(addr.rpartition("@")[2]) else None
        self.submitter = (t.submitter.strip().lower().rstrip(".") or
                          (self.from_addr.rpartition("@")[2].lower() if self.from_addr else ""))
        if not self.submitter or not _hostname(self.submitter):
            raise SendError("tlsrpt.submitter: required (a domain name) when tlsrpt.contact is "
                            "not an email address")
        if self.from_addr is None:
            self.from_addr = f"noreply@{self.submitter}"
        self.smtp_host = t.smtp.host if t.smtp else "127.0.0.1"
        self.smtp_port = t.smtp.port if t.smtp else 25
        if self.now is None:
            self.now = _dt.datetime.now(UTC)
        self.now = self.now.astimezone(UTC)
        labelled = set(self.config.domain_security.send_domains)
        for p in getattr(self.config, "partners", ()):
            labelled.add(getattr(p, "domain", getattr(p, "entry", "")))
        self._configured_labels = {d.lower().lstrip(".") for d in labelled if d}

    # -- entry point ----------------------------------------------------------------------
    def run(self, date: _dt.date | None = None) -> list[Outcome]:
        today = self.now.date()
        if date is not None:
            if self.now < _dt.datetime.combine(date + _dt.timedelta(days=1), _dt.time(),
                                               UTC) + FINISH_GRACE:
                raise SendError(f"--date {date}: the UTC day is not finished yet")
            if date < today - _dt.timedelta(days=LOOKBACK_DAYS):
                raise SendError(f"--date {date}: older than the {LOOKBACK_DAYS}-day lookback")
            days = [date]
        else:
            days = [today - _dt.timedelta(days=n) for n in range(LOOKBACK_DAYS, 0, -1)]
            days = [d for d in days if self.now >= _dt.datetime.combine(
                d + _dt.timedelta(days=1), _dt.time(), UTC) + FINISH_GRACE]
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SendError(f"outbound.state_dir: {exc.strerror}: {self.state_dir}") from None
        with self._lock():
            self.state = self._load_state()
            self._recover()
            sessions = self._sessions()
            for d in days:
                self._day(d.isoformat(), sessions)
            if not self.dry_run:
                self._prune(today)
                self.state["last_run"] = _iso(self.now)
                self._save()
                self._write_metrics()
        return self.outcomes

    # -- state -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self):
        path = self.state_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise SendError(f"{path}: another 'milterd tlsrpt send' is running") from None
                raise
            yield
        finally:
            os.close(fd)

    def _load_state(self) -> dict:
        path = self.state_dir / STATE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as exc:
            # Never guess: a lost state could mean sending every report again.
            raise SendError(f"{path}: unreadable send state ({exc}); fix or move it aside "
                            "(without it, reports of the last days may be sent again)") from None
        if not isinstance(data, dict):
            raise SendError(f"{path}: not a send state file")
        for k in ("reports", "deliveries", "submitted", "counters"):
            data.setdefault(k, {})
        data.setdefault("version", 1)
        return data

    def _save(self) -> None:
        if self.dry_run:
            return
        atomic_write(self.state_dir / STATE_FILE,
                     json.dumps(self.state, indent=1, sort_keys=True).encode())

    def _recover(self) -> None:
        """Entries a crashed run left mid-delivery."""
        changed = False
        for key, e in self.state["deliveries"].items():
            day, domain, rua = key.split("|", 2)
            if e.get("state") == "claimed":
                # nothing past the point of no return: the receiver discarded what it got
                e["state"] = "retry"
                e["next_attempt"] = _iso(self.now)
                e["last_error"] = "interrupted before the transfer completed"
                changed = True
                log.warning("tlsrpt send: %s %s %s: the last run stopped mid-delivery "
                            "(before the transfer completed): sending again, same report-id",
                            day, domain, display_uri(rua))
            elif e.get("state") == "committing":
                e["state"] = "unknown"
                changed = True
                self._count(domain, "unknown")
                self.outcomes.append(Outcome(day, domain, rua, "unknown",
                                             "interrupted while completing the transfer"))
                log.warning("tlsrpt send: %s %s %s: outcome unknown (the last run stopped while "
                            "completing the transfer): not sent again, to never send twice "
                            "(report-id %s)", day, domain, display_uri(rua), e.get("report_id"))
        if changed:
            self._save()

    def _prune(self, today: _dt.date) -> None:
        oldest = (today - _dt.timedelta(days=KEEP_DAYS)).isoformat()
        for key in [k for k in self.state["reports"] if k.split("|", 1)[0] < oldest]:
            e = self.state["reports"].pop(key)
            if e.get("file"):
                with contextlib.suppress(OSError):
                    (self.state_dir / REPORTS_DIR / e["file"]).unlink()
        for key in [k for k in self.state["deliveries"] if k.split("|", 1)[0] < oldest]:
            del self.state["deliveries"][key]
        cutoff = _iso(self.now - _dt.timedelta(days=KEEP_DAYS))
        for q in [q for q, ts in self.state["submitted"].items() if ts < cutoff]:
            del self.state["submitted"][q]

    # -- sessions ----------------------------------------------------------------------------
    def _sessions(self) -> dict[str, dict[str, list[dict]]]:
        """day -> domain -> records, without sessions that delivered one of our reports."""
        path = self.state_dir / SESSIONS_FILE
        try:
            records = load_sessions(path)
        except FileNotFoundError:
            records = []
        except OSError as exc:
            raise SendError(f"{path}: {exc.strerror}") from None
        ours = self.state["submitted"]
        out: dict[str, dict[str, list[dict]]] = {}
        skipped = 0
        for rec in records:
            day = _session_day(rec)
            domain = rec.get("policy_domain")
            if day is None or not isinstance(domain, str):
                continue
            if any(q in ours for q in _queue_ids(rec)):
                skipped += 1
                continue
            domain = domain.lower().rstrip(".")
            out.setdefault(day, {}).setdefault(domain, []).append(rec)
        if skipped:
            log.info("tlsrpt send: %d session(s) left out: deliveries of our own reports",
                     skipped)
        return out

    # -- one day ----------------------------------------------------------------------------
    def _day(self, day: str, sessions: dict[str, dict[str, list[dict]]]) -> None:
        domains = set(sessions.get(day, {}))
        domains |= {k.split("|", 1)[1] for k, e in self.state["reports"].items()
                    if k.startswith(day + "|")}
        for domain in sorted(domains):
            if not _hostname(domain):
                log.info("tlsrpt send: %s: %r is not a domain name: no report", day, domain[:80])
                continue
            self._domain(day, domain, sessions.get(day, {}).get(domain, []))

    def _domain(self, day: str, domain: str, recs: list[dict]) -> None:
        key = f"{day}|{domain}"
        entry = self.state["reports"].get(key)
        state = entry.get("state") if entry else None
        if state in ("no_record", "done", "gave_up"):
            return
        if state == "dns_retry":
            if (_parse_iso(entry.get("next_attempt")) or self.now) > self.now:
                self.outcomes.append(Outcome(day, domain, None, "pending", "DNS lookup"))
                return
        if state in (None, "dns_retry"):
            entry = self._lookup(day, domain, recs, entry)
            if entry is None or entry.get("state") != "pending":
                return
        ctx = self._context(day, domain, entry)
        if ctx is None:
            return
        for rua in entry["ruas"]:
            self._delivery(ctx, rua)
        finals = ("sent", "gave_up", "unknown")
        if not self.dry_run and all(
                self.state["deliveries"].get(f"{key}|{r}", {}).get("state") in finals
                for r in entry["ruas"]):
            entry["state"] = "done"
            self._save()

    def _lookup(self, day: str, domain: str, recs: list[dict], entry: dict | None) -> dict | None:
        key = f"{day}|{domain}"
        name = f"_smtp._tls.{domain}"
        from milterd.outbound.dns import DnsTempError

        try:
            txts = asyncio.run(self._dns().txt(name))
        except DnsTempError as exc:
            first = _parse_iso((entry or {}).get("first_attempt")) or self.now
            if self.now - first >= GIVE_UP_AFTER:
                self._final_domain(key, "gave_up", f"DNS: {exc}")
                self.outcomes.append(Outcome(day, domain, None, "gave_up", f"DNS: {exc}"))
                self._count(domain, "gave_up")
                log.warning("tlsrpt send: %s %s: gave up: TLSRPT record lookup kept failing "
                            "(%s) since %s", day, domain, exc, _iso(first))
                return None
            attempts = int((entry or {}).get("attempts", 0)) + 1
            nxt = self.now + BACKOFF[min(attempts, len(BACKOFF)) - 1]
            if not self.dry_run:
                self.state["reports"][key] = {"state": "dns_retry", "first_attempt": _iso(first),
                                              "attempts": attempts, "next_attempt": _iso(nxt),
                                              "last_error": str(exc)}
                self._save()
            self.outcomes.append(Outcome(day, domain, None, "retry", f"DNS: {exc}"))
            self._count(domain, "retry")
            log.warning("tlsrpt send: %s %s: retry later: TLSRPT record lookup failed (%s); "
                        "next attempt after %s", day, domain, exc, _iso(nxt))
            return None
        ruas, why = parse_tlsrpt_record(txts)
        if not ruas:
            self._final_domain(key, "no_record", why)
            self.outcomes.append(Outcome(day, domain, None, "no_record", why))
            self._count(domain, "no_record")
            log.info("tlsrpt send: %s %s: no record: %s at %s: no report", day, domain, why, name)
            return None
        if not recs:
            return None
        unique = secrets.token_hex(8)
        report_id = f"{day.replace('-', '')}.{unique}.{domain}@{self.submitter}"
        report = build_report(recs, day, self.config.tlsrpt.organization,
                              self.config.tlsrpt.contact, report_id, policy_domain=domain,
                              sending_mta_ip=self.config.tlsrpt.sending_ip)
        if not report.get("policies"):
            return None
        begin = int(_dt.datetime.combine(_dt.date.fromisoformat(day), _dt.time(), UTC)
                    .timestamp())
        filename = f"{self.submitter}!{domain}!{begin}!{begin + 86399}!{unique}.json.gz"
        gz = gzip.compress(json.dumps(report, indent=1).encode("utf-8"), mtime=0)
        entry = {"state": "pending", "report_id": report_id, "file": filename, "ruas": ruas,
                 "built": _iso(self.now)}
        if self.dry_run:
            self._dry = getattr(self, "_dry", {})
            self._dry[key] = (entry, gz)
            return entry
        (self.state_dir / REPORTS_DIR).mkdir(exist_ok=True)
        atomic_write(self.state_dir / REPORTS_DIR / filename, gz)
        self.state["reports"][key] = entry
        self._save()
        return entry

    def _final_domain(self, key: str, state: str, why: str) -> None:
        if not self.dry_run:
            self.state["reports"][key] = {"state": state, "reason": why, "at": _iso(self.now)}
            self._save()

    def _context(self, day: str, domain: str, entry: dict) -> _Ctx | None:
        dry = getattr(self, "_dry", {}).get(f"{day}|{domain}")
        if dry is not None:
            return _Ctx(day, domain, entry["report_id"], entry["file"], dry[1])
        path = self.state_dir / REPORTS_DIR / entry["file"]
        try:
            gz = path.read_bytes()
        except OSError as exc:
            log.error("tlsrpt send: %s %s: stored report %s unreadable (%s): not sent",
                      day, domain, path, exc.strerror)
            return None
        return _Ctx(day, domain, entry["report_id"], entry["file"], gz)

    # -- one delivery -----------------------------------------------------------------------
    def _delivery(self, ctx: _Ctx, rua: str) -> None:
        key = f"{ctx.day}|{ctx.domain}|{rua}"
        shown = display_uri(rua)
        e = self.state["deliveries"].get(key)
        if e and e.get("state") in ("sent", "gave_up", "unknown"):
            return
        if e and e.get("state") == "retry" and (
                _parse_iso(e.get("next_attempt")) or self.now) > self.now:
            self.outcomes.append(Outcome(ctx.day, ctx.domain, rua, "pending",
                                         f"next attempt after {e.get('next_attempt')}"))
            return
        if self.dry_run:
            self.outcomes.append(Outcome(ctx.day, ctx.domain, rua, "dry_run", ctx.report_id))
            log.info("tlsrpt send: %s %s %s: would send report %s (dry run)", ctx.day,
                     ctx.domain, shown, ctx.report_id)
            return
        e = e or {"report_id": ctx.report_id, "attempts": 0, "first_attempt": _iso(self.now),
                  "message_id": make_msgid(domain=self.submitter)}
        e.update(state="claimed", attempts=int(e.get("attempts", 0)) + 1,
                 last_attempt=_iso(self.now))
        self.state["deliveries"][key] = e
        self._save()
        self._hook("claimed", ctx, rua)

        def commit() -> None:
            e["state"] = "committing"
            self._save()
            self._hook("committing", ctx, rua)

        try:
            if rua.lower().startswith("mailto:"):
                detail = self._mail(ctx, rua, e, commit)
            else:
                detail = self._post(ctx, rua, commit)
        except (_Temporary, _Permanent) as exc:
            first = _parse_iso(e.get("first_attempt")) or self.now
            if isinstance(exc, _Temporary) and self.now - first < GIVE_UP_AFTER:
                nxt = self.now + BACKOFF[min(e["attempts"], len(BACKOFF)) - 1]
                e.update(state="retry", next_attempt=_iso(nxt), last_error=str(exc))
                self._save()
                self.outcomes.append(Outcome(ctx.day, ctx.domain, rua, "retry", str(exc)))
                self._count(ctx.domain, "retry")
                log.warning("tlsrpt send: %s %s %s: retry later: %s (attempt %d; next after "
                            "%s)", ctx.day, ctx.domain, shown, exc, e["attempts"], _iso(nxt))
            else:
                why = "permanent failure" if isinstance(exc, _Permanent) else (
                    f"failing since {_iso(first)}")
                e.update(state="gave_up", last_error=str(exc), gave_up=_iso(self.now))
                self._save()
                self.outcomes.append(Outcome(ctx.day, ctx.domain, rua, "gave_up", str(exc)))
                self._count(ctx.domain, "gave_up")
                log.error("tlsrpt send: %s %s %s: gave up (%s): %s (report-id %s)", ctx.day,
                          ctx.domain, shown, why, exc, ctx.report_id)
            return
        self._hook("delivered", ctx, rua)
        e.update(state="sent", sent_at=_iso(self.now))
        e.pop("next_attempt", None)
        self._save()
        self.outcomes.append(Outcome(ctx.day, ctx.domain, rua, "sent", detail))
        self._count(ctx.domain, "sent")
        log.info("tlsrpt send: %s %s %s: sent (report-id %s%s)", ctx.day, ctx.domain, shown,
                 ctx.report_id, f", {detail}" if detail else "")

    def _hook(self, point: str, ctx: _Ctx, rua: str) -> None:
        if self.hook is not None:
            self.hook(point, ctx.day, ctx.domain, rua)

    # -- mailto: ------------------------------------------------------------------------------
    def message(self, ctx: _Ctx, to: str, message_id: str) -> bytes:
        """The RFC 8460 §5.3 report mail."""
        org = self.config.tlsrpt.organization
        msg = EmailMessage()
        msg["From"] = self.from_addr
        msg["To"] = to
        msg["Subject"] = (f"Report Domain: {ctx.domain} Submitter: {self.submitter} "
                          f"Report-ID: <{ctx.report_id}>")
        msg["Date"] = format_datetime(self.now)
        msg["Message-ID"] = message_id
        msg["TLS-Report-Domain"] = ctx.domain
        msg["TLS-Report-Submitter"] = self.submitter
        msg["Auto-Submitted"] = "auto-generated"
        # RFC 8460 §5.3: reports must get through despite TLS failures (RFC 8689 TLS-Required)
        msg["TLS-Required"] = "No"
        msg.set_content(
            f"This is an aggregate SMTP TLS report (RFC 8460) from {org} ({self.submitter})\n"
            f"for the policy domain {ctx.domain}, UTC day {ctx.day}.\n"
            f"Report-ID: {ctx.report_id}\n")
        msg.add_attachment(ctx.gz, maintype="application", subtype="tlsrpt+gzip",
                           filename=ctx.filename)
        msg.set_type("multipart/report")
        msg.set_param("report-type", "tlsrpt")
        return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))

    def _mail(self, ctx: _Ctx, rua: str, e: dict, commit: Callable[[], None]) -> str:
        to = _mailto_address(rua)
        assert to
        data = self.message(ctx, to, e["message_id"])
        data = re.sub(rb"(?m)^\.", b"..", data)
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        where = f"{self.smtp_host}:{self.smtp_port}"
        try:
            s = smtplib.SMTP(self.smtp_host, self.smtp_port, timeout=SMTP_TIMEOUT)
        except (OSError, smtplib.SMTPException) as exc:
            raise _Temporary(f"SMTP {where}: cannot connect: {exc}") from None
        try:
            self._smtp_ok(s.ehlo(), (250,), "EHLO")
            self._smtp_ok(s.mail(self.from_addr), (250,), "MAIL FROM")
            self._smtp_ok(s.rcpt(to), (250, 251), "RCPT TO")
            self._smtp_ok(s.docmd("DATA"), (354,), "DATA")
            s.send(data)
            commit()
            s.send(b".\r\n")
            code, text = s.getreply()
            self._smtp_ok((code, text), (250,), "end of data")
            reply = text.decode("utf-8", "replace")
            m = re.search(r"queued as ([0-9A-Za-z]+)", reply)
            if m:
                e["queue_id"] = m.group(1)
                self.state["submitted"][m.group(1)] = _iso(self.now)
            else:
                log.warning("tlsrpt send: %s did not name a queue ID (%r): this report's own "
                            "delivery may appear in the next report", where, reply[:120])
            with contextlib.suppress(OSError, smtplib.SMTPException):
                s.quit()
            return f"submitted to {where}" + (f", queued as {m.group(1)}" if m else "")
        except (OSError, smtplib.SMTPException) as exc:
            raise _Temporary(f"SMTP {where}: {type(exc).__name__}: {exc}") from None
        finally:
            with contextlib.suppress(OSError):
                s.close()

    @staticmethod
    def _smtp_ok(reply: tuple[int, bytes], ok: tuple[int, ...], stage: str) -> None:
        code, text = reply
        if code in ok:
            return
        msg = f"SMTP {stage}: {code} {text.decode('utf-8', 'replace')[:200]}"
        if 400 <= code < 500 or code <= 0:
            raise _Temporary(msg)
        raise _Permanent(msg)

    # -- https: --------------------------------------------------------------------------------
    def _post(self, ctx: _Ctx, rua: str, commit: Callable[[], None]) -> str:
        p = urllib.parse.urlsplit(rua)
        shown = display_uri(rua)
        ctxt = ssl.create_default_context(cafile=self.config.tlsrpt.https_ca_file or None)
        path = (p.path or "/") + (f"?{p.query}" if p.query else "")
        from milterd import __version__

        conn = http.client.HTTPSConnection(p.hostname, p.port or 443, timeout=HTTP_TIMEOUT,
                                           context=ctxt)
        try:
            conn.putrequest("POST", path, skip_accept_encoding=True)
            conn.putheader("Content-Type", "application/tlsrpt+gzip")
            conn.putheader("Content-Length", str(len(ctx.gz)))
            conn.putheader("User-Agent", f"milterd/{__version__} (RFC 8460 reporter)")
            conn.endheaders()
            conn.send(ctx.gz[:-1])
            commit()
            conn.send(ctx.gz[-1:])
            resp = conn.getresponse()
            status = resp.status
            resp.read(65536)
        except (OSError, http.client.HTTPException) as exc:
            raise _Temporary(f"HTTPS {shown}: {type(exc).__name__}: {exc}") from None
        finally:
            conn.close()
        if 200 <= status <= 299:
            return f"HTTP {status}"
        if _temporary_http(status):
            raise _Temporary(f"HTTPS {shown}: HTTP {status}")
        raise _Permanent(f"HTTPS {shown}: HTTP {status}")

    def _dns(self):
        if self.dns is None:
            from milterd.outbound.dns import DnsClient

            servers = self.config.outbound.dns_servers
            self.dns = DnsClient(list(servers) if servers else None, timeout=DNS_TIMEOUT / 2,
                                 lifetime=DNS_TIMEOUT)
        return self.dns

    # -- metrics --------------------------------------------------------------------------------
    def _label(self, domain: str) -> str:
        labels = self.state.setdefault("domain_labels", [])
        if domain in self._configured_labels or domain in labels:
            return domain
        if len(labels) < MAX_DOMAIN_LABELS:
            labels.append(domain)
            return domain
        return "other"

    def _count(self, domain: str, result: str) -> None:
        if self.dry_run:
            return
        k = f"{self._label(domain)}|{result}"
        self.state["counters"][k] = int(self.state["counters"].get(k, 0)) + 1

    def _write_metrics(self) -> None:
        lines = [
            "# HELP milterd_tlsrpt_reports_total TLS-RPT report deliveries (and domains without "
            "a TLSRPT record) by policy domain and result, from 'milterd tlsrpt send'",
            "# TYPE milterd_tlsrpt_reports_total counter"]
        for k in sorted(self.state["counters"]):
            domain, result = k.rsplit("|", 1)
            lines.append(f'milterd_tlsrpt_reports_total{{domain="{_esc(domain)}",'
                         f'result="{_esc(result)}"}} {self.state["counters"][k]}')
        pending = sum(1 for e in self.state["deliveries"].values()
                      if e.get("state") in ("retry", "claimed"))
        pending += sum(1 for e in self.state["reports"].values() if e.get("state") == "dns_retry")
        lines += [
            "# HELP milterd_tlsrpt_pending_deliveries Report deliveries waiting for a retry",
            "# TYPE milterd_tlsrpt_pending_deliveries gauge",
            f"milterd_tlsrpt_pending_deliveries {pending}",
            "# HELP milterd_tlsrpt_last_run_timestamp_seconds End of the last completed "
            "'milterd tlsrpt send' run",
            "# TYPE milterd_tlsrpt_last_run_timestamp_seconds gauge",
            f"milterd_tlsrpt_last_run_timestamp_seconds {self.now.timestamp():.0f}",
        ]
        atomic_write(self.state_dir / METRICS_FILE, ("\n".join(lines) + "\n").encode(),
                     mode=0o644)


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class TlsRptFileCollector:
    """Exports ``<state_dir>/tlsrpt.prom`` (written by ``milterd tlsrpt send``) on the daemon's
    ``/metrics``: ``registry.register(TlsRptFileCollector(state_dir))``.  Only
    ``milterd_tlsrpt_*`` families are passed on; a missing or unreadable file exports nothing."""

    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.path = Path(state_dir) / METRICS_FILE

    def describe(self) -> list:
        return []

    def collect(self):
        from prometheus_client.parser import text_string_to_metric_families

        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError:
            return
        try:
            families = list(text_string_to_metric_families(text))
        except Exception as exc:  # a half-edited file must not break /metrics
            log.warning("%s: not in Prometheus text format: %s", self.path, exc)
            return
        for fam in families:
            if fam.name.startswith("milterd_tlsrpt_"):
                yield fam

