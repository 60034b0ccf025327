"""The fleet end to end (#17 "Done when"): two MX hosts, each a real Postfix with its own real
``milterd run`` (socketmap + maillog follower + store shipper), one real private PostgreSQL.

* ``mx1`` and ``mx2``: a private Postfix each, relaying to loopback MX receivers through its
  milterd's TLS policy socketmap, binding its outbound connections to its own address
  (``smtp_bind_address`` 127.0.76.11 / 127.0.76.12 = its ``[tlsrpt] sending_ip``); its milterd
  follows that Postfix's ``maillog_file`` and ships the TLS-RPT journal into the shared store
  (``[store] url`` = the PostgreSQL, ``[store] host`` mx1 / mx2).  The partner watch's probes are
  off (``[watch] probe_interval = 0``): the TLS-RPT journal is then the only thing spooled, so
  ``milterd_store_spooled_records`` can be compared with its lines exactly.
* two send-list policy domains per test: ``good-*.test`` (its MX presents a certificate for its
  name: success sessions, delivered) and ``wrong-*.test`` (a certificate for another name:
  failure sessions, deferred); their TLSRPT records (loopback DNS) name a loopback HTTPS rua.
* ``milterd tlsrpt send -c <host's milterd.toml>`` runs as its own process on both hosts at once,
  through the real CLI; only its clock is set (the records are today's, a report is for a
  finished day — as tests/test_tlsrpt_send.py passes ``now=``): first at 00:10 the next day, when
  the hosts' watermarks (real: "now", before midnight) hold the report, then past the hold limit.

What the tests count against: the hosts' own journals (``<state_dir>/tlsrpt-sessions.jsonl``,
the follower's record of every session), the store (queried), the receivers' mailboxes and
queues, each milterd's ``/metrics``, and the POSTs the rua endpoint received.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import signal
import subprocess
import sys

import pytest

from dns_server import DnsServer
from milterd.lab.metrics import scrape
from milterd.lab.net import free_port, port_free, wait_for_port
from milterd.lab.postfix import PostfixLab, PostfixTLS
from milterd.lab.postgres import PostgresLab
from milterd.lab.smtp import make_message, send
from milterd.lab.wait import wait_until
from milterd.outbound.tlsrpt_send import HOLD_LIMIT, SESSION_KIND
from milterd.store.api import open_store
from milterd.store.service import TLSRPT_SHIPPER_STATE
from milterd.store.spool import WATERMARK_NS

from support import MilterdFactory, make_lab_dir
from test_tlsrpt_send import ReportEndpoint

pytestmark = pytest.mark.postfix

UTC = dt.timezone.utc
GOOD_RX, WRONG_RX = "127.0.76.1", "127.0.76.2"
HOSTS = {"mx1": "127.0.76.11", "mx2": "127.0.76.12"}       # [tlsrpt] sending_ip = bind address
TESTS = ("a", "b")
GOOD = [f"good-{t}.test" for t in TESTS]
WRONG = [f"wrong-{t}.test" for t in TESTS]

# `milterd tlsrpt send` exactly as the CLI runs it, in its own process, its clock set to argv[1]
_SEND_AT = """
import datetime as dt, sys
from milterd.outbound import tlsrpt_send

NOW = dt.datetime.fromisoformat(sys.argv[1])

class AtTime(tlsrpt_send.TlsRptSender):
    def __post_init__(self):
        if self.now is None:
            self.now = NOW
        super().__post_init__()

