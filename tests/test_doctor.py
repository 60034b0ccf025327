"""``milterd doctor`` (#19): pure checks over parsed facts, then the whole command against a real
private Postfix (and a real Sendmail .cf), each broken in exactly one way.

The Postfix cases read a real instance's configuration with the real ``postconf``: one correct
instance runs (milterd's milter, policy, socketmap and metrics serving it); each broken case
copies its config directory and changes one thing with ``postconf -c COPY -e/-P/-F`` (or one key
of milterd's config), runs ``milterd doctor`` as a process and asserts the exact set of failing
check ids, the fix line and the exit status.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest
from cryptography.hazmat.primitives import hashes

from milterd.core.config import parse_config
from milterd.doctor.cli import render_json, render_text
from milterd.doctor.milterd_checks import (Probe, RuntimeFacts, check_certificates,
                                           check_metrics, check_milter, check_policy,
                                           check_socketmap, judge_socketmap_answer)
from milterd.doctor.model import Check, exit_code
from milterd.doctor.postfix import (PathProbe, PostfixFacts, Service, brace_item,
                                    check_ask_ccert, check_ca, check_fingerprint_digest,
                                    check_mail_macros, check_maillog_file,
                                    check_milter_default_action, check_milter_socket_access,
                                    check_policy_service, check_smtp_tls_policy_maps,
                                    check_smtpd_milters, check_tls_security_level, check_tlsrpt,
                                    host_path, parse_services, split_list, usable_by)
from milterd.doctor.sendmail import (check_client_certs, check_filter, check_filter_flags,
                                     check_fingerprint_algorithm, check_macros, parse_cf)
from milterd.lab.net import free_port
from milterd.lab.pki import TestPKI
from milterd.lab.postfix import PostfixLab, PostfixTLS
from milterd.mta.milter_codec import SMFIM_ENVFROM

from support import MilterdFactory, make_lab_dir

REPO = Path(__file__).resolve().parent.parent
PIN = "AB:" * 31 + "AB"
Q = "/var/spool/postfix"
SMTPD = Service("smtp", "inet", False, "smtpd")
SMTPD_CHROOT = Service("smtp", "inet", True, "smtpd")

# -- pure checks ------------------------------------------------------------------------------
CONFIG = parse_config(f"""
[milter]
listen = "unix:{Q}/milterd/milter.sock"
[policy]
listen = "unix:{Q}/milterd/policy.sock"
[socketmap]
listen = "127.0.0.1:10041"
[outbound]
maillog = "/var/log/postfix.log"
[partners."woodgrovebank.test"]
receive = true
pins = ["cert-sha256:{PIN}"]
[partners."fabrikam.test"]
receive = true
trusted_issuers = ["Fabrikam CA"]
[partners."northwind.test"]
send = true
""")

GOOD_PARAMS = {
    "queue_directory": Q, "mail_owner": "postfix", "mail_version": "3.7.11",
    "smtpd_milters": "unix:milterd/milter.sock", "milter_default_action": "tempfail",
    "smtpd_tls_security_level": "may", "smtpd_tls_ask_ccert": "yes",
    "smtpd_tls_CAfile": "/etc/ssl/partners.pem", "smtpd_tls_CApath": "",
    "milter_mail_macros": "i {auth_type}",
    "smtpd_recipient_restrictions": "check_policy_service unix:milterd/policy.sock, "
                                    "permit_mynetworks, reject_unauth_destination",
    "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
    "smtpd_tls_fingerprint_digest": "sha256",
    "smtp_tls_policy_maps": "socketmap:inet:127.0.0.1:10041:tlspolicy",
    "maillog_file": "/var/log/postfix.log",
}
SOCK = PathProbe(f"{Q}/milterd/milter.sock", True, "socket", 0o140660, 0, 120, 1, 7,
                 (("/", 0o40755, 0, 0), ("/var", 0o40755, 0, 0), ("/var/spool", 0o40755, 0, 0),
                  (Q, 0o40755, 0, 0), (f"{Q}/milterd", 0o42750, 110, 120)))
CAFILE = PathProbe("/etc/ssl/partners.pem", True, "file", 0o100644, 0, 0, 1, 9)


def facts(services=(SMTPD,), paths=(SOCK, CAFILE), **params) -> PostfixFacts:
    p = {**GOOD_PARAMS, **params}
    return PostfixFacts("/etc/postfix", tuple(sorted(p.items())), frozenset(p), tuple(services),
                        owner_uid=110, owner_gid=120, paths=tuple(paths),
                        ca_subjects=(("/etc/ssl/partners.pem", ("Fabrikam CA", "/CN=Fabrikam CA")),))


MACROS = {SMFIM_ENVFROM: ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}",
                          "{cert_issuer}", "{verify}", "i")}
ALL_POSTFIX = [check_smtpd_milters, check_milter_socket_access, check_milter_default_action,
               check_tls_security_level, check_ask_ccert, check_ca, check_policy_service,
               check_fingerprint_digest, check_smtp_tls_policy_maps, check_maillog_file,
               check_tlsrpt]


def test_good_postfix_facts_pass_every_check():
    pf = facts()
    results = [f(pf, CONFIG) for f in ALL_POSTFIX] + [check_mail_macros(pf, CONFIG, MACROS)]
    assert [(c.id, c.status) for c in results if c.status != "ok"] == []
    assert len({c.id for c in results}) == len(results)


@pytest.mark.parametrize("check, params, fix", [
    (check_smtpd_milters, {"smtpd_milters": "inet:127.0.0.1:8891"},
     "postconf -c /etc/postfix -e 'smtpd_milters = unix:milterd/milter.sock, "
     "inet:127.0.0.1:8891'"),
    (check_milter_default_action, {"milter_default_action": "accept"},
     "postconf -c /etc/postfix -e 'milter_default_action = tempfail'"),
    (check_milter_default_action, {"milter_default_action": "shutdown"},
     "postconf -c /etc/postfix -e 'milter_default_action = tempfail'"),
    (check_milter_default_action,
     {"smtpd_milters": "{ unix:milterd/milter.sock, default_action=accept }"},
     "postconf -c /etc/postfix -e 'smtpd_milters = unix:milterd/milter.sock'"),
    (check_tls_security_level, {"smtpd_tls_security_level": "none"},
     "postconf -c /etc/postfix -e 'smtpd_tls_security_level = may'"),
    (check_ask_ccert, {"smtpd_tls_ask_ccert": "no"},
     "postconf -c /etc/postfix -e 'smtpd_tls_ask_ccert = yes'"),
    (check_ca, {"smtpd_tls_CAfile": ""},
     "postconf -c /etc/postfix -e 'smtpd_tls_CAfile = /etc/ssl/certs/ca-certificates.crt'"),
    (check_ca, {"smtpd_tls_CAfile": "/nonexistent.pem"},
     "postconf -c /etc/postfix -e 'smtpd_tls_CAfile = /etc/ssl/certs/ca-certificates.crt'"),
    (check_policy_service, {"smtpd_recipient_restrictions":
                            "permit_mynetworks, check_policy_service unix:milterd/policy.sock, "
                            "reject_unauth_destination"},
     "postconf -c /etc/postfix -e 'smtpd_recipient_restrictions = check_policy_service "
     "unix:milterd/policy.sock, permit_mynetworks, reject_unauth_destination'"),
    (check_policy_service, {"smtpd_recipient_restrictions": "reject_unauth_destination"},
     "postconf -c /etc/postfix -e 'smtpd_recipient_restrictions = check_policy_service "
     "unix:milterd/policy.sock, reject_unauth_destination'"),
    (check_fingerprint_digest, {"smtpd_tls_fingerprint_digest": "md5"},
     "postconf -c /etc/postfix -e 'smtpd_tls_fingerprint_digest = sha256'"),
    (check_smtp_tls_policy_maps, {"smtp_tls_policy_maps": ""},
     "postconf -c /etc/postfix -e 'smtp_tls_policy_maps = "
     "socketmap:inet:127.0.0.1:10041:tlspolicy'"),
    (check_smtp_tls_policy_maps, {"smtp_tls_policy_maps": "socketmap:inet:127.0.0.1:10041:x"},
     "postconf -c /etc/postfix -e 'smtp_tls_policy_maps = "
     "socketmap:inet:127.0.0.1:10041:tlspolicy'"),
    (check_maillog_file, {"maillog_file": ""},
     "postconf -c /etc/postfix -e 'maillog_file = /var/log/postfix.log'"),
])
def test_one_broken_parameter_fails_its_check_with_the_fix(check, params, fix):
    c = check(facts(**params), CONFIG)
    assert (c.status, c.fix) == ("fail", fix), c
    assert c.id == f"postfix.{check.__name__.removeprefix('check_')}" or c.id.startswith(
        "postfix.")


def test_per_service_override_is_what_that_service_uses():
    svc = Service("submission", "inet", False, "smtpd",
                  (("smtpd_milters", "inet:127.0.0.1:8891"), ("smtpd_tls_ask_ccert", "no")))
    pf = facts(services=(SMTPD, svc))
    c = check_smtpd_milters(pf, CONFIG)
    assert c.status == "fail" and "submission/inet" in c.message
    assert c.fix == ("postconf -c /etc/postfix -P 'submission/inet/smtpd_milters="
                     "unix:milterd/milter.sock,inet:127.0.0.1:8891'")
    c = check_ask_ccert(pf, CONFIG)
    assert (c.status, c.fix) == ("fail", "postconf -c /etc/postfix -PX "
                                         "'submission/inet/smtpd_tls_ask_ccert'")


def test_chroot_resolution_of_unix_paths():
    assert host_path("milterd/m.sock", Q, False) == f"{Q}/milterd/m.sock"
    assert host_path("milterd/m.sock", Q, True) == f"{Q}/milterd/m.sock"
    assert host_path("/run/milterd/m.sock", Q, False) == "/run/milterd/m.sock"
    assert host_path("/run/milterd/m.sock", Q, True) == f"{Q}/run/milterd/m.sock"


def test_chrooted_smtpd_cannot_reach_a_socket_outside_the_queue_directory():
    config = replace(CONFIG, milter=replace(CONFIG.milter, listen="unix:/run/milterd/m.sock"))
    run = PathProbe("/run/milterd/m.sock", True, "socket", 0o140660, 0, 120, 2, 3)
    pf = facts(services=(SMTPD_CHROOT,), paths=(run, CAFILE),
               smtpd_milters="unix:/run/milterd/m.sock")
    assert check_smtpd_milters(pf, config).status == "ok"
    c = check_milter_socket_access(pf, config)
    assert c.status == "fail" and f"{Q}/run/milterd/m.sock" in c.message, c
    assert c.fix.startswith(f'[milter] listen = "unix:{Q}/milterd/milter.sock"')
    # unchrooted, the same line works
    assert check_milter_socket_access(facts(services=(SMTPD,), paths=(run, CAFILE),
                                            smtpd_milters="unix:/run/milterd/m.sock"),
                                      config).status == "ok"


def test_socket_permissions_use_the_primary_group_only():
    sock = replace(SOCK, gid=999)
    c = check_milter_socket_access(facts(paths=(sock, CAFILE)), CONFIG)
    assert c.status == "fail" and "cannot connect" in c.message
    assert usable_by(SOCK, 110, 120, 2) is None
    assert usable_by(replace(SOCK, mode=0o140600), 110, 120, 2) is not None
    closed = replace(SOCK, parents=SOCK.parents[:-1] + ((f"{Q}/milterd", 0o40700, 0, 0),))
    assert "not searchable" in usable_by(closed, 110, 120, 2)
    assert usable_by(replace(SOCK, mode=0o140600), 0, 0, 2) is None  # root


def test_ca_must_hold_the_trusted_issuers():
    pf = replace(facts(), ca_subjects=(("/etc/ssl/partners.pem", ("Other CA",)),))
    c = check_ca(pf, CONFIG)
    assert c.status == "fail" and "'Fabrikam CA' (fabrikam.test)" in c.message
    # only pinned partners: no CA needed
    pinned_only = parse_config(f'[partners."w.test"]\nreceive = true\n'
                               f'pins = ["cert-sha256:{PIN}"]\n')
    assert check_ca(facts(smtpd_tls_CAfile=""), pinned_only).status == "ok"


def test_capath_of_a_chrooted_smtpd_is_looked_up_inside_the_jail():
    config = parse_config('[domain_security]\nreceive_domains = ["f.test"]\n')
    outside = PathProbe("/etc/ssl/certs", True, "dir", 0o40755, 0, 0, 1, 5)
    pf = facts(services=(SMTPD_CHROOT,), paths=(SOCK, outside), smtpd_tls_CAfile="",
               smtpd_tls_CApath="/etc/ssl/certs")
    c = check_ca(pf, config)
    assert c.status == "fail" and f"inside the chroot ({Q}/etc/ssl/certs)" in c.message


def test_mail_macros_from_milter_negotiation_or_main_cf():
    pf = facts()
    assert check_mail_macros(pf, CONFIG, MACROS).status == "ok"
    c = check_mail_macros(pf, CONFIG, {SMFIM_ENVFROM: ("i",)})
    assert c.status == "fail" and c.fix == (
        "postconf -c /etc/postfix -e 'milter_mail_macros = i {auth_type} {tls_version} "
        "{cipher} {cipher_bits} {cert_subject} {cert_issuer}'")
    assert check_mail_macros(pf, CONFIG, None).status == "warn"
    full = facts(milter_mail_macros="i {tls_version} {cipher} {cipher_bits} {cert_subject} "
                                    "{cert_issuer}")
    assert check_mail_macros(full, CONFIG, None).status == "ok"


def test_policy_service_over_tcp_warns_and_without_listen_fails():
    tcp = replace(CONFIG, policy_listen=parse_config('[policy]\nlisten = "127.0.0.1:10040"\n')
                  .policy_listen)
    pf = facts(smtpd_recipient_restrictions="check_policy_service inet:127.0.0.1:10040, "
                                            "reject_unauth_destination")
    assert check_policy_service(pf, tcp).status == "warn"
    c = check_policy_service(facts(), replace(CONFIG, policy_listen=None))
    assert c.status == "fail" and c.fix.startswith("[policy] listen")
    # a permit in another list does not end this one
    pf = facts(smtpd_client_restrictions="permit_mynetworks")
    assert check_policy_service(pf, CONFIG).status == "ok"


def test_tlsrpt_needs_postfix_3_10():
    on = replace(CONFIG, socketmap_tlsrpt=True)
    c = check_tlsrpt(facts(), on)
    assert (c.status, c.fix) == ("fail", "[socketmap] tlsrpt = false   (milterd.toml)")
    assert check_tlsrpt(facts(mail_version="3.10.2"), on).status == "ok"
    assert check_tlsrpt(facts(), CONFIG).status == "ok"


def test_postconf_parsing():
    services = parse_services(
        "smtp/inet/service = smtp\nsmtp/inet/type = inet\nsmtp/inet/chroot = y\n"
        "smtp/inet/command = smtpd\nrelay/unix/chroot = -\nrelay/unix/command = smtp\n"
        "[::1]:25/inet/chroot = n\n[::1]:25/inet/command = /usr/lib/postfix/sbin/smtpd -v\n",
        "smtp/inet/smtpd_milters = unix:a,unix:b\n")
    assert services == (Service("smtp", "inet", True, "smtpd", (("smtpd_milters", "unix:a,unix:b"),)),
                        Service("relay", "unix", False, "smtp"),
                        Service("[::1]:25", "inet", False, "smtpd"))
    assert split_list("a, { inet:h:1, default_action=accept } b,c") == [
        "a", "{ inet:h:1, default_action=accept }", "b", "c"]
    assert brace_item("{ inet:h:1, default_action=accept }") == (
        "inet:h:1", {"default_action": "accept"})


# -- Sendmail, pure ----------------------------------------------------------------------------
SM_CONFIG = parse_config(f"""
[milter]
listen = "unix:/run/milterd/milter.sock"
[partners."woodgrovebank.test"]
receive = true
pins = ["cert-sha256:{PIN}"]
""")
GOOD_CF = """\
O InputMailFilters=milterd
O Milter.macros.envfrom=i, {verify}, {cert_subject}, {cert_issuer}, {tls_version}, {cipher}, {cipher_bits}, {cert_fp}
O CertFingerprintAlgorithm=sha256
O CACertFile=/etc/mail/ca.pem
Xmilterd, S=unix:/run/milterd/milter.sock, F=T, T=S:30s;R:30s;E:5m
"""
SM_CHECKS = [check_filter, check_filter_flags, check_macros, check_fingerprint_algorithm,
             check_client_certs]


def test_good_cf_passes_every_sendmail_check():
    sf = parse_cf(GOOD_CF)
    assert [(c.id, c.status) for f in SM_CHECKS for c in [f(sf, SM_CONFIG)]
            if c.status != "ok"] == []


@pytest.mark.parametrize("old, new, cid", [
    ("F=T, ", "", "sendmail.milter_flags"),
    ("F=T", "F=R", "sendmail.milter_flags"),
    ("O CertFingerprintAlgorithm=sha256\n", "", "sendmail.cert_fingerprint_algorithm"),
    (", {cert_fp}", "", "sendmail.milter_macros"),
    ("{verify}, ", "", "sendmail.milter_macros"),
    ("O InputMailFilters=milterd", "O InputMailFilters=", "sendmail.milter"),
    ("O CACertFile=/etc/mail/ca.pem\n", "O TLSSrvOptions=V\n", "sendmail.tls_client_certs"),
])
def test_sendmail_one_break_one_failure(old, new, cid):
    sf = parse_cf(GOOD_CF.replace(old, new))
    bad = {c.id for f in SM_CHECKS for c in [f(sf, SM_CONFIG)] if c.status == "fail"}
    # without the filter, its flags cannot be right either
    assert bad == ({cid, "sendmail.milter_flags"} if cid == "sendmail.milter" else {cid})


# -- milterd, pure -----------------------------------------------------------------------------
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def runtime(**kw) -> RuntimeFacts:
    return RuntimeFacts(now=NOW, milter=Probe(True, "milter protocol 6"), **kw)


def test_certificate_expiry_thresholds():
    config = parse_config('[tls]\ncertificates = ["/a.pem"]\n')
    def status(days):
        return check_certificates(config, runtime(
            certificates=(("/a.pem", NOW + dt.timedelta(days=days), ""),))).status
    assert (status(90), status(29), status(-1)) == ("ok", "warn", "fail")
    c = check_certificates(config, runtime(certificates=(("/a.pem", None, "cannot read: x"),)))
    assert c.status == "fail"


def test_runtime_probes_judged():
    assert check_milter(CONFIG, RuntimeFacts(NOW, Probe(False, "refused"))).status == "fail"
    assert check_policy(CONFIG, runtime(policy=Probe(True, "action=DUNNO"))).status == "ok"
    assert check_policy(CONFIG, runtime(policy=Probe(False, "x"))).status == "fail"
    assert judge_socketmap_answer("OK secure match=a.test").ok
    assert not judge_socketmap_answer("NOTFOUND ").ok
    assert not judge_socketmap_answer("OK may").ok
    assert check_socketmap(CONFIG, runtime(socketmap=(
        ("northwind.test", Probe(False, "answered 'NOTFOUND '")),))).status == "fail"
    metrics_cfg = parse_config('[metrics]\nlisten = "127.0.0.1:9487"\n')
    assert check_metrics(metrics_cfg, runtime(metrics=Probe(False, "refused"))).status == "fail"


def test_exit_codes_and_renderings():
    checks = [Check("a", "ok", "fine"), Check("b", "warn", "hm", "do x")]
    assert exit_code(checks) == 1
    assert exit_code(checks + [Check("c", "fail", "bad", "do y")]) == 2
    assert exit_code(checks[:1]) == 0
    text = render_text(checks)
    assert "warn  b  hm\n         fix: do x\n" in text and text.endswith(
        "2 checks: 1 ok, 1 warnings, 0 failures\n")
    data = json.loads(render_json(checks))
    assert data["checks"][1] == {"id": "b", "status": "warn", "message": "hm", "fix": "do x"}
    assert data["summary"] == {"ok": 1, "warn": 1, "fail": 0, "exit": 1}
    with pytest.raises(ValueError):
        Check("x", "bad", "")


# -- the command against real MTAs -------------------------------------------------------------
def doctor(*args: str) -> tuple[int, dict, str]:
    """``milterd doctor --json …`` as a process; also the text rendering (a second run)."""
    cmd = [sys.executable, "-m", "milterd.doctor.cli", *args]
    r = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.stdout, r.stderr
    data = json.loads(r.stdout)
    assert r.returncode == data["summary"]["exit"], r.stderr
    return r.returncode, data, r.stderr


def by_status(data: dict, status: str) -> dict[str, dict]:
    return {c["id"]: c for c in data["checks"] if c["status"] == status}


def age(conf: Path) -> None:
    """Date main.cf/master.cf 10 s back: Postfix's table loader waits (300 ms steps) while a
    file is younger than a second, which every postconf would otherwise pay after an edit."""
    for name in ("main.cf", "master.cf"):
        t = (conf / name).stat().st_mtime - 10
        os.utime(conf / name, (t, t))


class PostfixDoctorLab:
    def __init__(self, lab: PostfixLab, toml: Path, work: Path):
        self.lab, self.toml, self.work = lab, toml, work
        self.n = 0

    @property
    def service(self) -> str:
        return f"{self.lab.listen_spec}/inet"

    def broken(self, *postconf_args: str) -> Path:
        """A copy of the running instance's config dir, changed by one ``postconf`` call."""
        self.n += 1
        conf = self.work / f"conf{self.n}"
        shutil.copytree(self.lab.conf, conf)
        if postconf_args:
            subprocess.run(["postconf", "-c", str(conf), *postconf_args], check=True,
                           capture_output=True, text=True, timeout=30)
        age(conf)
        return conf

    def toml_with(self, old: str, new: str) -> Path:
        self.n += 1
        text = self.toml.read_text()
        assert old in text
        p = self.work / f"milterd{self.n}.toml"
        p.write_text(text.replace(old, new))
        return p

    def run(self, conf: Path | None = None, toml: Path | None = None):
        return doctor("-c", str(toml or self.toml), "--postfix-config", str(conf or self.lab.conf))


