"""``milterd tlsrpt send`` (#16 item 2, #17): RFC 8460 reports delivered for real, once per
fleet.

A real private Postfix on 127.0.0.1 is the local MTA; it relays mailto: reports to a second
Postfix (127.0.73.1:25, the rua domain reports.fabrikam.test) whose mailbox is read back and parsed
by parsedmarc's SMTP TLS report parser (an independent consumer).  https: reports go to a loopback
HTTPS endpoint with a certificate from the test PKI.  TLSRPT records come from the loopback test
DNS server.  Crashes are simulated by an exception raised from the sender's test hook between the
state steps, or by SIGKILL of a real ``tlsrpt send`` process; clocks are passed in (no sleeps) to
step through retry backoff and claim leases.

Session records are in the store, as each host's shipper writes them (kind "tlsrpt-session", key
HOST:KEY, data with "host" and "sending_ip").  The fleet tests run against SQLite and a real
PostgreSQL (a private cluster on loopback, :mod:`milterd.lab.postgres`; a PostgreSQL that cannot
be started fails them, never skips), with two "hosts": two configs with their own [store] host,
state_dir and sending_ip on one store url, run as two concurrent processes.
"""

from __future__ import annotations

import configparser
import datetime as dt
import itertools
import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dns_server import DnsServer
from milterd.core.config import parse_config
from milterd.lab.postfix import PostfixLab
from milterd.lab.smtp import make_message, send
from milterd.lab.wait import wait_until
from milterd.outbound import tlsrpt_send
from milterd.outbound.tlsrpt_send import (COUNTERS_FILE, EXIT_STORE_DOWN, LEASE,
                                          LEGACY_STATE_FILE, METRICS_FILE, NS_DELIVERY, NS_REPORT,
                                          SESSION_KIND, SUBMITTED_KIND, SendError,
                                          StoreUnavailable, TlsRptFileCollector, TlsRptSender,
                                          parse_tlsrpt_record)
from milterd.store.api import Record, open_store
from milterd.store.spool import watermark_writer


REPO = Path(__file__).resolve().parents[1]
UTC = dt.timezone.utc
RUA_DOMAIN = "reports.fabrikam.test"
RUA_ADDR = "127.0.73.1"
# a finished UTC day whatever the time of the test run
DAY = (dt.datetime.now(UTC) - dt.timedelta(days=2)).date()
NOW = dt.datetime.combine(DAY + dt.timedelta(days=1), dt.time(1, 0), UTC)


# -- RFC 8460 §3 record parsing (no network) ---------------------------------------------------
@pytest.mark.parametrize("txts,ruas", [
    (["v=TLSRPTv1; rua=mailto:r@x.test"], ["mailto:r@x.test"]),
    (["v=TLSRPTv1;rua=mailto:r@x.test,https://x.test/r;"], ["mailto:r@x.test", "https://x.test/r"]),
    (["v=TLSRPTv1 ; rua=mailto:r@x.test , https://x.test/r ; ext=1"],
     ["mailto:r@x.test", "https://x.test/r"]),
    (["v=spf1 -all", "v=TLSRPTv1; rua=mailto:r@x.test"], ["mailto:r@x.test"]),
    (["v=TLSRPTv1; rua=ftp://x.test/r,mailto:r@x.test"], ["mailto:r@x.test"]),
    (["v=TLSRPTv1; rua=mailto:r@x.test", "v=TLSRPTv1; rua=mailto:s@x.test"], []),   # two
    (["v=TLSRPTv1; rua=ftp://x.test/r"], []),           # nothing usable
    (["v=TLSRPTv1"], []),                               # no rua
    (["v=TLSRPTv2; rua=mailto:r@x.test"], []),
    (["rua=mailto:r@x.test; v=TLSRPTv1;"], []),        # must begin with the version
    (["v=TLSRPTv1; rua=mailto:r@x.test; bad field"], []),
    (["v=TLSRPTv1; rua=mailto:r@x.test; rua=mailto:s@x.test"], []),
    ([], []), (None, []),
])
def test_record_parsing(txts, ruas):
    got, why = parse_tlsrpt_record(txts)
    assert got == ruas
    assert bool(why) == (not ruas)


def test_display_uri_hides_tokens():
    assert (tlsrpt_send.display_uri("https://u:pw@r.test:8443/in?token=s3cret") ==
            "https://r.test:8443/in?…")
    assert "s3cret" not in tlsrpt_send.display_uri("https://r.test/in?token=s3cret")


# -- a loopback HTTPS report endpoint ----------------------------------------------------------
class ReportEndpoint:
    """POSTs to https://localhost:PORT/<anything>; ``statuses[path]`` lists the answers to give
    first (then 200); ``requests`` keeps (path, headers, body)."""

    def __init__(self, cert: Path, key: Path) -> None:
        import ssl

        self.statuses: dict[str, list[int]] = {}
        self.delay = threading.Event()          # set: answer at once; clear: hold each answer
        self.delay.set()
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                if len(body) < length:          # the client went away mid-body: discarded
                    self.close_connection = True
                    return
                outer.requests.append((self.path, dict(self.headers), body))
                outer.delay.wait(0.2)           # a slow receiver keeps two hosts' runs overlapping
                queue = outer.statuses.get(self.path) or []
                status = queue.pop(0) if queue else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"https://localhost:{self.port}/{path}"

    def bodies(self, path: str) -> list[bytes]:
        return [b for p, _, b in self.requests if p == f"/{path}"]

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


# -- the lab -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab(partners):
    pki = partners.pki
    issued = pki.issue("tlsrpt-endpoint", "localhost")
    endpoint = ReportEndpoint(issued.cert_path, issued.key_path)
    dns = DnsServer().start()
    receiver = PostfixLab(milter_socket=None, tls=None, local_domains=(RUA_DOMAIN,),
                          hostname=f"mx.{RUA_DOMAIN}", listen_address=RUA_ADDR, port=25)
    local = PostfixLab(milter_socket=None, tls=None, hostname="mx.contoso.test",
                       hosts={RUA_DOMAIN: RUA_ADDR})
    try:
        receiver.start()
        local.start()
        yield {"pki": pki, "endpoint": endpoint, "dns": dns, "receiver": receiver,
               "local": local}
    finally:
        local.cleanup()
        receiver.cleanup()
        dns.stop()
        endpoint.stop()


def _publish(lab, domain: str, *records: str) -> None:
    lab["dns"].add(f"_smtp._tls.{domain}", "TXT", [json.dumps(r) for r in records])


@pytest.fixture(scope="module")
def pg_lab():
    from milterd.lab.postgres import running_postgres

    with running_postgres() as lab:
        yield lab


_db_names = itertools.count()