tlsrpt_send.TlsRptSender = AtTime
from milterd.cli import main
sys.exit(main(["tlsrpt", "send", *sys.argv[2:]]))
"""


@pytest.fixture(scope="module")
def fleet(partners):
    pki = partners.pki
    assert all(port_free(a, 25) for a in (GOOD_RX, WRONG_RX)), "receiver addresses busy"
    started: list = []
    pg = PostgresLab()
    started.append(pg)
    factory = MilterdFactory(make_lab_dir("milterd-fleet-"))
    try:
        pg.start()
        issued = pki.issue("tlsrpt-endpoint-fleet", "localhost")
        endpoint = ReportEndpoint(issued.cert_path, issued.key_path)
        started.append(endpoint)
        dns = DnsServer().start()
        started.append(dns)
        for d in GOOD + WRONG:
            dns.add(f"_smtp._tls.{d}", "TXT", [json.dumps(f"v=TLSRPTv1; rua={endpoint.url(d)}")])
        good_cert = pki.issue("rx-fleet-good", f"mx.{GOOD[0]}", sans=[f"mx.{d}" for d in GOOD])
        wrong_cert = pki.issue("rx-fleet-wrong", "mx.fabrikam.test")    # not the domain's name
        receivers = {}
        for name, addr, cert, domains in (("good", GOOD_RX, good_cert, GOOD),
                                          ("wrong", WRONG_RX, wrong_cert, WRONG)):
            rx = PostfixLab(milter_socket=None, local_domains=tuple(domains),
                            hostname=f"mx.{domains[0]}", listen_address=addr, port=25,
                            tls=PostfixTLS(cert.cert_path, cert.key_path, pki.ca_path))
            started.append(rx)
            receivers[name] = rx.start()
        hosts_map = {**{d: GOOD_RX for d in GOOD}, **{d: WRONG_RX for d in WRONG}}
        send_list = ", ".join(f'"{d}"' for d in GOOD + WRONG)
        senders, milterds, metrics, journals, configs = {}, {}, {}, {}, {}
        for host, ip in HOSTS.items():
            socketmap, metrics[host] = free_port(), free_port()
            pf = PostfixLab(
                milter_socket=None, hostname=f"{host}.contoso.test", hosts=hosts_map,
                tls=PostfixTLS(partners.server.cert_path, partners.server.key_path, pki.ca_path),
                extra={"smtp_tls_security_level": "may", "smtp_tls_CAfile": str(pki.ca_path),
                       "smtp_tls_loglevel": "1", "smtp_connect_timeout": "5s",
                       "smtp_bind_address": ip,
                       "smtp_tls_policy_maps":
                           f"socketmap:inet:127.0.0.1:{socketmap}:tlspolicy"})
            started.append(pf)
            senders[host] = pf.start()
            state = factory.root / host / "state"
            journals[host] = state / "tlsrpt-sessions.jsonl"
            milterds[host] = factory(f"""
[socketmap]
listen = "127.0.0.1:{socketmap}"
[metrics]
listen = "127.0.0.1:{metrics[host]}"
[domain_security]
send_domains = [{send_list}]
[outbound]
maillog = "{pf.maillog}"
state_dir = "{state}"
dns_servers = ["127.0.0.1:{dns.port}"]
[watch]
probe_interval = 0
[store]
url = "{pg.url}"
host = "{host}"
[tlsrpt]
organization = "Contoso Ltd"
contact = "tlsrpt@contoso.test"
https_ca_file = "{pki.ca_path}"
sending_ip = "{ip}"
""", name=host)
            configs[host] = factory.root / host / "milterd.toml"
            assert wait_for_port("127.0.0.1", socketmap, timeout=10)
        yield {"pg": pg, "endpoint": endpoint, "senders": senders, "receivers": receivers,
               "milterd": milterds, "metrics": metrics, "journals": journals,
               "configs": configs, "root": factory.root}
    finally:
        try:
            for thing in reversed(started):
                if isinstance(thing, PostfixLab):
                    thing.cleanup()
                elif isinstance(thing, PostgresLab):
                    thing.cleanup()
                else:
                    thing.stop()
        finally:
            factory.close()            # stops both milterd; no unexpected traceback in their logs


# -- helpers ---------------------------------------------------------------------------------------
def _today() -> dt.date:
    return dt.datetime.now(UTC).date()


def _at(day: dt.date, after_midnight: dt.timedelta) -> dt.datetime:
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), UTC) + after_midnight


def _journal(fleet, host: str, domains: list[str]) -> dict[str, dict]:
    """The host's journal records for ``domains``, by key (what its follower recorded)."""
    out = {}
    try:
        lines = fleet["journals"][host].read_text().splitlines()
    except FileNotFoundError:
        return {}
    for line in lines:
        rec = json.loads(line)
        if rec["policy_domain"] in domains:
            out[rec["key"]] = rec
    return out


def _stored(fleet, domains: list[str], day: dt.date) -> dict[str, list]:
    """The store's tlsrpt-session records for ``domains``, by host."""
    s = open_store(fleet["pg"].url)
    try:
        out: dict[str, list] = {}
        for d in domains:
            for r in s.records(SESSION_KIND, day, domain=d):
                out.setdefault(r.host, []).append(r)
        return out
    finally:
        s.close()