@pytest.fixture(scope="module")
def pflab(partners) -> Iterator[PostfixDoctorLab]:
    pki = partners.pki
    with contextlib.ExitStack() as stack:
        factory = MilterdFactory(make_lab_dir("milterd-doctor-"))
        stack.callback(factory.close)
        d = factory.root / "doctor"
        work = make_lab_dir("milterd-doctor-work-")
        stack.callback(shutil.rmtree, work, True)
        socketmap_port, metrics_port = free_port(), free_port()
        lab = PostfixLab(
            milter_socket=f"unix:{d}/milter.sock", policy_service=f"unix:{d}/policy.sock",
            tls=PostfixTLS(partners.server.cert_path, partners.server.key_path, pki.ca_path),
            extra={"smtp_tls_policy_maps":
                   f"socketmap:inet:127.0.0.1:{socketmap_port}:tlspolicy"})
        stack.callback(lab.cleanup)
        pin = partners.pinned.cert.fingerprint(hashes.SHA256()).hex(":").upper()
        m = factory(f"""
[policy]
listen = "unix:{d}/policy.sock"
[socketmap]
listen = "127.0.0.1:{socketmap_port}"
[metrics]
listen = "127.0.0.1:{metrics_port}"
[tls]
certificates = ["{partners.server.cert_path}"]
[outbound]
maillog = "{lab.maillog}"
state_dir = "{d}/state"
dns_servers = ["127.0.0.1:{free_port()}"]
[partners."woodgrovebank.test"]
receive = true
pins = ["cert-sha256:{pin}"]
[partners."fabrikam.test"]
receive = true
trusted_issuers = ["milterd Test CA"]
[partners."northwind.test"]
send = true
""", name="doctor")
        lab.start_verified()
        yield PostfixDoctorLab(lab, m.config_path, work)