def _pg_database(lab) -> tuple[str, str]:
    import psycopg
    from psycopg import sql as pgsql

    db = f"tlsrpt{os.getpid()}_{next(_db_names)}"
    with psycopg.connect(lab.admin_url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE DATABASE {} OWNER milterd").format(pgsql.Identifier(db)))
    return db, lab.url_with(database=db)


def _pg_drop(lab, db: str) -> None:
    import psycopg
    from psycopg import sql as pgsql

    if not lab.running:
        lab.start()
    with psycopg.connect(lab.admin_url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("DROP DATABASE {} WITH (FORCE)").format(pgsql.Identifier(db)))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """One fleet store per test: a SQLite file (hosts on one machine) or a PostgreSQL database."""
    if request.param == "sqlite":
        (tmp_path / "shared").mkdir()
        yield f"sqlite://{tmp_path}/shared/milterd.db"
        return
    lab = request.getfixturevalue("pg_lab")
    db, url = _pg_database(lab)
    yield url
    _pg_drop(lab, db)


@pytest.fixture
def pg_url(request):
    lab = request.getfixturevalue("pg_lab")
    db, url = _pg_database(lab)
    yield url
    _pg_drop(lab, db)


HOSTS = {"mx1": "192.0.2.25", "mx2": "198.51.100.26"}


def _config(lab, state: Path, smtp_port: int | None = None, extra: str = "", *,
            store: str | None = None, host: str = "mx1") -> str:
    store_section = f'[store]\nurl = "{store}"\nhost = "{host}"\n' if store else (
        f'[store]\nhost = "{host}"\n')
    return f"""
[outbound]
state_dir = "{state}"
dns_servers = ["127.0.0.1:{lab['dns'].port}"]
[tlsrpt]
organization = "Contoso Ltd"
contact = "tlsrpt@contoso.test"
smtp = "127.0.0.1:{smtp_port or lab['local'].port}"
https_ca_file = "{lab['pki'].ca_path}"
sending_ip = "{HOSTS[host]}"
{store_section}{extra}"""


def _default_url(state: Path) -> str:
    """The store of a config without [store] url: <state_dir>/milterd.db."""
    return f"sqlite://{state}/milterd.db"


def _store(url: str):
    s = open_store(url)
    s.migrate()
    return s


def _sessions(url: str, *records: dict, host: str = "mx1", watermark: bool = True) -> None:
    """Records as host ``host``'s shipper writes them to the store — then, caught up, its
    watermark (now: past the end of every day the tests report) and roster record, as the
    shipper does; ``watermark=False``: a host whose shipper has not caught up yet."""
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite://"):]).parent.mkdir(parents=True, exist_ok=True)
    s = _store(url)
    try:
        s.put_records([Record(SESSION_KIND, f"{host}:{r['key']}", r["ts"][:10],
                              r["policy_domain"], host,
                              dict(r, host=host, sending_ip=HOSTS[host])) for r in records])
        if watermark:
            watermark_writer(lambda: s, host)(time.time())
    finally:
        s.close()


_keys = itertools.count(1)


def _rec(domain: str, *, day: dt.date = DAY, ok: bool = True, queue_id: str = "4AB12C3D4E",
         hour: int = 10, key: str | None = None) -> dict:
    return {"ts": f"{day.isoformat()}T{hour:02d}:00:00Z", "queue_id": queue_id,
            "key": key or f"{next(_keys)}:{queue_id}:{domain}",
            "policy_domain": domain, "policy_type": "no-policy-found", "policy_string": [],
            "mx_host": [], "receiving_mx_hostname": f"mx.{domain}", "receiving_ip": "192.0.2.7",
            "status": "sent" if ok else "deferred", "tls_level": "verified" if ok else "none",
            "result": "success" if ok else "failure",
            "result_type": None if ok else "starttls-not-supported",
            "failure_reason_code": None if ok else "STARTTLS not offered"}


def _mails(lab, domain: str) -> list:
    return [m for m in lab["receiver"].delivered() if m["TLS-Report-Domain"] == domain]


def _cli(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "milterd", "tlsrpt", "send", "-c", str(cfg),
                           *args], capture_output=True, text=True, timeout=120)


def _rcpt_code(port: int, rcpt: str) -> int:
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo()
        s.mail("probe@contoso.test")
        code = s.rcpt(rcpt)[0]
        s.rset()
        return code


def _jobs(url: str, ns: str = NS_DELIVERY) -> dict[str, dict]:
    s = open_store(url)
    try:
        return {k: j.state for k, j in s.jobs(ns).items()}
    finally:
        s.close()


def _report_id(body: bytes) -> str:
    return json.loads(gzip.decompress(body))["report-id"]


def _mail_report_id(mail) -> str:
    return " ".join(mail["Subject"].split()).split("Report-ID: <", 1)[1].rstrip(">")


def _prom(state: Path) -> dict:
    from milterd.lab.metrics import parse

    return parse((state / METRICS_FILE).read_text())