def _traffic(fleet, host: str, good: str, wrong: str, n_good: int, n_wrong: int,
             tag: str) -> dict[str, list[str]]:
    """Mail through ``host``'s Postfix; returns its queue IDs there, by kind."""
    out: dict[str, list[str]] = {"good": [], "wrong": []}
    for kind, domain, n in (("good", good, n_good), ("wrong", wrong, n_wrong)):
        for i in range(n):
            rcpt = f"{kind}{i}@{domain}"
            r = send(fleet["senders"][host].port, "alice@contoso.test", [rcpt],
                     make_message("alice@contoso.test", rcpt, f"{tag} {host} {kind} {i}"))
            assert r.accepted, r
            out[kind].append(r.text.rsplit("queued as ", 1)[1].strip())
    return out


def _settled(fleet, host: str, queued: dict[str, list[str]], good: str, wrong: str,
             tag: str) -> None:
    """Every good message delivered, every wrong one deferred and still queued, and the host's
    journal has a session record for each of them."""
    rx = fleet["receivers"]["good"]
    subjects = {f"{tag} {host} good {i}" for i in range(len(queued["good"]))}
    wait_until(lambda: subjects <= {m["Subject"] for m in rx.delivered()}, 60,
               lambda: f"{host}'s good mail delivered" + fleet["senders"][host].log_tail())

    def recorded() -> bool:
        recs = _journal(fleet, host, [good, wrong]).values()
        ids = {(r["policy_domain"], r["result"], q) for r in recs
               for q in [r.get("queue_id"), *(r.get("queue_ids") or [])] if q}
        return (all((good, "success", q) in ids for q in queued["good"])
                and all((wrong, "failure", q) in ids for q in queued["wrong"]))

    wait_until(recorded, 60, lambda: f"{host}'s journal records every session"
               + fleet["milterd"][host].log_tail())
    log = fleet["senders"][host].log_text()
    for q in queued["wrong"]:
        assert f"{q}: to=<" in log and "status=deferred" in log
    assert set(queued["wrong"]) <= set(fleet["senders"][host].queue_ids())   # still queued
    assert not any(m["Subject"].startswith(tag) for m in fleet["receivers"]["wrong"].delivered())


def _shipped(fleet, domains: list[str], day: dt.date) -> None:
    """Wait until the store holds exactly the hosts' journal records for ``domains``."""
    def same() -> bool:
        stored = _stored(fleet, domains, day)
        return all(sorted(r.key for r in stored.get(h, [])) ==
                   sorted(f"{h}:{k}" for k in _journal(fleet, h, domains)) for h in HOSTS)

    wait_until(same, 60, "both hosts' records in the store")


def _metrics(fleet, host: str) -> dict[str, float]:
    return scrape(fleet["metrics"][host])


