"""The partner certificate watch (#18) end to end: real ``milterd run`` processes (their store
services, the watch and the ``partner_watch`` plugin), a real private Postfix with the policy
service (fingerprints and public-key fingerprints arrive through it), real TLS, a real SQLite
store shared by two milterd "hosts", loopback MX hosts for the outbound probes found through a
loopback DNS server, and the shipped alert rules run by promtool on series made from what was
scraped from ``/metrics``.

Nothing sleeps: every wait is a readiness check (``wait_until`` on /metrics, the store or the
CLI's output).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from milterd.core.app import App
from milterd.core.config import parse_config
from milterd.lab.net import free_port, wait_for_unix_socket
from milterd.lab.smtp import client_context, make_message, send
from milterd.lab.wait import wait_until
from milterd.policy import domain_security as ds
from milterd.session import CertVerify, Connection, Message, TlsFacts
from milterd.store.api import Observation, open_store
from milterd.watch import state as st

from support import TESTS_DIR, MilterdFactory, make_lab_dir

REPO = TESTS_DIR.parent
RULES = REPO / "contrib" / "prometheus" / "milterd-watch-rules.yml"
RCPT = "user@contoso.test"
DAY = 86400.0
INSTANCE = "mx1:9487"


# ----------------------------------------------------------------------------- helpers

def plugin_config() -> str:
    """Load the plugin by module name until its entry point is installed (pyproject)."""
    names = {ep.name for ep in entry_points(group="milterd.plugins")}
    if "partner_watch" in names:
        return ""
    return '[plugins]\nmodules = ["milterd_plugins.partner_watch"]\n'


def metrics(port: int) -> list[tuple[str, dict, float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return [(s.name, dict(s.labels), float(s.value))
            for f in text_string_to_metric_families(text) for s in f.samples]


def value(samples, name: str, **labels) -> float | None:
    for n, lab, v in samples:
        if n == name and all(lab.get(k) == x for k, x in labels.items()):
            return v
    return None


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "milterd", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def _go_value(v: float) -> str:
    return str(int(v)) if v == int(v) else repr(v)


def humanize_duration(v: float) -> str:
    """Prometheus' humanizeDuration (template.go), for the expected annotations."""
    if v == 0:
        return "0s"
    if abs(v) < 1:
        raise AssertionError("not needed here")
    sign = "-" if v < 0 else ""
    d = int(abs(v))
    s, m, h, days = d % 60, d // 60 % 60, d // 3600 % 24, d // 86400
    if days:
        return f"{sign}{days}d {h}h {m}m {s}s"
    if h:
        return f"{sign}{h}h {m}m {s}s"
    if m:
        return f"{sign}{m}m {s}s"
    return f"{sign}{abs(v):.4g}s"


def expected_alert(alert: str, labels: dict, value_: float) -> dict:
    """exp_labels and exp_annotations of ``alert`` from the shipped rule file, expanded."""
    rule = next(r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
                if r.get("alert") == alert)

    def expand(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m[1]], text)
        text = text.replace("{{ $value | humanizeDuration }}", humanize_duration(value_))
        return text.replace("{{ $value }}", _go_value(value_))

    return {"exp_labels": {**rule.get("labels", {}), **labels},
            "exp_annotations": {k: expand(v) for k, v in rule["annotations"].items()}}