@pytest.mark.postfix
def test_postfix_correct_instance_all_ok(pflab):
    rc, data, _ = pflab.run()
    assert rc == 0, [c for c in data["checks"] if c["status"] != "ok"]
    ids = [c["id"] for c in data["checks"]]
    assert ids == ["milterd.config", "postfix.config", "postfix.smtpd_milters",
                   "postfix.milter_socket_access", "postfix.milter_default_action",
                   "postfix.smtpd_tls_security_level", "postfix.smtpd_tls_ask_ccert",
                   "postfix.smtpd_tls_CAfile", "postfix.milter_mail_macros",
                   "postfix.check_policy_service", "postfix.smtpd_tls_fingerprint_digest",
                   "postfix.smtp_tls_policy_maps", "postfix.maillog_file", "postfix.tlsrpt",
                   "milterd.certificates", "milterd.milter", "milterd.policy",
                   "milterd.socketmap", "milterd.metrics"]
    assert data["summary"] == {"ok": len(ids), "warn": 0, "fail": 0, "exit": 0}
    msg = {c["id"]: c["message"] for c in data["checks"]}
    # what "ok" rests on, measured: Postfix's own milter_mail_macros lacks the TLS macros, the
    # list milterd asked for in a real negotiation carries them; the socketmap answered.
    assert "milterd requests the TLS macros at MAIL FROM itself" in msg["postfix.milter_mail_macros"]
    assert "northwind.test -> secure match=northwind.test" in msg["milterd.socketmap"]
    assert "holds milterd Test CA" in msg["postfix.smtpd_tls_CAfile"]
    assert msg["milterd.policy"].endswith("(action=DUNNO)")
    # the text rendering of the same run
    r = subprocess.run([sys.executable, "-m", "milterd.doctor.cli", "-c", str(pflab.toml),
                        "--postfix-config", str(pflab.lab.conf)], capture_output=True,
                       text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and r.stdout.endswith(f"{len(ids)} checks: {len(ids)} ok, "
                                                   "0 warnings, 0 failures\n"), r.stdout


def _postfix_case(pflab: PostfixDoctorLab, case: str):
    lab = pflab.lab
    svc = pflab.service
    d = pflab.toml.parent
    conf = lambda *a: pflab.broken(*a)  # noqa: E731
    cases = {
        "no_milter": (conf("smtpd_milters ="), None, "postfix.smtpd_milters",
                      f"-e 'smtpd_milters = unix:{d}/milter.sock'"),
        "service_override": (conf("-P", f"{svc}/smtpd_milters=inet:127.0.0.1:9"), None,
                             "postfix.smtpd_milters",
                             f"-P '{svc}/smtpd_milters=unix:{d}/milter.sock,inet:127.0.0.1:9'"),
        "chroot": (conf("-F", f"{svc}/chroot = y"), None, "postfix.milter_socket_access",
                   f'[milter] listen = "unix:{lab.queue}/milterd/milter.sock"'),
        "default_action": (conf("milter_default_action = accept"), None,
                           "postfix.milter_default_action",
                           "-e 'milter_default_action = tempfail'"),
        "shutdown": (conf("milter_default_action = shutdown"), None,
                     "postfix.milter_default_action", "-e 'milter_default_action = tempfail'"),
        "ask_ccert": (conf("smtpd_tls_ask_ccert = no"), None, "postfix.smtpd_tls_ask_ccert",
                      "-e 'smtpd_tls_ask_ccert = yes'"),
        "no_tls": (conf("smtpd_tls_security_level = none"), None,
                   "postfix.smtpd_tls_security_level", "-e 'smtpd_tls_security_level = may'"),
        "no_ca": (conf("smtpd_tls_CAfile ="), None, "postfix.smtpd_tls_CAfile",
                  "-e 'smtpd_tls_CAfile = /etc/ssl/certs/ca-certificates.crt'"),
        "policy_after_permit": (
            conf(f"smtpd_recipient_restrictions = permit_mynetworks, check_policy_service "
                 f"unix:{d}/policy.sock, reject_unauth_destination"), None,
            "postfix.check_policy_service",
            f"-e 'smtpd_recipient_restrictions = check_policy_service unix:{d}/policy.sock, "
            "permit_mynetworks, reject_unauth_destination'"),
        "digest": (conf("smtpd_tls_fingerprint_digest = md5"), None,
                   "postfix.smtpd_tls_fingerprint_digest",
                   "-e 'smtpd_tls_fingerprint_digest = sha256'"),
        "policy_maps": (conf("smtp_tls_policy_maps ="), None, "postfix.smtp_tls_policy_maps",
                        "-e 'smtp_tls_policy_maps = socketmap:inet:127.0.0.1:"),
        "maillog": (conf(f"maillog_file = {pflab.work}/other.log"), None, "postfix.maillog_file",
                    f"-e 'maillog_file = {lab.maillog}'"),
        "tlsrpt": (conf(), pflab.toml_with("[socketmap]\n", "[socketmap]\ntlsrpt = true\n"),
                   "postfix.tlsrpt", "[socketmap] tlsrpt = false"),
    }
    return cases[case]


POSTFIX_CASES = ["no_milter", "service_override", "chroot", "default_action", "shutdown",
                 "ask_ccert", "no_tls", "no_ca", "policy_after_permit", "digest", "policy_maps",
                 "maillog", "tlsrpt"]


@pytest.mark.postfix
@pytest.mark.parametrize("case", POSTFIX_CASES)
def test_postfix_broken_one_way_reports_exactly_that(pflab, case):
    conf, toml, cid, fix = _postfix_case(pflab, case)
    rc, data, _ = pflab.run(conf, toml)
    failed = by_status(data, "fail")
    assert (rc, set(failed), set(by_status(data, "warn"))) == (2, {cid}, set()), failed
    assert fix in failed[cid]["fix"], failed[cid]
    if failed[cid]["fix"].startswith("postconf"):
        assert failed[cid]["fix"].startswith(f"postconf -c {conf} ")


@pytest.mark.postfix
def test_postfix_fix_lines_repair_the_config(pflab):
    """Running the printed postconf fix on the broken copy makes doctor pass again."""
    for case in ("no_milter", "service_override", "default_action", "ask_ccert",
                 "policy_after_permit", "digest", "policy_maps", "maillog"):
        conf, _toml, cid, _ = _postfix_case(pflab, case)
        _, data, _ = pflab.run(conf)
        fix = by_status(data, "fail")[cid]["fix"]
        subprocess.run(fix, shell=True, check=True, timeout=30)
        age(conf)
        rc, data, _ = pflab.run(conf)
        assert rc == 0, (case, fix, by_status(data, "fail"))


@pytest.mark.postfix
def test_postfix_socket_mode_smtpd_cannot_use(pflab):
    sock = pflab.toml.parent / "milter.sock"
    mode = sock.stat().st_mode & 0o7777
    os.chmod(sock, 0o600)
    try:
        rc, data, _ = pflab.run()
    finally:
        os.chmod(sock, mode)
    failed = by_status(data, "fail")
    assert (rc, set(failed)) == (2, {"postfix.milter_socket_access"})
    assert "mode 0600" in failed["postfix.milter_socket_access"]["message"]
    assert failed["postfix.milter_socket_access"]["fix"].startswith('[milter] group = "postfix"')


@pytest.mark.postfix
def test_postfix_ca_without_the_partners_issuer(pflab):
    other = TestPKI(pflab.work / "other-pki", ca_name="Other Test CA")
    os.chmod(pflab.work / "other-pki", 0o755)
    conf = pflab.broken(f"smtpd_tls_CAfile = {other.ca_path}")
    rc, data, _ = pflab.run(conf)
    failed = by_status(data, "fail")
    assert (rc, set(failed)) == (2, {"postfix.smtpd_tls_CAfile"})
    assert "'milterd Test CA' (fabrikam.test)" in failed["postfix.smtpd_tls_CAfile"]["message"]


@pytest.mark.postfix
def test_postfix_mail_macros_in_main_cf_are_not_needed_when_milterd_asks(pflab):
    """Postfix's default milter_mail_macros lacks the TLS macros; the list milterd sends in
    negotiation replaces it (milter8.c) — measured: with the main.cf list set without them
    explicitly, still ok."""
    conf = pflab.broken("milter_mail_macros = i")
    rc, data, _ = pflab.run(conf)
    assert rc == 0, by_status(data, "fail")


@pytest.mark.postfix
def test_milterd_certificates_expiring_and_expired(pflab, partners):
    soon = partners.pki.issue("doctor-soon", "mx.contoso.test", days=10)
    gone = partners.pki.issue("doctor-gone", "mx.contoso.test",
                              not_after=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2))
    old = f'certificates = ["{partners.server.cert_path}"]'
    rc, data, _ = pflab.run(toml=pflab.toml_with(old, f'certificates = ["{soon.cert_path}"]'))
    assert (rc, set(by_status(data, "warn")), set(by_status(data, "fail"))) == (
        1, {"milterd.certificates"}, set())
    rc, data, _ = pflab.run(toml=pflab.toml_with(old, f'certificates = ["{gone.cert_path}"]'))
    assert (rc, set(by_status(data, "fail"))) == (2, {"milterd.certificates"})