def _send_on_both(fleet, at: dt.datetime, slow: bool = False) -> dict[str, tuple[int, str]]:
    """`milterd tlsrpt send` on mx1 and mx2 at once (two processes, one store)."""
    ep = fleet["endpoint"]
    if slow:
        ep.delay.clear()                   # a slow receiver: the two runs overlap
    try:
        procs = {h: subprocess.Popen([sys.executable, "-c", _SEND_AT, at.isoformat(), "-c",
                                      str(c)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True) for h, c in fleet["configs"].items()}
        return {h: (p.wait(120), p.communicate()[1]) for h, p in procs.items()}
    finally:
        ep.delay.set()


def _expected(fleet, domain: str) -> tuple[int, int, dict[str, int]]:
    """Successes, failures and failures per sending IP of ``domain``, from both journals."""
    ok = fail = 0
    per_ip: dict[str, int] = {}
    for host, ip in HOSTS.items():
        for rec in _journal(fleet, host, [domain]).values():
            if rec["result"] == "success":
                ok += 1
            else:
                fail += 1
                per_ip[ip] = per_ip.get(ip, 0) + 1
    return ok, fail, per_ip


def _check_reports(fleet, domains: list[str]) -> None:
    """ONE report per domain, whose counts are both journals' sums, failures per host's IP."""
    ep = fleet["endpoint"]
    for d in domains:
        (body,) = ep.bodies(d)
        (pol,) = json.loads(gzip.decompress(body))["policies"]
        ok, fail, per_ip = _expected(fleet, d)
        assert pol["summary"] == {"total-successful-session-count": ok,
                                  "total-failure-session-count": fail}, d
        got: dict[str, int] = {}
        for det in pol.get("failure-details", []):
            got[det["sending-mta-ip"]] = got.get(det["sending-mta-ip"], 0) + \
                det["failed-session-count"]
        assert got == per_ip, d


# -- the tests ---------------------------------------------------------------------------------------
def test_two_hosts_one_report_per_domain_summed_sent_once(fleet):
    """Traffic through both pairs; both hosts' records reach the store (and their watermarks);
    `tlsrpt send` on both hosts at 00:10 holds the day (neither host has shipped past midnight
    yet), past the hold limit sends ONE report per domain with both hosts' sessions summed and
    both sending IPs in the failure details; running it again sends nothing."""
    good, wrong = GOOD[0], WRONG[0]
    day = _today()
    plan = {"mx1": (3, 2), "mx2": (2, 1)}
    queued = {h: _traffic(fleet, h, good, wrong, *plan[h], tag="t1") for h in HOSTS}
    for h in HOSTS:
        _settled(fleet, h, queued[h], good, wrong, "t1")
    # each Postfix left from its own address (the one its milterd reports as sending-mta-ip)
    rx_log = fleet["receivers"]["good"].log_text()
    assert all(f"[{ip}]" in rx_log for ip in HOSTS.values()), rx_log[-2000:]
    _shipped(fleet, [good, wrong], day)
    journals = {h: _journal(fleet, h, [good, wrong]) for h in HOSTS}
    for h, (n_good, n_wrong) in plan.items():
        results = [r["result"] for r in journals[h].values()]
        assert results.count("success") >= 1 and results.count("failure") >= n_wrong, results

    # each host's watermark: past its newest record once it has caught up
    s = open_store(fleet["pg"].url)
    try:
        for h in HOSTS:
            newest = max(dt.datetime.fromisoformat(r["ts"].replace("Z", "+00:00")).timestamp()
                         for r in journals[h].values())
            wait_until(lambda h=h, newest=newest: (e := s.cache_get(
                WATERMARK_NS, h, dt.datetime.now(UTC).timestamp())) is not None
                and json.loads(e.value)["ts"] >= newest, 30, f"{h}'s watermark")
    finally:
        s.close()

    ep = fleet["endpoint"]
    held = _send_on_both(fleet, _at(day, dt.timedelta(minutes=10)))
    assert all(rc == 0 for rc, _ in held.values()), held
    logs = "".join(err for _, err in held.values())
    for d in (good, wrong):            # by whichever host claimed the domain first
        assert f"{day} {d}: held: waiting for host(s) that have not shipped past the end of " \
               f"the day: mx1 (shipped up to " in logs, logs
    assert logs.count("mx2 (shipped up to ") >= 2 and ": sent" not in logs, logs
    assert ep.bodies(good) == [] and ep.bodies(wrong) == []

    out = _send_on_both(fleet, _at(day, HOLD_LIMIT + dt.timedelta(minutes=10)), slow=True)
    for h, (rc, err) in out.items():
        assert rc == 0, (h, err)
    logs = "".join(err for _, err in out.values())
    assert logs.count(": sent (report-id") == 2, logs          # one per domain, fleet-wide
    assert "built without waiting longer for host(s)" in logs, logs
    _check_reports(fleet, [good, wrong])
    _, _, per_ip = _expected(fleet, wrong)
    assert set(per_ip) == set(HOSTS.values())                  # both hosts' addresses

    again = _send_on_both(fleet, _at(day, HOLD_LIMIT + dt.timedelta(hours=1)))
    for h, (rc, err) in again.items():
        assert rc == 0 and ": sent" not in err, (h, err)
    assert len(ep.bodies(good)) == 1 and len(ep.bodies(wrong)) == 1


def test_postgresql_down_under_traffic_and_kill9_of_one_milterd(fleet):
    """PostgreSQL stopped under traffic through both pairs: mail flows as usual, each milterd
    says store down with records spooled; mx2's milterd is killed (SIGKILL) during the outage
    and started again: its shipper resumes from its saved position (exactly the lines after it
    are pending); PostgreSQL back: every journal record is in the store once, and the reports
    count exactly both journals."""
    good, wrong = GOOD[1], WRONG[1]
    day = _today()
    pg = fleet["pg"]
    # before the outage: some records shipped (mx2's shipper has a position past them)
    queued = {h: _traffic(fleet, h, good, wrong, 1, 0, tag="t2-before") for h in HOSTS}
    for h in HOSTS:
        _settled(fleet, h, queued[h], good, wrong, "t2-before")
    _shipped(fleet, [good, wrong], day)
    state_file = fleet["root"] / "mx2" / "state" / TLSRPT_SHIPPER_STATE
    wait_until(lambda: _metrics(fleet, "mx2").get("milterd_store_spooled_records") == 0, 30,
               "mx2 caught up")
    position = json.loads(state_file.read_text())["segments"][-1]["offset"]
    assert position > 0

    pg.stop()
    try:
        queued = {h: _traffic(fleet, h, good, wrong, *n, tag="t2-down")
                  for h, n in (("mx1", (2, 1)), ("mx2", (1, 1)))}
        for h in HOSTS:
            _settled(fleet, h, queued[h], good, wrong, "t2-down")     # mail flow unaffected
        for h in HOSTS:
            m = wait_until(lambda h=h: (lambda m: m.get("milterd_store_up") == 0
                                        and m.get("milterd_store_spooled_records", 0) > 0 and m)(
                _metrics(fleet, h)), 30, f"{h}: store down, records spooled")
            assert m["milterd_store_spooled_records"] > 0

        mx2 = fleet["milterd"]["mx2"]
        mx2.signal(signal.SIGKILL)
        assert mx2.proc.wait(10) == -signal.SIGKILL
        assert json.loads(state_file.read_text())["segments"][-1]["offset"] == position
        mx2.start()
        queued = {h: _traffic(fleet, h, good, wrong, *n, tag="t2-after-kill")
                  for h, n in (("mx1", (1, 1)), ("mx2", (2, 1)))}
        for h in HOSTS:
            _settled(fleet, h, queued[h], good, wrong, "t2-after-kill")
        # the restarted shipper: exactly the journal's lines after its saved position pending
        def after() -> int:
            return fleet["journals"]["mx2"].read_bytes()[position:].count(b"\n")

        assert after() >= 5          # 2 before the kill, 3 after it (at least)
        wait_until(lambda: (lambda m: m.get("milterd_store_up") == 0
                            and m.get("milterd_store_spooled_records") == after())(
            _metrics(fleet, "mx2")), 30, lambda: f"the restarted mx2: store down, its spool: "
            f"{after()} lines after {position}: {_metrics(fleet, 'mx2')}\n"
            + fleet["milterd"]["mx2"].log_tail())
        pending = after()
    finally:
        pg.start()

    for h in HOSTS:
        wait_until(lambda h=h: (lambda m: m.get("milterd_store_up") == 1
                                and m.get("milterd_store_spooled_records") == 0)(
            _metrics(fleet, h)), 90, f"{h} caught up after PostgreSQL is back")
    _shipped(fleet, [good, wrong], day)
    # nothing lost, nothing doubled: each host's whole journal is in the store, once
    s = open_store(pg.url)
    try:
        for h in HOSTS:
            keys = [json.loads(line)["key"] for line in
                    fleet["journals"][h].read_text().splitlines()]
            stored = [r.key for r in s.records(SESSION_KIND, day - dt.timedelta(days=1),
                                               day + dt.timedelta(days=1)) if r.host == h]
            assert sorted(stored) == sorted(f"{h}:{k}" for k in set(keys)), h
    finally:
        s.close()
    log = fleet["milterd"]["mx2"].log_text()
    assert log.count("does not answer") == 2          # one per process: before and after kill
    tail = fleet["journals"]["mx2"].read_bytes()[position:].decode()
    assert f"s: {after()} spooled records shipped" in log, (pending, tail, log[-3000:])

    out = _send_on_both(fleet, _at(day, HOLD_LIMIT + dt.timedelta(minutes=20)), slow=True)
    for h, (rc, err) in out.items():
        assert rc == 0, (h, err)
    logs = "".join(err for _, err in out.values())
    assert logs.count(": sent (report-id") == 2, logs
    _check_reports(fleet, [good, wrong])
    ok, fail, per_ip = _expected(fleet, good)
    assert ok >= 2 and fail == 0
    ok, fail, per_ip = _expected(fleet, wrong)
    assert fail >= 4 and set(per_ip) == set(HOSTS.values())      # one per deferred message