def promtool_test(tmp: Path, series: dict[str, list[float]], cases: list[tuple]) -> None:
    """Run the shipped watch rules on ``series`` (one sample a minute from 0m); ``cases``:
    (eval minute, alertname, [expected_alert(...), ...])."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: scripts/setup.sh installs Debian's prometheus package"
    n = max(len(v) for v in series.values())
    doc = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": f'up{{job="milterd",instance="{INSTANCE}"}}',
                          "values": " ".join(["1"] * n)}] +
                        [{"series": k, "values": " ".join(repr(float(x)) for x in v)}
                         for k, v in series.items()],
        "alert_rule_test": [{"eval_time": f"{m}m", "alertname": a, "exp_alerts": exp}
                            for m, a, exp in cases]}]}
    path = tmp / "generated-watch.test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=10000))
    r = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr + "\n" + path.read_text()


def series_name(name: str, partner: str, direction: str | None = None) -> str:
    d = f',direction="{direction}"' if direction else ""
    return f'{name}{{job="milterd",instance="{INSTANCE}",partner="{partner}"{d}}}'


def hold(points: list[float], minutes: int = 20) -> list[float]:
    """Each scraped value held for ``minutes`` one-minute samples."""
    return [p for p in points for _ in range(minutes)]


# ----------------------------------------------------------------------------- in process

CONFIG = parse_config(f"""
[partners."renew.test"]
receive = true
[partners."keypin.test"]
receive = true
pins = ["key-sha256:{"AB:" * 31}AB"]
[partners."mx.test"]
send = true
""")


def test_state_history_pending_pins_and_expiry():
    app = App(CONFIG)
    items: list[dict] = []
    s = st.WatchState(st.watch_metrics(app), CONFIG, submit=items.append, host="mx1")
    reg = app.metrics.registry
    changes = lambda p, d="inbound": reg.get_sample_value(  # noqa: E731
        "milterd_partner_certificate_changes_total", {"partner": p, "direction": d})
    assert changes("renew.test") == 0 and changes("mx.test", "outbound") == 0
    assert changes("mx.test") is None                   # not a receive partner: no series
    # before the fleet's history is known: held, not judged
    assert s.observe("renew.test", "inbound", cert_sha256="C1", subject="CN=a") is None
    assert s.observe("renew.test", "inbound", cert_sha256="C0", subject="CN=a") is None
    assert changes("renew.test") == 0
    old = Observation(st.KIND, "renew.test|inbound|C0", "renew.test", {"not_after": 5.0},
                      1.0, 2.0, 3, "mx2", "mx2")
    s.merge_history([old])
    assert changes("renew.test") == 1                   # C1 new, C0 known to the fleet
    assert s.observe("renew.test", "inbound", cert_sha256="C1") is False
    assert s.observe("renew.test", "inbound", cert_sha256="C2", subject="CN=a") is True
    assert changes("renew.test") == 2
    # pins: key pin matches, re-key does not; expiry known from another sighting (outbound)
    pin = lambda: reg.get_sample_value(  # noqa: E731
        "milterd_partner_certificate_pin_match", {"partner": "keypin.test",
                                                  "direction": "inbound"})
    assert s.observe("keypin.test", "inbound", cert_sha256="K1", pubkey_sha256="AB:" * 31 + "AB")
    assert pin() == 1
    assert reg.get_sample_value("milterd_partner_certificate_pin_match",
                                {"partner": "renew.test", "direction": "inbound"}) is None
    s.observe("keypin.test", "inbound", cert_sha256="K2", pubkey_sha256="CD")
    assert pin() == 0
    expiry = lambda p, d: reg.get_sample_value(  # noqa: E731
        "milterd_partner_certificate_expiry_timestamp_seconds", {"partner": p, "direction": d})
    assert expiry("renew.test", "inbound") is None      # no MTA gives notAfter
    s.observe("renew.test", "inbound", cert_sha256="C0")  # the fleet knew its notAfter
    assert expiry("renew.test", "inbound") == 5.0
    s.observe("renew.test", "inbound", cert_sha256="C2")
    assert expiry("renew.test", "inbound") is None      # never an older certificate's date
    s.observe("mx.test", "outbound", cert_sha256="M1", not_after=1234.0)
    assert expiry("mx.test", "outbound") == 1234.0
    # unknown partners are ignored; every sighting is one store item
    assert s.observe("nobody.test", "inbound", cert_sha256="X") is None
    assert len(items) == 9 and items[-1]["k"] == "mx.test|outbound|M1"
    assert items[-1]["a"]["not_after"] == 1234.0 and items[-1]["h"] == "mx1"
    # a reload that unpins keypin.test removes its pin series
    s.configure(parse_config('[partners."keypin.test"]\nreceive = true\n'))
    assert pin() is None and changes("renew.test") is None


def test_apply_coalesces_exactly(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    store.migrate()
    items = [{"k": "a.test|inbound|C1", "d": "a.test", "t": t, "h": h, "a": {"n": t}}
             for t, h in ((5.0, "mx1"), (3.0, "mx1"), (9.0, "mx2"), (7.0, "mx1"))]
    st.apply_observations(store, items[:2])
    st.apply_observations(store, items[2:])
    (o,) = store.observations(st.KIND)
    assert (o.count, o.first_seen, o.last_seen, o.first_host, o.last_host) == \
        (4, 3.0, 9.0, "mx1", "mx2")
    assert o.attrs == {"n": 9.0}
    hosts = {x.key: x.count for x in store.observations(st.HOST_KIND)}
    assert hosts == {"a.test|inbound|C1|mx1": 3, "a.test|inbound|C1|mx2": 1}
    store.close()


def test_plugin_never_raises_into_the_milter():
    from milterd_plugins import partner_watch

    class Broken:
        def observe(self, *a, **kw):
            raise RuntimeError("boom")

    app = App(CONFIG)
    st.set_current_state(app, Broken())  # type: ignore[arg-type]
    conn = Connection(id="c", tls=TlsFacts(version="TLSv1.3", verify=CertVerify.OK,
                                           subject_cn="mail.renew.test",
                                           fingerprint_sha256="AA"))
    msg = Message(sender="<a@renew.test>")
    msg.stash[ds.RESULT_KEY] = ds.Result(ds.PASS, "renew.test", partner="renew.test")
    assert partner_watch.milterd_message_done(app=app, connection=conn, message=msg) is None
    st.set_current_state(app, None)


# ----------------------------------------------------------------------------- Postfix

def _inbound_config(root: Path, certs: dict, store_url: str, host: str, metrics_port: int,
                    policy_sock: Path) -> str:
    state = root / f"state-{host}"
    state.mkdir()
    return (f'[domain_security]\nmode = "enforce"\n'
            f'[partners."renew.test"]\nreceive = true\n'
            f'[partners."keypin.test"]\nreceive = true\nmode = "report"\n'
            f'pins = ["key-sha256:{certs["keypin"].pubkey_sha256}"]\n'
            f'[policy]\nlisten = "unix:{policy_sock}"\n'
            f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
            f'[outbound]\nstate_dir = "{state}"\n'
            f'[store]\nurl = "{store_url}"\nhost = "{host}"\n'
            f'[watch]\nprobe_interval = 0\n' + plugin_config())


class Host:
    """One milterd "host" (policy service, /metrics, the fleet store) behind its own Postfix."""

    def __init__(self, factory: MilterdFactory, postfix_factory, root: Path, certs: dict,
                 store_url: str, name: str) -> None:
        self.metrics_port = free_port()
        sock = root / f"policy-{name}.sock"
        self.milterd = factory(_inbound_config(root, certs, store_url, name, self.metrics_port,
                                               sock), name=name)
        assert wait_for_unix_socket(sock, timeout=15), self.milterd.log_tail()
        self.config_path = str(self.milterd.config_path)
        self.postfix = postfix_factory(self.milterd.socket_spec, policy_service=f"unix:{sock}")
        wait_until(lambda: value(metrics(self.metrics_port), "milterd_store_up") == 1, 30,
                   what=f"{name}: the store services up")

    def mail(self, partners, domain: str, cert, subject: str) -> None:
        sender = f"alice@{domain}"
        tls = client_context(partners.pki.ca_path, cert.cert_path, cert.key_path)
        r = send(self.postfix.port, sender, [RCPT], make_message(sender, RCPT, subject),
                 tls=tls)
        assert r.accepted, (subject, r)

    def changes(self, partner: str) -> float | None:
        return value(metrics(self.metrics_port), "milterd_partner_certificate_changes_total",
                     partner=partner, direction="inbound")


def _certs(pki) -> dict:
    c = {"renew": pki.issue("w18-renew", "mail.renew.test"),
         "keypin": pki.issue("w18-keypin", "mail.keypin.test", org="Keypin", self_signed=True)}
    c["renew2"] = pki.issue("w18-renew2", "mail.renew.test")
    c["keypin-same-key"] = pki.issue("w18-keypin-2", "mail.keypin.test", org="Keypin",
                                     self_signed=True, key=c["keypin"].key)
    c["keypin-rekeyed"] = pki.issue("w18-keypin-3", "mail.keypin.test", org="Keypin",
                                    self_signed=True)
    return c


def _pins(config_path: str, domain: str) -> str:
    r = cli("partners", "-c", config_path, "pin", domain)
    return r.stdout if r.returncode == 0 else ""


@pytest.mark.postfix
def test_reissue_rekey_pins_and_alerts_through_postfix(partners, postfix_factory, tmp_path):
    """Issue #18, done when 1: a re-issued client certificate is a change within one message;
    `partners pin` prints the new pins; a key-pinned partner keeps pin_match 1 across a same-key
    re-issue and drops to 0 at a re-key; the shipped alerts fire on what was scraped."""
    certs = _certs(partners.pki)
    root = make_lab_dir("milterd-watch-")
    factory = MilterdFactory(root)
    try:
        url = f"sqlite:///{root}/fleet.db"
        h = Host(factory, postfix_factory, root, certs, url, "mx1")
        port = h.metrics_port
        s0 = metrics(port)
        assert value(s0, "milterd_partner_certificate_changes_total", partner="renew.test",
                     direction="inbound") == 0        # every configured partner: from 0
        assert value(s0, "milterd_partner_certificate_pin_match", partner="keypin.test") is None

        def pin_match():
            return value(metrics(port), "milterd_partner_certificate_pin_match",
                         partner="keypin.test", direction="inbound")

        # the first certificates ever seen: a change each
        h.mail(partners, "renew.test", certs["renew"], "w18 renew 1")
        wait_until(lambda: h.changes("renew.test") == 1, 10, what="the first certificate")
        h.mail(partners, "renew.test", certs["renew"], "w18 renew 1 again")
        h.mail(partners, "keypin.test", certs["keypin"], "w18 keypin 1")
        wait_until(lambda: h.changes("keypin.test") == 1 and pin_match() == 1, 10,
                   what="keypin's first certificate, pin matched")
        wait_until(lambda: f"key-sha256:{certs['renew'].pubkey_sha256}"
                   in _pins(h.config_path, "renew.test"), 15, what="the first pins in the store")
        assert h.changes("renew.test") == 1                 # the same certificate again
        s1 = metrics(port)

        # the partner re-issues its client certificate: a change right after one message
        h.mail(partners, "renew.test", certs["renew2"], "w18 renew 2")
        wait_until(lambda: h.changes("renew.test") == 2, 5, what="the re-issue as a change")
        # same-key re-issue of the key-pinned partner: a change, the pin still matches
        h.mail(partners, "keypin.test", certs["keypin-same-key"], "w18 keypin same key")
        wait_until(lambda: h.changes("keypin.test") == 2, 5, what="keypin's re-issue")
        assert pin_match() == 1
        s2 = metrics(port)
        # `partners pin` prints the new pins (the store has them: shipped from the spool)
        wait_until(lambda: f"cert-sha256:{certs['renew2'].sha256}"
                   in _pins(h.config_path, "renew.test"), 15, what="the new pins in the store")
        out = _pins(h.config_path, "renew.test")
        assert f'"cert-sha256:{certs["renew2"].sha256}",' in out
        assert f'"key-sha256:{certs["renew2"].pubkey_sha256}",' in out
        assert certs["renew"].sha256 not in out             # the old one is not the last seen

        # the re-key: report mode delivers it (stamped fail), the pin no longer matches
        h.mail(partners, "keypin.test", certs["keypin-rekeyed"], "w18 keypin rekeyed")
        wait_until(lambda: h.changes("keypin.test") == 3 and pin_match() == 0, 5,
                   what="the re-key: a change, pin_match 0")
        s3 = metrics(port)
        assert value(s3, "milterd_partner_certificate_expiry_timestamp_seconds",
                     partner="renew.test") is None          # no MTA gives notAfter
        assert value(s3, "milterd_partner_certificate_last_seen_timestamp_seconds",
                     partner="keypin.test", direction="inbound") >= time.time() - 60
        wait_until(lambda: f"key-sha256:{certs['keypin-rekeyed'].pubkey_sha256}"
                   in _pins(h.config_path, "keypin.test"), 15, what="the re-keyed pins")
        text = cli("partners", "-c", h.config_path).stdout
        block = text.split('[partners."keypin.test"]')[1]
        assert "last result: fail (pin_mismatch)" in block, block
        assert f"#   key-sha256:{certs['keypin-rekeyed'].pubkey_sha256}" in block, block
        assert "3 certificate(s) known" in block
        # Postfix names a certificate's subject and issuer (CN) only when it verified it
        renew = text.split('[partners."renew.test"]')[1].split("[partners.")[0]
        assert "#   subject: mail.renew.test" in renew, renew
        assert "#   issuer: milterd Test CA" in renew, renew
        assert "2 certificate(s) known" in renew and "last result: pass" in renew, renew

        # promtool on the scraped values: one sample a minute, each scrape held 20 minutes
        snaps = [s0, s1, s2, s3]
        series = {}
        for p in ("renew.test", "keypin.test"):
            series[series_name("milterd_partner_certificate_changes_total", p, "inbound")] = \
                hold([value(s, "milterd_partner_certificate_changes_total", partner=p,
                            direction="inbound") for s in snaps])
        pm = [value(s, "milterd_partner_certificate_pin_match", partner="keypin.test")
              for s in snaps[1:]]
        # pin_match exists from keypin's first message on: minutes 0-19 hold s1's value too
        series[series_name("milterd_partner_certificate_pin_match", "keypin.test",
                           "inbound")] = hold([pm[0]] + pm)
        lab = lambda p: {"job": "milterd", "partner": p, "direction": "inbound"}  # noqa: E731
        changed = lambda *ps: [expected_alert("PartnerCertificateChanged", lab(p), 1)  # noqa
                               for p in ps]
        promtool_test(tmp_path, series, [
            (15, "PartnerCertificateChanged", []),
            (25, "PartnerCertificateChanged", changed("keypin.test", "renew.test")),
            (45, "PartnerCertificateChanged", changed("keypin.test", "renew.test")),
            (65, "PartnerCertificateChanged", changed("keypin.test")),
            (45, "PartnerCertificatePinMismatch", []),      # same key: no pin alert
            (65, "PartnerCertificatePinMismatch",
             [expected_alert("PartnerCertificatePinMismatch", lab("keypin.test"), 1)]),
        ])
    finally:
        factory.close()


@pytest.mark.postfix
def test_two_hosts_share_one_history(partners, postfix_factory, tmp_path):
    """Issue #18, done when 3: two milterd hosts (each behind its own Postfix) on one SQLite
    store: one history per partner — a certificate the first host recorded is not new on the
    second, `milterd partners` counts both hosts' sightings and names both."""
    certs = _certs(partners.pki)
    root = make_lab_dir("milterd-watch2-")
    factory = MilterdFactory(root)
    try:
        url = f"sqlite:///{root}/fleet.db"
        a = Host(factory, postfix_factory, root, certs, url, "mx1")
        b = Host(factory, postfix_factory, root, certs, url, "mx2")
        for i in range(3):
            a.mail(partners, "renew.test", certs["renew"], f"w18 fleet a{i}")
        wait_until(lambda: a.changes("renew.test") == 1, 10, what="mx1: the first certificate")

        def fleet_count() -> dict:
            r = cli("partners", "-c", a.config_path, "--json")
            item = next(x for x in json.loads(r.stdout) if x["partner"] == "renew.test")
            return (item.get("seen") or {}).get("inbound") or {}

        wait_until(lambda: fleet_count().get("count") == 3, 15, what="mx1's sightings stored")
        # mx2 learns the history from the store (its refresh), then sees the same certificate
        b.milterd.signal(signal.SIGHUP)                     # a reload re-reads the history now
        wait_until(lambda: "learnt from the fleet" in b.milterd.log_text(), 10,
                   what="mx2 read the fleet's history")
        for i in range(2):
            b.mail(partners, "renew.test", certs["renew"], f"w18 fleet b{i}")
        wait_until(lambda: fleet_count().get("count") == 5, 15, what="both hosts' sightings")
        assert b.changes("renew.test") == 0                 # known to the fleet: not new here
        seen = fleet_count()
        assert seen["hosts"] == {"mx1": {"count": 3, "last_seen": seen["hosts"]["mx1"]
                                         ["last_seen"]},
                                 "mx2": {"count": 2, "last_seen": seen["hosts"]["mx2"]
                                         ["last_seen"]}}
        assert (seen["first_host"], seen["last_host"]) == ("mx1", "mx2")
        assert seen["cert_sha256"] == certs["renew"].sha256
        text = cli("partners", "-c", b.config_path).stdout
        block = text.split('[partners."renew.test"]')[1].split("[partners.")[0]
        assert "5 times; hosts: mx1 (3), mx2 (2)" in block, block
    finally:
        factory.close()