@pytest.mark.postfix
def test_milterd_metrics_not_answering(pflab):
    text = pflab.toml.read_text()
    port = text.split("[metrics]\nlisten = \"127.0.0.1:")[1].split('"')[0]
    toml = pflab.toml_with(f'127.0.0.1:{port}"', f'127.0.0.1:{free_port()}"')
    rc, data, _ = pflab.run(toml=toml)
    assert (rc, set(by_status(data, "fail"))) == (2, {"milterd.metrics"})


# -- Sendmail ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smlab(partners):
    from sendmail_lab import SendmailLab, ensure_provisioned

    ensure_provisioned()
    with contextlib.ExitStack() as stack:
        factory = MilterdFactory(make_lab_dir("milterd-doctor-sm-"))
        stack.callback(factory.close)
        pin = partners.pinned.cert.fingerprint(hashes.SHA256()).hex(":").upper()
        m = factory(f'[partners."woodgrovebank.test"]\nreceive = true\n'
                    f'pins = ["cert-sha256:{pin}"]\n', name="sm")
        base = make_lab_dir("milterd-doctor-sendmail-")
        stack.callback(shutil.rmtree, base, True)

        def make(name: str, mc_edit=None) -> "SendmailLab":
            class Lab(SendmailLab):
                def _mc_text(self) -> str:
                    text = super()._mc_text()
                    if mc_edit is None:
                        return text
                    mc = base / f"{name}-milterd.mc"
                    mc.write_text(mc_edit((REPO / "contrib/sendmail/milterd.mc").read_text()))
                    return text.replace(str(REPO / "contrib/sendmail/milterd.mc"), str(mc))

            return Lab(base / name, milter_socket=m.socket_spec, ca_cert=partners.pki.ca_path,
                       server_cert=partners.server.cert_path,
                       server_key=partners.server.key_path, local_domains=["contoso.test"])

        yield m, make, stack


