"""``milterd tlsrpt send``: deliver each policy domain its daily RFC 8460 report, exactly once,
for the whole fleet.

Every MX host runs this from the same timer.  The session records of *all* hosts are in the
store (``[store] url``, kind ``"tlsrpt-session"``, shipped there by each host's daemon), so each
policy domain gets **one** report a day whose counts are the sum of every host's sessions, with
each host's own ``sending-mta-ip`` in the failure details.  Which host sends it is decided by
claims in the store (a row with a lease, :meth:`milterd.store.api.Store.claim`), not by a file
lock: whichever host claims first does the work, the others skip it.

For every finished UTC day in the lookback window (:data:`LOOKBACK_DAYS`, or one ``--date``) and
every policy domain with sessions that day, the TLSRPT record ``_smtp._tls.<domain>`` is looked
up (RFC 8460 §3: exactly one record starting ``v=TLSRPTv1;``, syntactically valid, with a
``rua``; anything else means the domain does not take reports and gets none).  The domain's
report (:func:`milterd.outbound.tlsrpt.build_report`) goes to every ``rua``:

- ``mailto:`` — RFC 8460 §5.3 mail (``multipart/report; report-type="tlsrpt"``, a text part, the
  ``application/tlsrpt+gzip`` part named per §5.1, ``TLS-Report-Domain`` / ``TLS-Report-Submitter``
  headers and the §5.3 Subject), submitted by SMTP to the local MTA (``[tlsrpt] smtp``, default
  127.0.0.1:25), which DKIM-signs and relays it like any other mail of the host;
- ``https:`` — a POST of the gzip body as ``application/tlsrpt+gzip`` (CA bundle
  ``[tlsrpt] https_ca_file``, else the system's).

State protocol — store jobs (claim with a lease of :data:`LEASE` seconds, state saved with
``job_put``, which succeeds only while this run still owns the job; the owner is
``<[store] host>/<pid>/<random>``, one per run, so two runs on one host exclude each other too):

- ns ``"tlsrpt-report"``, key ``DAY|DOMAIN``: ``no_record`` (final), ``dns_retry`` (lookup
  failed temporarily, with ``next_attempt``), ``gave_up``, or ``pending``/``done`` with the
  report-id, the ruas and the report itself (``gz``, base64): a retry — by any host — sends the
  byte-identical report with the same report-id, so a receiver can recognise a duplicate;
- ns ``"tlsrpt"``, key ``DAY|DOMAIN|RUA``: ``claimed`` is saved before the first byte goes out,
  ``committing`` just before the byte that completes the transfer (SMTP's final ``.``, the last
  byte of the HTTP body: until then the receiver holds an incomplete message it discards), then
  ``sent``, ``retry`` (with ``next_attempt``) or ``gave_up``.  A host that finds ``claimed``
  left by a run whose lease ran out (it died) sends again (nothing can have been accepted); one
  that finds ``committing`` cannot know whether the receiver took it and never resends
  (``unknown``, logged).  A run that lost its claim (its lease ran out and another host took
  the job) finds out when saving ``committing`` and stops before the completing byte: a report
  is sent at most once per (day, domain, rua), fleet-wide, whatever the clocks say.

Temporary failures (SMTP 4xx, HTTP 408/425/429/5xx, connection/TLS/DNS errors) are retried with
backoff (:data:`BACKOFF`) until :data:`GIVE_UP_AFTER` after the first attempt, by whichever host
runs when the retry is due; permanent ones (SMTP 5xx, other HTTP statuses) give up at once.

A store that cannot be reached stops the run (:class:`StoreUnavailable`, exit 75): nothing is
sent without a saved claim, and the timer's next run tries again.

Reporting loop: a report mailed to ``rua`` is itself an SMTP delivery that the follower records
as a TLS session of the rua's domain.  The local MTA's reply to DATA names the queue ID
(``250 2.0.0 Ok: queued as …``); each is stored as a record of kind ``"tlsrpt-submitted"`` (key
``HOST:QUEUEID``), and sessions of that host with those queue IDs are left out of every report,
whichever host builds it — no report is ever about a report delivery.

Waiting for every host (watermarks): a report built at 00:05 UTC would miss the records still
waiting in a host's journal (the store was down, its shipper is behind).  Each host's shipper
writes a *watermark* (cache ns ``"store-watermark"``, key: the host, ``{"ts": …}``: everything it
recorded before ``ts`` is in the store) and a roster record per day (kind ``"store-host"``; see
:mod:`milterd.store.spool`).  A day's report is built only when every host on the roster of the
last :data:`LOOKBACK_DAYS` days, and every host with sessions for that domain that day, has a
watermark at or past the end of the day; until then the domain is ``held`` (logged, nothing
saved; the next run looks again).  :data:`HOLD_LIMIT` after the end of the day it is built
anyway, and the hosts still missing are logged (and kept in the report's job state as
``missing_hosts``): a host that is gone for good delays reports by that much for a week, never
stops them.  The timer must therefore run more than once in those hours (e.g. hourly).

Outcomes: one log line per (day, domain, rua) — ``sent`` / ``retry later`` / ``gave up`` /
``no record`` — and ``<state_dir>/tlsrpt.prom`` (Prometheus text format, written atomically at the
end of every run): ``milterd_tlsrpt_reports_total{domain,result}`` counts what *this host* did
(so the sum over the fleet is what was sent), ``milterd_tlsrpt_pending_deliveries`` the retries
this host attempted last.  The counters live in ``<state_dir>/tlsrpt-counters.json`` (this
host's, nothing shared).  The daemon exports the .prom file on its ``/metrics`` through
:class:`TlsRptFileCollector`; a node_exporter textfile collector can read the same file.
``domain`` labels are bounded: configured send-list and partner domains, plus at most
:data:`MAX_DOMAIN_LABELS` others, then ``other``.

Upgrade: the state file of the file-based version (``<state_dir>/tlsrpt-send.json``, with its
stored reports) is imported into the store by the first run (jobs that do not exist yet; its
queue IDs; its counters), then renamed ``tlsrpt-send.json.imported``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as _dt
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
import time
import urllib.parse
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from pathlib import Path
from typing import Any, Callable, Iterable

from milterd.core.files import atomic_write
from milterd.outbound.tlsrpt import build_report
from milterd.store.api import Record, Store, StoreError, open_store, redact
from milterd.store.spool import HOST_KIND, WATERMARK_NS

__all__ = ["SendError", "StoreUnavailable", "TlsRptSender", "Outcome", "parse_tlsrpt_record",
           "TlsRptFileCollector", "METRICS_FILE", "COUNTERS_FILE", "LEGACY_STATE_FILE",
           "NS_REPORT", "NS_DELIVERY", "SESSION_KIND", "SUBMITTED_KIND", "LEASE"]

log = logging.getLogger("milterd.tlsrpt")

METRICS_FILE = "tlsrpt.prom"
COUNTERS_FILE = "tlsrpt-counters.json"
LEGACY_STATE_FILE = "tlsrpt-send.json"            # the file-based version's state (imported)
LEGACY_REPORTS_DIR = "tlsrpt-reports"

SESSION_KIND = "tlsrpt-session"                  # records: one per SMTP session, every host
SUBMITTED_KIND = "tlsrpt-submitted"              # records: queue IDs of our report submissions
NS_REPORT = "tlsrpt-report"                      # jobs: DAY|DOMAIN
NS_DELIVERY = "tlsrpt"                           # jobs: DAY|DOMAIN|RUA
LEASE = 600.0                                    # seconds a claim holds without being renewed

LOOKBACK_DAYS = 7                                # finished days considered by a run
FINISH_GRACE = _dt.timedelta(minutes=5)          # a day is finished this long after midnight UTC
HOLD_LIMIT = _dt.timedelta(hours=6)              # after midnight: stop waiting for watermarks
GIVE_UP_AFTER = _dt.timedelta(days=2)            # after the first attempt
BACKOFF = tuple(_dt.timedelta(minutes=m) for m in (15, 30, 60, 120, 240, 480))
KEEP_DAYS = LOOKBACK_DAYS + 7                    # submitted queue IDs are looked at this long
MAX_DOMAIN_LABELS = 100
SMTP_TIMEOUT = 60.0
HTTP_TIMEOUT = 60.0
DNS_TIMEOUT = 10.0
EXIT_STORE_DOWN = 75                             # EX_TEMPFAIL: the timer's next run retries

UTC = _dt.timezone.utc
RESULTS = ("sent", "retry", "gave_up", "no_record", "unknown")
_FINAL = ("sent", "gave_up", "unknown")
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


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


def _queue_ids(rec: dict) -> list[str]:
    out = []
    q = rec.get("queue_id")
    if isinstance(q, str) and q:
        out.append(q)
    qs = rec.get("queue_ids")
    if isinstance(qs, list):
        out += [x for x in qs if isinstance(x, str) and x]
    return out


def _temporary_http(status: int) -> bool:
    return status in (408, 425, 429) or 500 <= status <= 599


class StoreUnavailable(SendError):
    """The store cannot be reached (exit :data:`EXIT_STORE_DOWN`); nothing more is sent."""


class _Lost(Exception):
    """This run no longer owns a job: its lease ran out and another host took it over."""


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
    accepted, before ``sent`` is recorded); raising there (or killing the process) simulates a
    crash.  ``store`` is opened from ``[store] url`` unless given."""

    config: Any
    now: _dt.datetime | None = None
    dry_run: bool = False
    hook: Callable[[str, str, str, str], None] | None = None
    dns: Any = None                       # an object with async txt(name); default DnsClient
    store: Store | None = None
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        t = self.config.tlsrpt
        missing = [k for k in ("organization", "contact") if not getattr(t, k).strip()]
        if missing:
            raise SendError("; ".join(f"tlsrpt.{k}: required to send reports" for k in missing))
        if not self.config.outbound.state_dir:
            raise SendError("outbound.state_dir: required (counters and tlsrpt.prom)")
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
        self._t0 = time.monotonic()
        self.host = self.config.store.host_name
        self.owner = f"{self.host}/{os.getpid()}/{secrets.token_hex(4)}"
        labelled = set(self.config.domain_security.send_domains)
        for p in getattr(self.config, "partners", ()):
            labelled.add(getattr(p, "domain", getattr(p, "entry", "")))
        self._configured_labels = {d.lower().lstrip(".") for d in labelled if d}
        self._counts: dict[tuple[str, str], int] = {}
        self._pending: int | None = None
        self._roster: set[str] | None = None          # hosts of the last LOOKBACK_DAYS days
        self._marks: dict[str, float | None] = {}     # host -> its watermark (this run's view)

    def _ts(self) -> float:
        """Unix time for leases: ``now`` advanced by the real time this run has taken."""
        return self.now.timestamp() + (time.monotonic() - self._t0)

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
        legacy = self._read_legacy()
        opened = self.store is None
        url = self.config.store.url
        try:
            if self.store is None:
                self.store = open_store(url)
            if not self.dry_run:
                self.store.migrate()
                if legacy is not None:
                    self._import_legacy(legacy, today)
            self._submitted = self._load_submitted(today)
            for d in days:
                self._day(d.isoformat())
            if not self.dry_run:
                self._pending = self._count_pending(days)
        except StoreError as exc:
            log.error("tlsrpt send: store %s unavailable: %s; stopped (nothing is sent without "
                      "a saved claim; the next run continues)", redact(url), exc)
            raise StoreUnavailable(f"store {redact(url)} unavailable: {exc}") from None
        finally:
            if not self.dry_run:
                self._write_metrics()
            if opened and self.store is not None:
                self.store.close()
                self.store = None
        return self.outcomes

    # -- store plumbing -----------------------------------------------------------------------
    def _put(self, ns: str, key: str, state: dict, lease: float) -> None:
        """Save a job's state (``lease`` 0 releases it); :class:`_Lost` if another host took it."""
        if not self.store.job_put(ns, key, self.owner, state, lease, self._ts()):
            raise _Lost(f"{ns} {key}")

    def _release(self, ns: str, key: str, state: dict) -> None:
        with contextlib.suppress(_Lost):
            self._put(ns, key, state, 0)

    def _load_submitted(self, today: _dt.date) -> set[tuple[str, str]]:
        """(host, queue ID) of our report submissions fleet-wide; host "" matches any host."""
        recs = self.store.records(SUBMITTED_KIND, today - _dt.timedelta(days=KEEP_DAYS), today)
        return {(str(r.data.get("mta_host", r.host)), str(r.data.get("queue_id")))
                for r in recs if r.data.get("queue_id")}

    def _ours(self, host: str, rec: dict) -> bool:
        return any((host, q) in self._submitted or ("", q) in self._submitted
                   for q in _queue_ids(rec))

    def _sessions(self, day: str, names: list[str]) -> tuple[list[dict], set[str]]:
        """The day's session records of every host for one domain (as stored, possibly under
        several spellings), ready for build_report; our own report deliveries left out; and the
        hosts that made them."""
        out: list[dict] = []
        hosts: set[str] = set()
        skipped = 0
        default_ip = self.config.tlsrpt.sending_ip
        for name in names:
            for r in self.store.records(SESSION_KIND, day, domain=name):
                hosts.add(r.host)
                rec = dict(r.data)
                if self._ours(r.host, rec):
                    skipped += 1
                    continue
                rec["key"] = r.key            # fleet-unique (host:key); build_report counts once
                rec["policy_domain"] = str(rec.get("policy_domain") or name).lower().rstrip(".")
                if not rec.get("sending_mta_ip"):
                    # each host's own address; this host's config only for its own records
                    rec["sending_mta_ip"] = rec.get("sending_ip") or (
                        default_ip if r.host == self.host else None)
                out.append(rec)
        if skipped:
            log.info("tlsrpt send: %s %s: %d session(s) left out: deliveries of our own "
                     "reports", day, names[0].lower().rstrip("."), skipped)
        return out, hosts

    # -- one day ----------------------------------------------------------------------------
    def _day(self, day: str) -> None:
        reports = self.store.jobs(NS_REPORT, f"{day}|")
        deliveries = self.store.jobs(NS_DELIVERY, f"{day}|")
        names: dict[str, list[str]] = {}
        for d in self.store.record_domains(SESSION_KIND, day):
            names.setdefault(d.lower().rstrip("."), []).append(d)
        for k in reports:
            names.setdefault(k.split("|", 1)[1], [])
        for domain in sorted(names):
            if not _hostname(domain):
                log.info("tlsrpt send: %s: %r is not a domain name: no report", day, domain[:80])
                continue
            job = reports.get(f"{day}|{domain}")
            try:
                self._domain(day, domain, names[domain] or [domain],
                             job.state if job else {}, deliveries)
            except _Lost as exc:
                self.outcomes.append(Outcome(day, domain, None, "elsewhere", "claim lost"))
                log.warning("tlsrpt send: %s %s: another host took over (%s): stopped here",
                            day, domain, exc)

    def _due(self, st: dict) -> bool:
        return (_parse_iso(st.get("next_attempt")) or self.now) <= self.now

    def _domain(self, day: str, domain: str, names: list[str], seen: dict,
                deliveries: dict) -> None:
        key = f"{day}|{domain}"
        if seen.get("state") in ("no_record", "done", "gave_up"):
            return
        if seen.get("state") == "dns_retry" and not self._due(seen):
            self.outcomes.append(Outcome(day, domain, None, "pending", "DNS lookup"))
            return
        if self.dry_run:
            st = seen if seen.get("state") == "pending" else self._lookup(day, domain, names,
                                                                          seen)
            if st and st.get("state") == "pending":
                ctx = self._context(day, domain, st)
                for rua in st["ruas"]:
                    e = deliveries.get(f"{key}|{rua}")
                    if e is None or e.state.get("state") not in _FINAL:
                        self.outcomes.append(Outcome(day, domain, rua, "dry_run", ctx.report_id))
                        log.info("tlsrpt send: %s %s %s: would send report %s (dry run)", day,
                                 domain, display_uri(rua), ctx.report_id)
            return
        job = self.store.claim(NS_REPORT, key, self.owner, LEASE, self._ts())
        if job is None:
            self.outcomes.append(Outcome(day, domain, None, "elsewhere", "another host has it"))
            log.info("tlsrpt send: %s %s: being handled by another host", day, domain)
            return
        st = dict(job.state)                       # the state now, not when listed
        if st.get("state") in ("no_record", "done", "gave_up") or (
                st.get("state") == "dns_retry" and not self._due(st)):
            self._release(NS_REPORT, key, st)
            return
        if st.get("state") != "pending":
            new = self._lookup(day, domain, names, st)
            if new is None:
                self._release(NS_REPORT, key, st)
                return
            st = new
            if st.get("state") != "pending":
                self._put(NS_REPORT, key, st, 0)
                return
            self._put(NS_REPORT, key, st, LEASE)   # the report, before any rua gets it
        ctx = self._context(day, domain, st)
        finals = []
        for rua in st["ruas"]:
            finals.append(self._delivery(ctx, rua, deliveries.get(f"{key}|{rua}")))
            self._put(NS_REPORT, key, st, LEASE)   # renew the domain's lease
        if all(finals):
            st["state"] = "done"
            st["done"] = _iso(self.now)
        self._put(NS_REPORT, key, st, 0)

    def _lookup(self, day: str, domain: str, names: list[str], st: dict) -> dict | None:
        """The domain's new report state after looking up its record (None: nothing to do)."""
        name = f"_smtp._tls.{domain}"
        from milterd.outbound.dns import DnsTempError

        try:
            txts = asyncio.run(self._dns().txt(name))
        except DnsTempError as exc:
            first = _parse_iso(st.get("first_attempt")) or self.now
            if self.now - first >= GIVE_UP_AFTER:
                self.outcomes.append(Outcome(day, domain, None, "gave_up", f"DNS: {exc}"))
                self._count(domain, "gave_up")
                log.warning("tlsrpt send: %s %s: gave up: TLSRPT record lookup kept failing "
                            "(%s) since %s", day, domain, exc, _iso(first))
                return {"state": "gave_up", "reason": f"DNS: {exc}", "at": _iso(self.now),
                        "host": self.host}
            attempts = int(st.get("attempts", 0)) + 1
            nxt = self.now + BACKOFF[min(attempts, len(BACKOFF)) - 1]
            self.outcomes.append(Outcome(day, domain, None, "retry", f"DNS: {exc}"))
            self._count(domain, "retry")
            log.warning("tlsrpt send: %s %s: retry later: TLSRPT record lookup failed (%s); "
                        "next attempt after %s", day, domain, exc, _iso(nxt))
            return {"state": "dns_retry", "first_attempt": _iso(first), "attempts": attempts,
                    "next_attempt": _iso(nxt), "last_error": str(exc), "host": self.host}
        ruas, why = parse_tlsrpt_record(txts)
        if not ruas:
            self.outcomes.append(Outcome(day, domain, None, "no_record", why))
            self._count(domain, "no_record")
            log.info("tlsrpt send: %s %s: no record: %s at %s: no report", day, domain, why, name)
            return {"state": "no_record", "reason": why, "at": _iso(self.now), "host": self.host}
        recs, hosts = self._sessions(day, names)
        if not recs:
            return None
        missing = self._missing_hosts(day, hosts)
        if missing:
            end = _dt.datetime.combine(_dt.date.fromisoformat(day) + _dt.timedelta(days=1),
                                       _dt.time(), UTC)
            shown = ", ".join(f"{h} ({self._mark_text(h)})" for h in missing)
            if self.now < end + HOLD_LIMIT:
                self.outcomes.append(Outcome(day, domain, None, "held",
                                             "waiting for " + ", ".join(missing)))
                log.info("tlsrpt send: %s %s: held: waiting for host(s) that have not shipped "
                         "past the end of the day: %s; built once they have, or after %s",
                         day, domain, shown, _iso(end + HOLD_LIMIT))
                return None
            log.warning("tlsrpt send: %s %s: built without waiting longer for host(s) that have "
                        "not shipped past the end of the day: %s (%d h after it); records they "
                        "have not shipped are not in this report", day, domain, shown,
                        HOLD_LIMIT.total_seconds() // 3600)
        unique = secrets.token_hex(8)
        report_id = f"{day.replace('-', '')}.{unique}.{domain}@{self.submitter}"
        report = build_report(recs, day, self.config.tlsrpt.organization,
                              self.config.tlsrpt.contact, report_id, policy_domain=domain)
        if not report.get("policies"):
            return None
        begin = int(_dt.datetime.combine(_dt.date.fromisoformat(day), _dt.time(), UTC)
                    .timestamp())
        filename = f"{self.submitter}!{domain}!{begin}!{begin + 86399}!{unique}.json.gz"
        gz = gzip.compress(json.dumps(report, indent=1).encode("utf-8"), mtime=0)
        st = {"state": "pending", "report_id": report_id, "file": filename, "ruas": ruas,
              "built": _iso(self.now), "host": self.host, "sessions": len(recs),
              "gz": base64.b64encode(gz).decode("ascii")}
        if missing:
            st["missing_hosts"] = missing
        return st

    # -- every host's watermark ---------------------------------------------------------------
    def _watermark(self, host: str) -> float | None:
        if host not in self._marks:
            entry = self.store.cache_get(WATERMARK_NS, host, self._ts())
            ts = None
            if entry is not None:
                try:
                    ts = float(json.loads(entry.value)["ts"])
                except (ValueError, TypeError, KeyError):
                    log.warning("tlsrpt send: the watermark of %s is not readable: %r", host,
                                entry.value[:80])
            self._marks[host] = ts
        return self._marks[host]

    def _mark_text(self, host: str) -> str:
        ts = self._watermark(host)
        if ts is None:
            return "no watermark"
        return "shipped up to " + _iso(_dt.datetime.fromtimestamp(ts, UTC))

    def _missing_hosts(self, day: str, hosts: set[str]) -> list[str]:
        """The hosts (roster of the last days, and ``hosts``: those with sessions) whose
        watermark is not at or past the end of ``day``."""
        if self._roster is None:
            today = self.now.date()
            self._roster = {r.host for r in self.store.records(
                HOST_KIND, today - _dt.timedelta(days=LOOKBACK_DAYS), today)}
        end = _dt.datetime.combine(_dt.date.fromisoformat(day) + _dt.timedelta(days=1),
                                   _dt.time(), UTC).timestamp()
        return [h for h in sorted(self._roster | hosts)
                if (self._watermark(h) or 0.0) < end]

    @staticmethod
    def _context(day: str, domain: str, st: dict) -> _Ctx:
        return _Ctx(day, domain, st["report_id"], st["file"], base64.b64decode(st["gz"]))

    # -- one delivery -----------------------------------------------------------------------
    def _delivery(self, ctx: _Ctx, rua: str, listed: Any) -> bool:
        """Deliver (or retry) the report to one rua; True when that delivery is final."""
        key = f"{ctx.day}|{ctx.domain}|{rua}"
        shown = display_uri(rua)
        seen = listed.state if listed is not None else {}
        if seen.get("state") in _FINAL:
            return True
        if seen.get("state") == "retry" and not self._due(seen):
            self.outcomes.append(Outcome(ctx.day, ctx.domain, rua, "pending",
                                         f"next attempt after {seen.get('next_attempt')}"))
            return False
        job = self.store.claim(NS_DELIVERY, key, self.owner, LEASE, self._ts())
        if job is None:
            self.outcomes.append(Outcome(ctx.day, ctx.domain, rua, "elsewhere",
                                         "another host is delivering it"))
            log.info("tlsrpt send: %s %s %s: being delivered by another host", ctx.day,
                     ctx.domain, shown)
            return False
        e = dict(job.state)
        state = e.get("state")
        if state in _FINAL:
            self._release(NS_DELIVERY, key, e)
            return True
        if state == "retry" and not self._due(e):
            self._release(NS_DELIVERY, key, e)
            self.outcomes.append(Outcome(ctx.day, ctx.domain, rua, "pending",
                                         f"next attempt after {e.get('next_attempt')}"))
            return False
        if state == "committing":
            # its lease ran out while completing the transfer: the receiver may have it
            e.update(state="unknown", unknown_at=_iso(self.now), found_by=self.host)
            self._put(NS_DELIVERY, key, e, 0)
            self._count(ctx.domain, "unknown")
            self.outcomes.append(Outcome(ctx.day, ctx.domain, rua, "unknown",
                                         "interrupted while completing the transfer"))
            log.warning("tlsrpt send: %s %s %s: outcome unknown (the run on %s stopped while "
                        "completing the transfer): not sent again, to never send twice "
                        "(report-id %s)", ctx.day, ctx.domain, shown, e.get("host", "?"),
                        e.get("report_id"))
            return True
        if state == "claimed":
            log.warning("tlsrpt send: %s %s %s: the run on %s stopped mid-delivery (before the "
                        "transfer completed): sending again, same report-id", ctx.day,
                        ctx.domain, shown, e.get("host", "?"))
        if not e:
            e = {"report_id": ctx.report_id, "attempts": 0, "first_attempt": _iso(self.now),
                 "message_id": make_msgid(domain=self.submitter)}
        e.update(state="claimed", attempts=int(e.get("attempts", 0)) + 1,
                 last_attempt=_iso(self.now), host=self.host)
        self._put(NS_DELIVERY, key, e, LEASE)
        self._hook("claimed", ctx, rua)

        def commit() -> None:
            e["state"] = "committing"
            self._put(NS_DELIVERY, key, e, LEASE)   # _Lost: stop before the completing byte
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
                self._put(NS_DELIVERY, key, e, 0)
                self.outcomes.append(Outcome(ctx.day, ctx.domain, rua, "retry", str(exc)))
                self._count(ctx.domain, "retry")
                log.warning("tlsrpt send: %s %s %s: retry later: %s (attempt %d; next after "
                            "%s)", ctx.day, ctx.domain, shown, exc, e["attempts"], _iso(nxt))
                return False
            why = "permanent failure" if isinstance(exc, _Permanent) else (
                f"failing since {_iso(first)}")
            e.update(state="gave_up", last_error=str(exc), gave_up=_iso(self.now))
            self._put(NS_DELIVERY, key, e, 0)
            self.outcomes.append(Outcome(ctx.day, ctx.domain, rua, "gave_up", str(exc)))
            self._count(ctx.domain, "gave_up")
            log.error("tlsrpt send: %s %s %s: gave up (%s): %s (report-id %s)", ctx.day,
                      ctx.domain, shown, why, exc, ctx.report_id)
            return True
        # The receiver has it: count it as this host's, whatever happens to the bookkeeping.
        self._count(ctx.domain, "sent")
        self.outcomes.append(Outcome(ctx.day, ctx.domain, rua, "sent", detail))
        log.info("tlsrpt send: %s %s %s: sent (report-id %s%s)", ctx.day, ctx.domain, shown,
                 ctx.report_id, f", {detail}" if detail else "")
        self._hook("delivered", ctx, rua)
        if e.get("queue_id"):
            mta = self.host if self.smtp_host in _LOOPBACK else ""
            self.store.put_records([Record(
                SUBMITTED_KIND, f"{mta or '*'}:{e['queue_id']}", self.now.date().isoformat(),
                ctx.domain, self.host, {"queue_id": e["queue_id"], "mta_host": mta,
                                        "report_id": ctx.report_id, "rua": shown})])
            self._submitted.add((mta, e["queue_id"]))
        e.update(state="sent", sent_at=_iso(self.now))
        e.pop("next_attempt", None)
        try:
            self._put(NS_DELIVERY, key, e, 0)
        except _Lost:
            log.error("tlsrpt send: %s %s %s: sent, but another host had taken the job over "
                      "meanwhile (this run was too slow); it finds 'committing' and does not "
                      "send again", ctx.day, ctx.domain, shown)
        return True

    def _hook(self, point: str, ctx: _Ctx, rua: str) -> None:
        if self.hook is not None:
            self.hook(point, ctx.day, ctx.domain, rua)

    def _count_pending(self, days: list[_dt.date]) -> int:
        """Retries waiting whose last attempt was this host's (their fleet sum is the total)."""
        n = 0
        for d in days:
            for js in self.store.jobs(NS_DELIVERY, f"{d.isoformat()}|").values():
                n += js.state.get("state") in ("retry", "claimed") and \
                    js.state.get("host") == self.host
            for js in self.store.jobs(NS_REPORT, f"{d.isoformat()}|").values():
                n += js.state.get("state") == "dns_retry" and js.state.get("host") == self.host
        return n

    # -- the file-based version's state ----------------------------------------------------------
    def _read_legacy(self) -> dict | None:
        path = self.state_dir / LEGACY_STATE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            # Never guess: a lost state could mean sending every report again.
            raise SendError(f"{path}: unreadable send state of the previous version ({exc}); "
                            "fix or move it aside (without it, reports of the last days may be "
                            "sent again)") from None
        if not isinstance(data, dict):
            raise SendError(f"{path}: not a send state file")
        return data

    def _import_legacy(self, data: dict, today: _dt.date) -> None:
        """Jobs not in the store yet, queue IDs and counters from ``tlsrpt-send.json``; then the
        file is renamed.  Idempotent: a job that exists (any state) is never overwritten."""
        oldest = (today - _dt.timedelta(days=KEEP_DAYS)).isoformat()
        imported = 0
        for ns, entries in ((NS_REPORT, data.get("reports") or {}),
                            (NS_DELIVERY, data.get("deliveries") or {})):
            for key, e in entries.items():
                if not isinstance(e, dict) or key.split("|", 1)[0] < oldest:
                    continue
                e = dict(e, host=self.host, imported=_iso(self.now))
                if ns == NS_REPORT and e.get("state") == "pending":
                    try:
                        gz = (self.state_dir / LEGACY_REPORTS_DIR / e["file"]).read_bytes()
                    except (OSError, KeyError):
                        continue                    # rebuilt (delivered ruas stay delivered)
                    e["gz"] = base64.b64encode(gz).decode("ascii")
                if ns == NS_DELIVERY and e.get("state") == "claimed":
                    e.update(state="retry", next_attempt=_iso(self.now))
                elif ns == NS_DELIVERY and e.get("state") == "committing":
                    e["state"] = "unknown"
                job = self.store.claim(ns, key, self.owner, LEASE, self._ts())
                if job is None:
                    continue
                if job.state:
                    self._release(ns, key, dict(job.state))
                    continue
                self._put(ns, key, e, 0)
                imported += 1
        subs = [Record(SUBMITTED_KIND, f"{self.host}:{q}", str(ts)[:10], "", self.host,
                       {"queue_id": q, "mta_host": self.host, "imported": True})
                for q, ts in (data.get("submitted") or {}).items()
                if isinstance(ts, str) and ts[:10] >= oldest]
        self.store.put_records(subs)

        def merge(c: dict) -> None:
            if c.get("imported"):
                return
            old = data.get("counters") if isinstance(data.get("counters"), dict) else {}
            for k, v in old.items():
                c["counters"][k] = int(c["counters"].get(k, 0)) + int(v)
            for d in data.get("domain_labels") or []:
                if d not in c["domain_labels"]:
                    c["domain_labels"].append(d)
            c["imported"] = True

        self._with_counters(merge)
        path = self.state_dir / LEGACY_STATE_FILE
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, path.with_name(path.name + ".imported"))
        log.warning("tlsrpt send: imported %s into the store (%d jobs, %d queue IDs); it is now "
                    "%s.imported", path, imported, len(subs), path.name)

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

    # -- metrics (this host's) ----------------------------------------------------------------
    def _count(self, domain: str, result: str) -> None:
        if self.dry_run:
            return
        self._counts[(domain, result)] = self._counts.get((domain, result), 0) + 1

    def _with_counters(self, change: Callable[[dict], None]) -> dict:
        """Read-modify-write ``tlsrpt-counters.json`` under a lock held just for that: this
        host's counters (runs on one host may overlap; nothing else is locked)."""
        path = self.state_dir / COUNTERS_FILE
        fd = os.open(self.state_dir / (COUNTERS_FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                c = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(c, dict):
                    raise ValueError("not an object")
            except FileNotFoundError:
                c = {}
            except (OSError, ValueError) as exc:
                log.warning("tlsrpt send: %s unreadable (%s): counters start again", path, exc)
                c = {}
            c.setdefault("counters", {})
            c.setdefault("domain_labels", [])
            change(c)
            atomic_write(path, json.dumps(c, indent=1, sort_keys=True).encode())
            return c
        finally:
            os.close(fd)

    def _label(self, domain: str, labels: list[str]) -> str:
        if domain in self._configured_labels or domain in labels:
            return domain
        if len(labels) < MAX_DOMAIN_LABELS:
            labels.append(domain)
            return domain
        return "other"

    def _write_metrics(self) -> None:
        def add(c: dict) -> None:
            for (domain, result), n in sorted(self._counts.items()):
                k = f"{self._label(domain, c['domain_labels'])}|{result}"
                c["counters"][k] = int(c["counters"].get(k, 0)) + n
            if self._pending is not None:
                c["pending"] = self._pending
            c["last_run"] = _iso(self.now)

        try:
            c = self._with_counters(add)
        except OSError as exc:
            log.error("tlsrpt send: %s: cannot save this host's counters: %s", self.state_dir,
                      exc)
            return
        self._counts.clear()
        lines = [
            "# HELP milterd_tlsrpt_reports_total TLS-RPT report deliveries (and domains without "
            "a TLSRPT record) by policy domain and result, done by this host's "
            "'milterd tlsrpt send'",
            "# TYPE milterd_tlsrpt_reports_total counter"]
        for k in sorted(c["counters"]):
            domain, result = k.rsplit("|", 1)
            lines.append(f'milterd_tlsrpt_reports_total{{domain="{_esc(domain)}",'
                         f'result="{_esc(result)}"}} {c["counters"][k]}')
        lines += [
            "# HELP milterd_tlsrpt_pending_deliveries Report deliveries (and record lookups) "
            "waiting for a retry, last attempted by this host",
            "# TYPE milterd_tlsrpt_pending_deliveries gauge",
            f"milterd_tlsrpt_pending_deliveries {int(c.get('pending', 0))}",
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