# ----------------------------------------------------------------------------- outbound probes

@pytest.fixture
def dns_srv():
    from dns_server import DnsServer

    with DnsServer() as srv:
        yield srv


def test_outbound_probe_expiry_and_would_fail(partners, dns_srv, milterd_factory, tmp_path):
    """Issue #18, done when 2: a send partner's loopback MX whose certificate expires in 3 days
    gives expiry ≈ now + 3 days and PartnerCertificateExpiringSoon fires on it; one whose MX
    certificate names another host gives probe_success 0 ("would fail"), and `milterd partners`
    shows it."""
    from test_watch_probe import MX, with_chain

    pki = partners.pki
    soon = pki.issue("w18-mx-soon", "mx.soon.test", days=3)
    wrong = pki.issue("w18-mx-wrong", "mx.elsewhere.test")
    mx1 = MX("127.0.0.2", cert=with_chain(pki, soon, pki.ca_cert), key=soon.key_path)
    try:
        mx2 = MX("127.0.0.3", mx1.port, cert=wrong.cert_path, key=wrong.key_path)
    except OSError:
        mx1.stop()
        raise
    try:
        dns_srv.add("soon.test", "MX", ["10 mx.soon.test."])
        dns_srv.add("mx.soon.test", "A", ["127.0.0.2"])
        dns_srv.add("wrongname.test", "MX", ["10 mx.wrongname.test."])
        dns_srv.add("mx.wrongname.test", "A", ["127.0.0.3"])
        port = free_port()
        state = tmp_path / "state"
        cfg = (f'[partners."soon.test"]\nsend = true\n'
               f'[partners."wrongname.test"]\nsend = true\n'
               f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
               f'[outbound]\nstate_dir = "{state}"\ndns_servers = ["127.0.0.1:{dns_srv.port}"]\n'
               f'[store]\nurl = "sqlite:///{state}/milterd.db"\nhost = "mx1"\n'
               f'[watch]\nprobe_interval = 3600\nprobe_timeout = 5\nprobe_port = {mx1.port}\n'
               f'probe_ca_file = "{pki.cert_path}"\n' + plugin_config())
        state.mkdir()
        t0 = time.time()
        proc = milterd_factory(cfg)
        got = {}

        def probed() -> bool:
            s = metrics(port)
            got["s"] = s
            return all(value(s, "milterd_partner_probe_timestamp_seconds", partner=p)
                       for p in ("soon.test", "wrongname.test"))

        wait_until(probed, 30, what="both partners probed (the first probe comes within "
                   "FIRST_SPREAD s of the start)")
        s = got["s"]
        expiry = value(s, "milterd_partner_certificate_expiry_timestamp_seconds",
                       partner="soon.test", direction="outbound")
        assert expiry == soon.cert.not_valid_after_utc.timestamp()
        assert abs(expiry - (t0 + 3 * DAY)) < 2 * DAY
        assert value(s, "milterd_partner_probe_success", partner="soon.test") == 1
        assert value(s, "milterd_partner_probe_success", partner="wrongname.test") == 0
        assert value(s, "milterd_partner_certificate_changes_total", partner="soon.test",
                     direction="outbound") == 1
        assert value(s, "milterd_partner_certificate_pin_match", partner="soon.test") is None

        def shown() -> str:
            return cli("partners", "-c", str(proc.config_path)).stdout

        wait_until(lambda: "would fail" in shown(), 15, what="the probe results in the store")
        text = shown()
        block = text.split('[partners."wrongname.test"]')[1]
        assert "outbound probe by mx1" in block and "would fail" in block, block
        assert "name_mismatch" in block and "mx.elsewhere.test" in block, block
        soon_block = text.split('[partners."soon.test"]')[1].split("[partners.")[0]
        assert "would pass" in soon_block and "CN=mx.soon.test" in soon_block, soon_block
        pins = cli("partners", "-c", str(proc.config_path), "pin", "soon.test")
        assert pins.returncode == 0 and f'"cert-sha256:{soon.sha256}",' in pins.stdout

        # promtool: the scraped expiry, as seconds left at the scrape, held two hours
        scraped_at = value(s, "milterd_partner_probe_timestamp_seconds", partner="soon.test")
        left = expiry - scraped_at
        series = {
            series_name("milterd_partner_certificate_expiry_timestamp_seconds", "soon.test",
                        "outbound"): [left] * 121,
            series_name("milterd_partner_probe_success", "soon.test"): [1.0] * 121,
            series_name("milterd_partner_probe_success", "wrongname.test"): [0.0] * 121,
        }
        lab = {"job": "milterd", "partner": "soon.test", "direction": "outbound"}
        promtool_test(tmp_path, series, [
            (30, "PartnerCertificateExpiringSoon", []),      # for: 1h
            (70, "PartnerCertificateExpiringSoon",
             [expected_alert("PartnerCertificateExpiringSoon", lab, left - 70 * 60)]),
            (80, "PartnerProbeWouldFail", []),               # for: 90m
            (100, "PartnerProbeWouldFail",
             [expected_alert("PartnerProbeWouldFail",
                             {"job": "milterd", "partner": "wrongname.test"}, 1)]),
        ])
    finally:
        mx1.stop()
        mx2.stop()