@pytest.mark.sendmail
def test_sendmail_cf_with_f_t_all_ok(smlab):
    m, make, stack = smlab
    lab = make("good")
    lab.start()            # the .cf of a Sendmail that runs
    stack.callback(lab.stop)
    assert "F=T" in lab.cf_path.read_text()
    rc, data, _ = doctor("-c", str(m.config_path), "--sendmail-cf", str(lab.cf_path))
    assert [c["id"] for c in data["checks"]] == [
        "milterd.config", "sendmail.config", "sendmail.milter", "sendmail.milter_flags",
        "sendmail.milter_macros", "sendmail.cert_fingerprint_algorithm",
        "sendmail.tls_client_certs", "milterd.certificates", "milterd.milter", "milterd.policy",
        "milterd.socketmap", "milterd.metrics"]
    assert rc == 0, [c for c in data["checks"] if c["status"] != "ok"]


@pytest.mark.sendmail
@pytest.mark.parametrize("name, edit, cid, fix", [
    ("no_ft", lambda t: t.replace("F=T, ", ""), "sendmail.milter_flags",
     "INPUT_MAIL_FILTER(`milterd', `S=unix:"),
    ("no_sha256", lambda t: t.replace("define(`confCERT_FINGERPRINT_ALGORITHM', `sha256')dnl",
                                      ""),
     "sendmail.cert_fingerprint_algorithm",
     "define(`confCERT_FINGERPRINT_ALGORITHM', `sha256')dnl"),
])
def test_sendmail_cf_broken_one_way(smlab, name, edit, cid, fix):
    m, make, _ = smlab
    lab = make(name, edit)
    lab._prepare()        # the real m4 + Sendmail's cf macros build the .cf
    rc, data, _ = doctor("-c", str(m.config_path), "--sendmail-cf", str(lab.cf_path))
    failed = by_status(data, "fail")
    assert (rc, set(failed), set(by_status(data, "warn"))) == (2, {cid}, set()), failed
    assert failed[cid]["fix"].startswith(fix)
    if name == "no_ft":
        assert "F=T" in failed[cid]["fix"]