# -- end to end through the CLI ------------------------------------------------------------------
@pytest.mark.postfix
def test_send_mailto_through_postfix_and_https_then_nothing_twice(lab, tmp_path):
    import parsedmarc

    from milterd.lab.metrics import parse

    ep = lab["endpoint"]
    _publish(lab, "fabrikam.test",
             f"v=TLSRPTv1; rua=mailto:tlsrpt@{RUA_DOMAIN},{ep.url('fabrikam.test')}?k=s3cret")
    _publish(lab, "tworecords.test", "v=TLSRPTv1; rua=mailto:a@" + RUA_DOMAIN,
             "v=TLSRPTv1; rua=mailto:b@" + RUA_DOMAIN)
    _publish(lab, "ftponly.test", "v=TLSRPTv1; rua=ftp://ftp.ftponly.test/in")
    # nopolicy.test: NXDOMAIN
    state = tmp_path / "state"
    url = _default_url(state)               # no [store] url: the single-host default
    _sessions(url, _rec("fabrikam.test"), _rec("fabrikam.test", queue_id="5BC"),
              _rec("fabrikam.test", ok=False, queue_id="6CD"),
              _rec("fabrikam.test", day=DAY - dt.timedelta(days=1)),     # an earlier day
              _rec("nopolicy.test"), _rec("tworecords.test"), _rec("ftponly.test"))
    cfg = tmp_path / "milterd.toml"
    cfg.write_text(_config(lab, state))

    # --dry-run: looks, builds, sends nothing, keeps no state
    r = _cli(cfg, "--dry-run", "--date", DAY.isoformat())
    assert r.returncode == 0, r.stderr
    assert "would send" in r.stderr and _jobs(url) == {} and _jobs(url, NS_REPORT) == {}
    assert not (state / COUNTERS_FILE).exists()
    assert ep.bodies("fabrikam.test") == []

    r = _cli(cfg)
    assert r.returncode == 0, r.stderr
    log = r.stderr
    assert "s3cret" not in log                                # the rua's token stays out of logs
    for line in (f"{DAY} fabrikam.test mailto:tlsrpt@{RUA_DOMAIN}: sent",
                 f"{DAY} fabrikam.test https://localhost:{ep.port}/fabrikam.test?…: sent",
                 f"{DAY} nopolicy.test: no record",
                 f"{DAY} tworecords.test: no record: 2 TLSRPT records",
                 f"{DAY} ftponly.test: no record"):
        assert line in log, log

    # https: one POST per day, gzip, the right media type, an RFC 8460 report for the day
    posts = {json.loads(gzip.decompress(b))["date-range"]["start-datetime"][:10]: b
             for b in ep.bodies("fabrikam.test?k=s3cret")}
    assert sorted(posts) == [str(DAY - dt.timedelta(days=1)), str(DAY)]
    assert len(ep.bodies("fabrikam.test?k=s3cret")) == 2
    body = posts[str(DAY)]
    assert {h["Content-Type"] for p, h, _ in ep.requests if p.startswith("/fabrikam.test")} == {
        "application/tlsrpt+gzip"}
    posted = json.loads(gzip.decompress(body))
    (pol,) = posted["policies"]
    assert pol["policy"]["policy-domain"] == "fabrikam.test"
    assert pol["summary"] == {"total-successful-session-count": 2,
                              "total-failure-session-count": 1}
    assert pol["failure-details"][0]["sending-mta-ip"] == "192.0.2.25"

    # mailto: through the local Postfix to the rua's mailbox, parsed by parsedmarc
    mails = wait_until(lambda: len(_mails(lab, "fabrikam.test")) == 2 and
                       _mails(lab, "fabrikam.test"), 30,
                       lambda: lab["local"].log_tail() + lab["receiver"].log_tail())
    (mail,) = [m for m in mails if f"Report-ID: <{posted['report-id']}>" in
               " ".join(m["Subject"].split())]
    assert mail["TLS-Report-Submitter"] == "contoso.test"
    assert mail.get_content_type() == "multipart/report"
    assert mail.get_param("report-type") == "tlsrpt"
    assert " ".join(mail["Subject"].split()) == (
        f"Report Domain: fabrikam.test Submitter: contoso.test "
        f"Report-ID: <{posted['report-id']}>")
    (att,) = [p for p in mail.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    begin = int(dt.datetime.combine(DAY, dt.time(), UTC).timestamp())
    name = att.get_filename()
    assert name.startswith(f"contoso.test!fabrikam.test!{begin}!{begin + 86399}!")
    assert name.endswith(".json.gz") and name.split("!")[4][:-8].isalnum()
    assert gzip.decompress(att.get_content()) == gzip.decompress(body)   # the same report
    parsed = parsedmarc.parse_report_email(mail.as_bytes(), offline=True)
    assert parsed["report_type"] == "smtp_tls"
    rep = parsed["report"]
    assert rep["organization_name"] == "Contoso Ltd" and rep["report_id"] == posted["report-id"]
    assert rep["begin_date"] == f"{DAY}T00:00:00Z"
    (p,) = rep["policies"]
    assert (p["policy_domain"], p["policy_type"], p["successful_session_count"],
            p["failed_session_count"]) == ("fabrikam.test", "no-policy-found", 2, 1)
    assert p["failure_details"][0]["result_type"] == "starttls-not-supported"

    # the earlier day in the lookback is reported too, as its own report
    earlier = DAY - dt.timedelta(days=1)
    assert f"{earlier} fabrikam.test mailto:tlsrpt@{RUA_DOMAIN}: sent" in log

    # nothing for domains without a (single, usable) record
    assert not any(p.startswith(("/nopolicy", "/tworecords", "/ftponly"))
                   for p, _, _ in ep.requests)

    # metrics: the .prom file, exported by the collector the daemon registers
    fams = parse((state / METRICS_FILE).read_text())
    key = "milterd_tlsrpt_reports_total"
    assert fams[key + '{domain="fabrikam.test",result="sent"}'] == 4    # 2 days x 2 rua
    assert fams[key + '{domain="nopolicy.test",result="no_record"}'] == 1
    assert fams["milterd_tlsrpt_pending_deliveries"] == 0

    # a second run sends nothing
    before = len(ep.requests)
    r = _cli(cfg)
    assert r.returncode == 0, r.stderr
    assert "done: nothing to do" in r.stderr and ": sent" not in r.stderr
    assert len(ep.requests) == before
    # the local MTA got no second report: a canary submitted after the run arrives alone
    assert send(lab["local"].port, "canary@contoso.test", [f"tlsrpt@{RUA_DOMAIN}"],
                make_message("canary@contoso.test", f"tlsrpt@{RUA_DOMAIN}", "canary")).accepted
    wait_until(lambda: any(m["Subject"] == "canary" for m in lab["receiver"].delivered()), 30)
    assert len(_mails(lab, "fabrikam.test")) == 2         # DAY and the earlier day, once each

    # --- no report about report deliveries: the local Postfix's own log, read as the follower
    # does, records the report's relay to reports.fabrikam.test; those sessions are left out
    from milterd.outbound.maillog_parser import MaillogParser
    from milterd.outbound.tlsrpt import session_record

    s = open_store(url)
    submitted = {r.data["queue_id"] for r in s.records(SUBMITTED_KIND, DAY, NOW.date() +
                                                          dt.timedelta(days=3))}
    s.close()
    assert len(submitted) == 2                    # the queue IDs of the two mailed reports

    def follower_records():
        parser = MaillogParser()
        return [rec for line in lab["local"].log_text().splitlines()
                if (res := parser.feed(line)) and (rec := session_record(res, None))]

    # the local Postfix logs the relay of both reports and the canary
    recs = wait_until(lambda: (lambda rs: len({r["queue_id"] for r in rs if r["policy_domain"]
                                               == RUA_DOMAIN} & submitted) == 2 and rs)(
        follower_records()), 30, lab["local"].log_tail)
    to_rua = [rec for rec in recs if rec["policy_domain"] == RUA_DOMAIN]
    others = [rec for rec in to_rua if rec["queue_id"] not in submitted]   # canary & co
    assert others, "the canary's relay is a session like any other"
    for rec in recs:                    # as if they had all happened on the finished DAY
        rec["ts"] = f"{DAY.isoformat()}T12:00:00Z"
    _sessions(url, *recs, _rec(RUA_DOMAIN, queue_id="CONTROL1"))
    _publish(lab, RUA_DOMAIN, f"v=TLSRPTv1; rua={ep.url(RUA_DOMAIN)}")
    r = _cli(cfg)
    assert r.returncode == 0, r.stderr
    assert "left out: deliveries of our own reports" in r.stderr
    (body,) = ep.bodies(RUA_DOMAIN)
    (pol,) = json.loads(gzip.decompress(body))["policies"]
    counted = (pol["summary"]["total-successful-session-count"] +
               pol["summary"]["total-failure-session-count"])
    assert counted == 1 + len(others)   # the control and the canary, not the two reports


@pytest.mark.postfix
def test_retry_after_4xx_and_503_then_success(lab, tmp_path):
    ep = lab["endpoint"]
    busy = f"busy@{RUA_DOMAIN}"
    _publish(lab, "retry.test", f"v=TLSRPTv1; rua=mailto:{busy},{ep.url('retry.test')}")
    ep.statuses["/retry.test"] = [503]
    local = lab["local"]
    local.extra["smtpd_recipient_restrictions"] = (
        f"check_recipient_access inline:{{{{ {busy} = 450 4.2.0 mailbox busy }}}}, "
        "permit_mynetworks, reject_unauth_destination")
    local.reload()
    wait_until(lambda: _rcpt_code(local.port, busy) == 450, 30, "the 450 rule in force")
    state = tmp_path / "state"
    _sessions(url := _default_url(state), _rec("retry.test"))
    cfg = parse_config(_config(lab, state))
    try:
        out = TlsRptSender(cfg, now=NOW).run()
        assert sorted((o.rua.split(":")[0], o.result) for o in out) == [
            ("https", "retry"), ("mailto", "retry")], out
        assert any("450 4.2.0" in o.detail and "mailbox busy" in o.detail for o in out)
        assert any("HTTP 503" in o.detail for o in out)
        entries = _jobs(url)
        assert {e["state"] for e in entries.values()} == {"retry"}
        first_ids = {e["report_id"] for e in entries.values()}

        # not due yet: nothing is attempted
        out = TlsRptSender(cfg, now=NOW + dt.timedelta(minutes=5)).run()
        assert {o.result for o in out} == {"pending"}
        assert len(ep.bodies("retry.test")) == 1
        prom = (state / METRICS_FILE).read_text()
        assert "milterd_tlsrpt_pending_deliveries 2" in prom
        assert 'milterd_tlsrpt_reports_total{domain="retry.test",result="retry"} 2' in prom
    finally:
        del local.extra["smtpd_recipient_restrictions"]
        local.reload()
        wait_until(lambda: _rcpt_code(local.port, busy) == 250, 30, "the 450 rule gone")

    out = TlsRptSender(cfg, now=NOW + dt.timedelta(minutes=16)).run()
    assert sorted(o.result for o in out) == ["sent", "sent"], out
    bodies = ep.bodies("retry.test")
    assert len(bodies) == 2 and bodies[0] == bodies[1]        # the same report, same report-id
    assert {e["report_id"] for e in _jobs(url).values()} == first_ids
    (mail,) = wait_until(lambda: _mails(lab, "retry.test"), 30, local.log_tail)
    assert first_ids == {json.loads(gzip.decompress(
        next(p for p in mail.walk() if p.get_content_type() == "application/tlsrpt+gzip")
        .get_content()))["report-id"]}
    assert TlsRptSender(cfg, now=NOW + dt.timedelta(hours=3)).run() == []


@pytest.mark.postfix
def test_gives_up_after_the_bound(lab, tmp_path, caplog):
    ep = lab["endpoint"]
    _publish(lab, "down.test", f"v=TLSRPTv1; rua={ep.url('down.test')}")
    ep.statuses["/down.test"] = [503] * 50
    state = tmp_path / "state"
    _sessions(_default_url(state), _rec("down.test"))
    cfg = parse_config(_config(lab, state))
    t = NOW
    results = []
    while t < NOW + dt.timedelta(days=3):
        results += [o.result for o in TlsRptSender(cfg, now=t).run()]
        t += dt.timedelta(hours=1)
    attempts = len(ep.bodies("down.test"))
    assert results.count("gave_up") == 1 and results[-1] != "sent"
    # backoff 15 min .. 8 h over 2 days, runs hourly: far fewer attempts than runs
    assert 6 <= attempts <= 12, attempts
    assert "gave up" in caplog.text
    assert 'result="gave_up"} 1' in (state / METRICS_FILE).read_text()


@pytest.mark.postfix
@pytest.mark.parametrize("crash_at,rua_kind", [("claimed", "https"), ("committing", "https"),
                                                ("delivered", "mailto"),
                                                ("claimed", "mailto")])
def test_crash_mid_run_never_sends_twice(lab, tmp_path, crash_at, rua_kind):
    ep = lab["endpoint"]
    domain = f"crash-{crash_at}-{rua_kind}.test"
    _publish(lab, domain, f"v=TLSRPTv1; rua=mailto:tlsrpt@{RUA_DOMAIN},{ep.url(domain)}")
    state = tmp_path / "state"
    _sessions(url := _default_url(state), _rec(domain))
    cfg = parse_config(_config(lab, state))

    class Crash(Exception):
        pass

    def hook(point, day, dom, rua):
        if point == crash_at and rua.startswith(rua_kind):
            raise Crash(point)

    with pytest.raises(Crash):
        TlsRptSender(cfg, now=NOW, hook=hook).run()
    # the crashed run's claims hold until their lease runs out: nobody touches the report
    held = TlsRptSender(cfg, now=NOW + dt.timedelta(minutes=1)).run()
    assert [o.result for o in held] == ["elsewhere"], held
    out = TlsRptSender(cfg, now=NOW + dt.timedelta(seconds=LEASE + 60)).run()
    again = TlsRptSender(cfg, now=NOW + dt.timedelta(hours=6)).run()
    assert [o for o in again if o.result not in ("pending",)] == []
    posts = ep.bodies(domain)
    mails = wait_until(lambda: _mails(lab, domain), 30, lab["local"].log_tail)
    states = {k.rsplit("|", 1)[1].split(":")[0]: e["state"]
              for k, e in _jobs(url).items()}
    if crash_at == "claimed":
        # nothing had left: the next run sends it, with the same report-id
        assert states == {"mailto": "sent", "https": "sent"}, out
        assert len(posts) == 1 and len(mails) == 1
    elif crash_at == "committing":
        # the receiver saw an incomplete request; whether it took it is unknowable: not resent
        assert states[rua_kind] == "unknown" and len(posts) == 0 and len(mails) == 1
    else:  # delivered, not yet recorded: the receiver has it; not resent
        assert states[rua_kind] == "unknown" and len(posts) == 1 and len(mails) == 1
    ids = {json.loads(gzip.decompress(b))["report-id"] for b in posts}
    ids |= {m["Subject"].split("<")[1].rstrip(">").strip() for m in mails}
    assert len(ids) == 1                                       # one report, one report-id


# -- the fleet: two hosts, one store ------------------------------------------------------------
def _two_hosts(lab, tmp_path: Path, url: str) -> dict[str, Path]:
    cfgs = {}
    for host in HOSTS:
        state = tmp_path / host
        state.mkdir()
        cfgs[host] = tmp_path / f"{host}.toml"
        cfgs[host].write_text(_config(lab, state, store=url, host=host))
    return cfgs


@pytest.mark.postfix
def test_two_hosts_one_report_per_domain_summed_and_sent_once(lab, tmp_path, store_url):
    """Sessions of mx1 and mx2 give ONE report per policy domain with the sum of both hosts'
    counts and each host's own sending-mta-ip; `tlsrpt send` run on both hosts at once (two
    processes) sends each report once: one POST per https rua, one mail per mailto rua."""
    ep = lab["endpoint"]
    tag = "pg" if store_url.startswith("postgresql") else "lite"
    domains = [f"fleet{i}-{tag}.test" for i in range(8)]
    mailed = f"fleetmail-{tag}.test"
    for d in domains:
        _publish(lab, d, f"v=TLSRPTv1; rua={ep.url(d)}")
    _publish(lab, mailed, f"v=TLSRPTv1; rua=mailto:tlsrpt@{RUA_DOMAIN},{ep.url(mailed)}")
    expected = {}
    for i, d in enumerate([*domains, mailed]):
        ok1, fail1, ok2, fail2 = 1 + i, i % 3, 2 * i + 1, 1 + i % 2
        # the same follower keys (and queue IDs) on both hosts are different sessions
        for host, ok, fail in (("mx1", ok1, fail1), ("mx2", ok2, fail2)):
            _sessions(store_url,
                      *[_rec(d, queue_id=f"A{i}{n}", key=f"k{n}:{d}") for n in range(ok)],
                      *[_rec(d, ok=False, queue_id=f"B{i}{n}", key=f"f{n}:{d}")
                        for n in range(fail)], host=host)
        expected[d] = (ok1 + ok2, fail1 + fail2, {HOSTS["mx1"]: fail1, HOSTS["mx2"]: fail2})
    cfgs = _two_hosts(lab, tmp_path, store_url)

    ep.delay.clear()                       # a slow receiver: the two runs overlap
    try:
        procs = {h: subprocess.Popen([sys.executable, "-m", "milterd", "tlsrpt", "send", "-c",
                                      str(c)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True) for h, c in cfgs.items()}
        results = {h: (p.wait(120), p.stderr.read()) for h, p in procs.items()}
    finally:
        ep.delay.set()
    for h, (rc, err) in results.items():
        assert rc == 0, (h, err)

    for d in [*domains, mailed]:
        (body,) = ep.bodies(d)                                   # once, not once per host
        (pol,) = json.loads(gzip.decompress(body))["policies"]
        ok, fail, per_ip = expected[d]
        assert pol["summary"] == {"total-successful-session-count": ok,
                                  "total-failure-session-count": fail}, d
        got = {}
        for det in pol.get("failure-details", []):
            got[det["sending-mta-ip"]] = got.get(det["sending-mta-ip"], 0) + \
                det["failed-session-count"]
        assert got == {ip: n for ip, n in per_ip.items() if n}, d
    assert set(expected[domains[1]][2]) == set(HOSTS.values())
    (mail,) = wait_until(lambda: _mails(lab, mailed), 30, lab["local"].log_tail)
    assert _mail_report_id(mail) == _report_id(ep.bodies(mailed)[0])   # one report, both ruas

    # each host counts what it did: the fleet's sum is exactly the deliveries
    sent = {h: sum(v for k, v in _prom(tmp_path / h).items()
                   if k.startswith("milterd_tlsrpt_reports_total") and 'result="sent"' in k
                   and "fleet" in k) for h in HOSTS}
    assert sum(sent.values()) == len(domains) + 2, (sent, results)
    logs = "".join(err for _, err in results.values())
    assert logs.count(": sent (report-id") == len(domains) + 2, logs

    # again on both hosts: nothing left to do; the local MTA got no second report
    for h, c in cfgs.items():
        r = _cli(c)
        assert r.returncode == 0 and ": sent" not in r.stderr, r.stderr
    assert all(len(ep.bodies(d)) == 1 for d in [*domains, mailed])
    assert send(lab["local"].port, "canary@contoso.test", [f"tlsrpt@{RUA_DOMAIN}"],
                make_message("canary@contoso.test", f"tlsrpt@{RUA_DOMAIN}",
                             f"canary {tag}")).accepted
    wait_until(lambda: any(m["Subject"] == f"canary {tag}" for m in lab["receiver"].delivered()),
               30)
    assert len(_mails(lab, mailed)) == 1


_KILLER = """
import datetime as dt, os, signal, sys
from milterd.core.config import load_config
from milterd.outbound.tlsrpt_send import TlsRptSender

def hook(point, day, domain, rua):
    if point == sys.argv[2]:
        os.kill(os.getpid(), signal.SIGKILL)          # the host dies right here

TlsRptSender(load_config(sys.argv[1]), now=dt.datetime.fromisoformat(sys.argv[3]),
             hook=hook).run()
"""


@pytest.mark.parametrize("point", ["claimed", "committing"])
@pytest.mark.postfix
def test_host_killed_mid_delivery_the_other_host_takes_over(lab, tmp_path, store_url, point):
    """mx1's `tlsrpt send` is killed (SIGKILL) holding the claim: mx2 leaves the report alone
    while the lease runs, then sends it with the report-id mx1 built (killed before the transfer
    completed), or never (killed while completing it: at most once)."""
    ep = lab["endpoint"]
    tag = "pg" if store_url.startswith("postgresql") else "lite"
    domain = f"killed-{point}-{tag}.test"
    _publish(lab, domain, f"v=TLSRPTv1; rua={ep.url(domain)}")
    _sessions(store_url, _rec(domain), host="mx1")
    _sessions(store_url, _rec(domain, ok=False), host="mx2")
    cfgs = _two_hosts(lab, tmp_path, store_url)
    r = subprocess.run([sys.executable, "-c", _KILLER, str(cfgs["mx1"]), point,
                        NOW.isoformat()], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert ep.bodies(domain) == []            # nothing completed
    (job,) = _jobs(store_url).values()
    assert job["state"] == point and job["host"] == "mx1"
    built = _jobs(store_url, NS_REPORT)[f"{DAY}|{domain}"]["report_id"]

    mx2 = parse_config(cfgs["mx2"].read_text())
    held = TlsRptSender(mx2, now=NOW + dt.timedelta(minutes=5)).run()
    assert [o.result for o in held] == ["elsewhere"] and ep.bodies(domain) == []
    out = TlsRptSender(mx2, now=NOW + dt.timedelta(seconds=LEASE + 60)).run()
    (job,) = _jobs(store_url).values()
    if point == "claimed":
        assert [o.result for o in out] == ["sent"], out
        (body,) = ep.bodies(domain)
        assert _report_id(body) == built                      # the report mx1 had built
        assert (job["state"], job["host"], job["attempts"]) == ("sent", "mx2", 2)
        (pol,) = json.loads(gzip.decompress(body))["policies"]
        assert pol["summary"]["total-successful-session-count"] == 1
        assert pol["failure-details"][0]["sending-mta-ip"] == HOSTS["mx2"]
        assert _prom(tmp_path / "mx2")[
            f'milterd_tlsrpt_reports_total{{domain="{domain}",result="sent"}}'] == 1
    else:
        assert [o.result for o in out] == ["unknown"], out
        assert ep.bodies(domain) == [] and job["state"] == "unknown"
    # and nothing more, by either host, ever
    for host in HOSTS:
        cfg = parse_config(cfgs[host].read_text())
        assert TlsRptSender(cfg, now=NOW + dt.timedelta(hours=7)).run() == []
    assert len(ep.bodies(domain)) == (1 if point == "claimed" else 0)


@pytest.mark.postfix
def test_postgresql_down_exits_75_and_sends_nothing(lab, tmp_path, pg_lab, pg_url):
    """PostgreSQL stopped: `tlsrpt send` says so (no password), exits 75 and sends nothing;
    stopped between the claim and the completing byte: the transfer is not completed, and once
    PostgreSQL is back (and the lease has run out) the report goes out once."""
    ep = lab["endpoint"]
    domains = ["pgdown.test", "pgmid.test"]
    for d in domains:
        _publish(lab, d, f"v=TLSRPTv1; rua={ep.url(d)}")
    _sessions(pg_url, _rec("pgdown.test"), host="mx1")
    cfgs = _two_hosts(lab, tmp_path, pg_url)
    pg_lab.stop()
    try:
        r = _cli(cfgs["mx1"])
        assert r.returncode == EXIT_STORE_DOWN, r.stderr
        assert "unavailable" in r.stderr and "next run" in r.stderr, r.stderr
        assert pg_lab.password not in r.stderr + r.stdout
        assert ep.bodies("pgdown.test") == []
    finally:
        pg_lab.start()
    r = _cli(cfgs["mx1"])
    assert r.returncode == 0, r.stderr
    assert len(ep.bodies("pgdown.test")) == 1

    _sessions(pg_url, _rec("pgmid.test"), host="mx2")
    cfg = parse_config(cfgs["mx2"].read_text())

    def hook(point, day, domain, rua):
        if point == "claimed":
            pg_lab.stop()

    try:
        with pytest.raises(StoreUnavailable):
            TlsRptSender(cfg, now=NOW, hook=hook).run()
    finally:
        pg_lab.start()
    assert ep.bodies("pgmid.test") == []         # incomplete body: the receiver discarded it
    assert [o.result for o in TlsRptSender(cfg, now=NOW + dt.timedelta(minutes=1)).run()] == [
        "elsewhere"]
    out = TlsRptSender(cfg, now=NOW + dt.timedelta(seconds=LEASE + 60)).run()
    assert [o.result for o in out] == ["sent"]
    assert len(ep.bodies("pgmid.test")) == 1


@pytest.mark.postfix
def test_previous_versions_state_is_imported_not_resent(lab, tmp_path):
    """The file-based version's tlsrpt-send.json: what it sent stays sent, its pending retry is
    sent with its stored report and report-id, its counters go on; the file is renamed."""
    ep = lab["endpoint"]
    state = tmp_path / "state"
    (state / "tlsrpt-reports").mkdir(parents=True)
    url = _default_url(state)
    report = {"report-id": "old.retry@contoso.test", "policies": []}
    gz = gzip.compress(json.dumps(report).encode())
    (state / "tlsrpt-reports" / "r.json.gz").write_bytes(gz)
    for d in ("imported-sent.test", "imported-retry.test"):
        _publish(lab, d, f"v=TLSRPTv1; rua={ep.url(d)}")
        _sessions(url, _rec(d))
    rua_sent, rua_retry = ep.url("imported-sent.test"), ep.url("imported-retry.test")
    (state / LEGACY_STATE_FILE).write_text(json.dumps({
        "version": 1,
        "reports": {f"{DAY}|imported-sent.test": {"state": "done", "report_id": "old.sent",
                                                  "file": "gone.json.gz", "ruas": [rua_sent]},
                    f"{DAY}|imported-retry.test": {"state": "pending",
                                                   "report_id": "old.retry@contoso.test",
                                                   "file": "r.json.gz", "ruas": [rua_retry]}},
        "deliveries": {f"{DAY}|imported-sent.test|{rua_sent}": {"state": "sent",
                                                                "report_id": "old.sent"},
                       f"{DAY}|imported-retry.test|{rua_retry}": {
                           "state": "retry", "report_id": "old.retry@contoso.test",
                           "attempts": 1, "first_attempt": tlsrpt_send._iso(NOW),
                           "next_attempt": tlsrpt_send._iso(NOW)}},
        "submitted": {"9QUEUE9": tlsrpt_send._iso(NOW)},
        "counters": {"imported-sent.test|sent": 5}, "domain_labels": ["imported-sent.test"]}))
    cfg = parse_config(_config(lab, state))
    out = TlsRptSender(cfg, now=NOW + dt.timedelta(minutes=30)).run()
    assert [(o.domain, o.result) for o in out] == [("imported-retry.test", "sent")], out
    assert ep.bodies("imported-sent.test") == []
    assert ep.bodies("imported-retry.test") == [gz]          # the stored report, byte for byte
    assert not (state / LEGACY_STATE_FILE).exists()
    assert (state / (LEGACY_STATE_FILE + ".imported")).exists()
    s = open_store(url)
    assert [r.data["queue_id"] for r in s.records(SUBMITTED_KIND, DAY, NOW.date())] == [
        "9QUEUE9"]
    s.close()
    prom = _prom(state)
    assert prom['milterd_tlsrpt_reports_total{domain="imported-sent.test",result="sent"}'] == 5
    assert prom['milterd_tlsrpt_reports_total{domain="imported-retry.test",result="sent"}'] == 1
    assert TlsRptSender(cfg, now=NOW + dt.timedelta(hours=2)).run() == []


@pytest.mark.postfix
def test_a_stale_view_is_checked_again_after_the_claim(lab, tmp_path, store_url):
    """mx2 lists the day's jobs, then — while it holds its first domain — mx1 runs to the end
    and releases the others as sent; mx2 then claims them (free again) and must see them done
    from the claim, not resend them from its stale list."""
    ep = lab["endpoint"]
    tag = "pg" if store_url.startswith("postgresql") else "lite"
    domains = [f"stale{i}-{tag}.test" for i in range(3)]
    for d in domains:
        _publish(lab, d, f"v=TLSRPTv1; rua={ep.url(d)}")
        _sessions(store_url, _rec(d), host="mx1")
        _sessions(store_url, _rec(d, ok=False), host="mx2")
    cfgs = _two_hosts(lab, tmp_path, store_url)
    mx1 = TlsRptSender(parse_config(cfgs["mx1"].read_text()), now=NOW)
    mx2 = TlsRptSender(parse_config(cfgs["mx2"].read_text()), now=NOW)
    real = mx2._dns()
    first: list = []

    class Interleaving:
        async def txt(self, name):
            if not first:                  # mx2 holds domains[0] and has listed the day
                t = threading.Thread(target=lambda: first.append(mx1.run()))
                t.start()
                t.join(60)
            return await real.txt(name)

    mx2.dns = Interleaving()
    out2 = mx2.run()
    (out1,) = first
    assert [(o.domain, o.result) for o in out1] == [
        (domains[0], "elsewhere"), (domains[1], "sent"), (domains[2], "sent")], out1
    assert [(o.domain, o.result) for o in out2] == [(domains[0], "sent")], out2
    assert [len(ep.bodies(d)) for d in domains] == [1, 1, 1]


@pytest.mark.postfix
def test_a_slow_host_that_lost_its_claim_does_not_complete(lab, tmp_path, store_url):
    """mx1 stalls after claiming past its lease; mx2 takes the delivery over and sends it; mx1
    wakes, cannot save 'committing' (the job is mx2's) and stops before the completing byte."""
    ep = lab["endpoint"]
    tag = "pg" if store_url.startswith("postgresql") else "lite"
    domain = f"slow-{tag}.test"
    _publish(lab, domain, f"v=TLSRPTv1; rua={ep.url(domain)}")
    _sessions(store_url, _rec(domain), host="mx1")
    cfgs = _two_hosts(lab, tmp_path, store_url)
    mx2 = parse_config(cfgs["mx2"].read_text())
    late: list = []

    def stall(point, day, dom, rua):
        if point == "claimed":             # mx1 "stalls" here while mx2 runs after the lease
            late.append(TlsRptSender(mx2, now=NOW + dt.timedelta(seconds=LEASE + 60)).run())

    out1 = TlsRptSender(parse_config(cfgs["mx1"].read_text()), now=NOW, hook=stall).run()
    assert [o.result for o in late[0]] == ["sent"], late
    assert [o.result for o in out1] == ["elsewhere"], out1
    (body,) = ep.bodies(domain)
    assert _report_id(body) == _jobs(store_url, NS_REPORT)[f"{DAY}|{domain}"]["report_id"]
    (job,) = _jobs(store_url).values()
    assert (job["state"], job["host"]) == ("sent", "mx2")


# -- waiting for every host: watermarks -------------------------------------------------------
def _mark(url: str, host: str, at: dt.datetime) -> None:
    """``host``'s shipper caught up at ``at`` (its watermark and roster record)."""
    s = open_store(url)
    try:
        watermark_writer(lambda: s, host)(at.timestamp())
    finally:
        s.close()


MIDNIGHT = dt.datetime.combine(DAY + dt.timedelta(days=1), dt.time(), UTC)   # DAY's end


@pytest.mark.postfix
def test_a_day_is_held_until_every_host_has_shipped_past_its_end(lab, tmp_path, store_url):
    """mx2 has sessions but no watermark, then one before midnight; mx3 (no sessions that day,
    on the roster) is behind too: the report waits — nothing built, nothing sent — and goes out
    once, with both hosts' sessions, as soon as every watermark is past the end of the day."""
    ep = lab["endpoint"]
    tag = "pg" if store_url.startswith("postgresql") else "lite"
    domain = f"held-{tag}.test"
    _publish(lab, domain, f"v=TLSRPTv1; rua={ep.url(domain)}")
    _sessions(store_url, _rec(domain), _rec(domain), host="mx1")       # caught up (now)
    _sessions(store_url, _rec(domain, ok=False), host="mx2", watermark=False)
    _mark(store_url, "mx3", MIDNIGHT - dt.timedelta(hours=12))        # idle, behind
    cfgs = _two_hosts(lab, tmp_path, store_url)
    mx1 = parse_config(cfgs["mx1"].read_text())

    out = TlsRptSender(mx1, now=NOW).run()
    assert [(o.domain, o.result, o.detail) for o in out] == [
        (domain, "held", "waiting for mx2, mx3")], out
    assert ep.bodies(domain) == []
    assert _jobs(store_url, NS_REPORT) == {f"{DAY}|{domain}": {}}    # claimed, nothing built
    _mark(store_url, "mx2", MIDNIGHT - dt.timedelta(seconds=1))      # not past the end yet
    _mark(store_url, "mx3", MIDNIGHT)
    out = TlsRptSender(mx1, now=NOW + dt.timedelta(minutes=30)).run()
    assert [(o.result, o.detail) for o in out] == [("held", "waiting for mx2")], out
    assert ep.bodies(domain) == []

    _mark(store_url, "mx2", MIDNIGHT + dt.timedelta(seconds=30))
    out = TlsRptSender(mx1, now=NOW + dt.timedelta(hours=1)).run()
    assert [o.result for o in out] == ["sent"], out
    (body,) = ep.bodies(domain)
    (pol,) = json.loads(gzip.decompress(body))["policies"]
    assert pol["summary"] == {"total-successful-session-count": 2,
                              "total-failure-session-count": 1}
    assert "missing_hosts" not in _jobs(store_url, NS_REPORT)[f"{DAY}|{domain}"]
    assert TlsRptSender(mx1, now=NOW + dt.timedelta(hours=2)).run() == []


@pytest.mark.postfix
def test_held_at_most_until_the_limit_then_sent_naming_the_missing_hosts(lab, tmp_path, caplog):
    """A host that never catches up (gone, or its store link broken) holds the day's report
    until HOLD_LIMIT after midnight — then it goes out with what the store has, and the log and
    the report's state name the host missing.  A host seen only before the 7-day window is not
    waited for."""
    caplog.set_level(logging.INFO, logger="milterd.tlsrpt")
    ep = lab["endpoint"]
    domain = "limit.test"
    _publish(lab, domain, f"v=TLSRPTv1; rua={ep.url(domain)}")
    url = f"sqlite://{tmp_path}/shared/milterd.db"
    _sessions(url, _rec(domain), host="mx1")
    _sessions(url, _rec(domain, ok=False), host="mx2", watermark=False)
    _mark(url, "gone-long-ago", NOW - dt.timedelta(days=tlsrpt_send.LOOKBACK_DAYS + 3))
    cfgs = _two_hosts(lab, tmp_path, url)
    mx2 = parse_config(cfgs["mx2"].read_text())
    limit = MIDNIGHT + tlsrpt_send.HOLD_LIMIT
    for t in (MIDNIGHT + tlsrpt_send.FINISH_GRACE, NOW, limit - dt.timedelta(minutes=1)):
        out = TlsRptSender(mx2, now=t).run()
        assert [(o.result, o.detail) for o in out] == [("held", "waiting for mx2")], (t, out)
    assert ep.bodies(domain) == []
    assert f"held: waiting for host(s) that have not shipped past the end of the day: mx2 " \
           f"(no watermark); built once they have, or after {tlsrpt_send._iso(limit)}" \
        in caplog.text
    out = TlsRptSender(mx2, now=limit).run()
    assert [o.result for o in out] == ["sent"], out
    (body,) = ep.bodies(domain)
    (pol,) = json.loads(gzip.decompress(body))["policies"]
    assert pol["summary"] == {"total-successful-session-count": 1,
                              "total-failure-session-count": 1}
    assert _jobs(url, NS_REPORT)[f"{DAY}|{domain}"]["missing_hosts"] == ["mx2"]
    assert "built without waiting longer for host(s) that have not shipped past the end of " \
           "the day: mx2 (no watermark) (6 h after it)" in caplog.text
    assert TlsRptSender(mx2, now=limit + dt.timedelta(hours=1)).run() == []


# -- configuration and errors -----------------------------------------------------------------
@pytest.mark.parametrize("missing", ["organization", "contact"])
def test_missing_required_key_exits_2_naming_it(tmp_path, missing):
    text = ('[outbound]\nstate_dir = "%s"\n[tlsrpt]\norganization = "O"\n'
            'contact = "tlsrpt@contoso.test"\n' % (tmp_path / "s"))
    text = "\n".join(line for line in text.splitlines() if not line.startswith(missing))
    cfg = tmp_path / "m.toml"
    cfg.write_text(text)
    r = _cli(cfg)
    assert r.returncode == 2
    assert f"tlsrpt.{missing}" in r.stderr
    with pytest.raises(SendError, match=f"tlsrpt.{missing}"):
        TlsRptSender(parse_config(text))


def test_unfinished_day_and_bad_state_are_refused(tmp_path):
    state = tmp_path / "s"
    text = (f'[outbound]\nstate_dir = "{state}"\n'
            '[tlsrpt]\norganization = "O"\ncontact = "r@c.test"\n')
    cfg = tmp_path / "m.toml"
    cfg.write_text(text)
    r = _cli(cfg, "--date", dt.datetime.now(UTC).date().isoformat())
    assert r.returncode == 2 and "not finished" in r.stderr
    state.mkdir()
    (state / LEGACY_STATE_FILE).write_text("{torn")
    r = _cli(cfg)
    assert r.returncode == 2 and "unreadable send state" in r.stderr
    assert (state / LEGACY_STATE_FILE).read_text() == "{torn"   # never overwritten


def test_collector_exports_the_file_on_metrics(tmp_path):
    from milterd.core.metrics import Metrics, MetricsServer
    from milterd.lab.metrics import scrape

    m = Metrics()
    m.registry.register(TlsRptFileCollector(tmp_path))
    srv = MetricsServer(m, "127.0.0.1", 0)
    srv.start()
    try:
        assert not any(k.startswith("milterd_tlsrpt_") for k in scrape(srv.port))
        (tmp_path / METRICS_FILE).write_text(
            "# TYPE milterd_tlsrpt_reports_total counter\n"
            'milterd_tlsrpt_reports_total{domain="fabrikam.test",result="sent"} 3\n'
            "# TYPE milterd_tlsrpt_pending_deliveries gauge\n"
            "milterd_tlsrpt_pending_deliveries 1\n"
            "# TYPE other_metric gauge\nother_metric 1\n")
        got = scrape(srv.port)
        assert got['milterd_tlsrpt_reports_total{domain="fabrikam.test",result="sent"}'] == 3
        assert got["milterd_tlsrpt_pending_deliveries"] == 1
        assert "other_metric" not in got
        (tmp_path / METRICS_FILE).write_text("garbage{{{\n")
        assert "milterd_messages_total{verdict=\"accept\"}" in scrape(srv.port)
    finally:
        srv.stop()


def test_legacy_and_build_forms(tmp_path, capsys):
    import argparse

    from milterd.outbound.tlsrpt_cli import register

    parser = argparse.ArgumentParser(prog="milterd")
    register(parser.add_subparsers(dest="cmd", required=True))
    sessions = tmp_path / "s.jsonl"
    sessions.write_text(json.dumps(_rec("fabrikam.test")) + "\n")
    base = ["--sessions", str(sessions), "--date", DAY.isoformat(), "--org", "O",
            "--contact", "c@contoso.test"]
    for argv in (["tlsrpt", *base], ["tlsrpt", "build", *base]):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["policies"][0]["summary"]["total-successful-session-count"] == 1
    args = parser.parse_args(["tlsrpt"])
    assert args.func(args) == 2 and "send, build" in capsys.readouterr().err


# -- the systemd units ------------------------------------------------------------------------
def _units(text: str) -> dict[str, dict[str, str]]:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment]
    cp.read_string(text)
    return {s: dict(cp[s]) for s in cp.sections()}


def test_systemd_units_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze not found: apt-get install systemd"
    service = (REPO / "contrib/systemd/milterd-tlsrpt.service").read_text()
    timer = (REPO / "contrib/systemd/milterd-tlsrpt.timer").read_text()
    exe = Path(sys.executable).parent / "milterd"
    assert exe.exists() and os.access(exe, os.X_OK)
    (tmp_path / "milterd-tlsrpt.service").write_text(
        service.replace("ExecStart=/opt/milterd/bin/milterd ", f"ExecStart={exe} "))
    (tmp_path / "milterd-tlsrpt.timer").write_text(timer)
    r = subprocess.run([tool, "verify", "milterd-tlsrpt.timer", "milterd-tlsrpt.service"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 0, out
    assert not [line for line in out.splitlines() if "milterd-tlsrpt" in line], out

    svc = _units(service)["Service"]
    assert svc["Type"] == "oneshot" and svc["User"] == "milterd"
    assert svc["ExecStart"] == "/opt/milterd/bin/milterd tlsrpt send -c /etc/milterd/milterd.toml"
    assert svc["StateDirectory"] == "milterd"          # [outbound] state_dir of milterd.service
    main = _units((REPO / "contrib/systemd/milterd.service").read_text())["Service"]
    assert main["User"] == svc["User"] and main["StateDirectory"] == svc["StateDirectory"]
    assert main["ExecStart"].split()[0] == svc["ExecStart"].split()[0]
    tm = _units(timer)["Timer"]
    assert tm["Persistent"] == "true" and tm["RandomizedDelaySec"]
    assert tm["Unit"] == "milterd-tlsrpt.service"
    # the first run of a day is shortly after 00:00 UTC
    r = subprocess.run([tool, "calendar", "*-*-* 00:10:00 UTC"], capture_output=True, text=True)
    assert r.returncode == 0
    assert "OnCalendar=*-*-* 00:10:00 UTC" in timer
