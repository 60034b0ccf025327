"""TLS-RPT policies through the running daemon (#16 items 1 and 3).

``milterd run`` configured as the README says ([socketmap], [outbound] maillog/state_dir/
dns_servers/mtasts_ca_file), a loopback DNS server (MX, ``_mta-sts`` TXT, signed MX/TLSA for a
DANE domain), an MTA-STS policy host on 127.0.74.10:443 (milterd sees ``mta-sts.*`` there through a
private /etc/hosts in its own mount namespace), real Postfix receivers on 127.0.74.x:25 and:

* a real Postfix 3.7 (Debian's) sender asking the socketmap: the follower's TLS-RPT session records
  say ``sts`` with the policy string for the MTA-STS domain and ``no-policy-found`` for the
  send-list domain (a local policy, not one the domain published) and for a domain without policy;
* ``[socketmap] tlsrpt = true`` by a reload: the answers carry the TLSRPT attributes for the STS
  domain only; a real Postfix 3.10 (built from the upstream tag by scripts/setup-postfix310.sh)
  takes them — it delivers over a verified session where the MX name matches the policy's
  ``mx_host_pattern`` and refuses the host that does not (``smtp_tls_enforce_sts_mx_patterns``,
  which it can only do if it parsed ``policy_type``/``policy_domain``/``mx_host_pattern``), while
  Postfix 3.7 refuses the same answer ("invalid attribute name") — why the switch exists.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

import mtasts_server
from dns_server import DnsServer
from milterd.lab.net import free_port, wait_for_port
from milterd.lab.postfix import PostfixLab, PostfixTLS
from milterd.lab.proc import MilterdProcess
from milterd.lab.smtp import make_message, send
from milterd.lab.wait import wait_until

from support import assert_no_tracebacks, make_lab_dir

pytestmark = pytest.mark.postfix

REPO = Path(__file__).resolve().parents[1]
TLSA = "3 1 1 " + "ab" * 32
STS_HOST = "127.0.74.10"          # mta-sts.<domain>:443 for milterd
# domain -> (receiver address, certificate name, MTA-STS policy mx patterns or None)
RECEIVERS = {
    "sts.test": ("127.0.74.1", "sts.test", ("sts.test", "*.sts.test")),
    "mismatch.test": ("127.0.74.4", "mx.mismatch.test", ("mx.mismatch.test",)),
    "sendlist.test": ("127.0.74.2", "mx.sendlist.test", None),
    "plain.test": ("127.0.74.3", "mx.plain.test", None),
}
SEND_LIST = ["sendlist.test"]


def _policy(mx: tuple[str, ...]) -> bytes:
    return ("version: STSv1\nmode: enforce\n" + "".join(f"mx: {m}\n" for m in mx)
            + "max_age: 86400\n").encode()


def _policy_strings(mx: tuple[str, ...]) -> list[str]:
    return ["version: STSv1", "mode: enforce", *[f"mx: {m}" for m in mx], "max_age: 86400"]


class Postfix310Lab(PostfixLab):
    """The lab instance run by the private Postfix 3.10 build (its daemons, its commands)."""

    root: Path = Path()

    def main_cf(self) -> str:
        r = self.root
        return super().main_cf() + "".join(f"{k} = {v}\n" for k, v in {
            "daemon_directory": r / "usr/libexec/postfix", "command_directory": r / "usr/sbin",
            "meta_directory": r / "etc/postfix", "shlib_directory": "no",
            "sendmail_path": r / "usr/sbin/sendmail", "mailq_path": r / "usr/bin/mailq",
            "newaliases_path": r / "usr/bin/newaliases",
            "manpage_directory": r / "usr/share/man",
            "html_directory": "no", "readme_directory": "no"}.items())

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.root / "usr/sbin/postfix"), "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=60, check=check)

    def start(self) -> "Postfix310Lab":
        # PostfixLab.start execs "postfix" from PATH inside its mount namespace.
        with mock.patch.dict(os.environ, {"PATH": f"{self.root}/usr/sbin:{os.environ['PATH']}"}):
            super().start()
        return self


def _socketmap_query(port: int, key: str) -> str:
    payload = f"tlspolicy {key}".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(str(len(payload)).encode() + b":" + payload + b",")
        data = b""
        while not data.endswith(b","):
            chunk = s.recv(65536)
            assert chunk, "socketmap closed the connection"
            data += chunk
    return data.decode().split(":", 1)[1][:-1]


def _records(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def _send(port: int, rcpt: str, subject: str) -> None:
    r = send(port, "alice@contoso.test", [rcpt], make_message("alice@contoso.test", rcpt, subject))
    assert r.accepted, r


@pytest.fixture(scope="module")
def lab(partners):
    pki = partners.pki
    base = make_lab_dir("milterd-tlsrpt-policy-")
    started: list = []
    try:
        dns = DnsServer().start()
        started.append(dns)
        for domain, (_addr, _cn, mx) in RECEIVERS.items():
            dns.add(domain, "MX", [f"10 mx.{domain}."])          # unsigned: no DANE
            if mx:
                dns.add(f"_mta-sts.{domain}", "TXT", ['"v=STSv1; id=2025;"'])
        dns.add("dane.test", "MX", ["10 mx.dane.test."], ad=True)
        dns.add("_25._tcp.mx.dane.test", "TLSA", [TLSA], ad=True)
        # The MTA-STS policy host: the loopback HTTPS test server, bound to STS_HOST:443.
        web_cert = pki.issue("mta-sts-hosts", "mta-sts.sts.test",
                             sans=[f"mta-sts.{d}" for d, v in RECEIVERS.items() if v[2]])

        class On443(mtasts_server.ThreadingHTTPServer):
            def __init__(self, _addr, handler):
                super().__init__((STS_HOST, 443), handler)

        with mock.patch.object(mtasts_server, "ThreadingHTTPServer", On443):
            web = mtasts_server.PolicyServer(web_cert.cert_path, web_cert.key_path)
        web.start()
        started.append(web)
        for domain, (_addr, _cn, mx) in RECEIVERS.items():
            if mx:
                web.routes[f"mta-sts.{domain}"] = (200, {"Content-Type": "text/plain"},
                                                   _policy(mx))
        receivers = {}
        for domain, (addr, cn, _mx) in RECEIVERS.items():
            issued = pki.issue(f"rx-{domain}", cn)
            rx = PostfixLab(milter_socket=None, local_domains=(domain,), hostname=f"mx.{domain}",
                            tls=PostfixTLS(issued.cert_path, issued.key_path, pki.ca_path),
                            listen_address=addr, port=25, base=base / f"rx-{domain}")
            started.append(rx)
            receivers[domain] = rx.start()

        socketmap_port = free_port()
        hosts = {d: a for d, (a, _c, _m) in RECEIVERS.items()}

        def sender(cls=PostfixLab, name="sender", **kw):
            lab = cls(milter_socket=None, hostname="mx.contoso.test", hosts=hosts,
                      base=base / name,
                      tls=PostfixTLS(partners.server.cert_path, partners.server.key_path,
                                     pki.ca_path),
                      extra={"smtp_tls_security_level": "may",
                             "smtp_tls_CAfile": str(pki.ca_path),
                             "smtp_tls_loglevel": "1",
                             "smtp_tls_policy_maps":
                                 f"socketmap:inet:127.0.0.1:{socketmap_port}:tlspolicy",
                             "smtp_connect_timeout": "5s"}, **kw)
            started.append(lab)
            return lab.start()

        pf37 = sender()
        # milterd as the README configures it, in its own mount namespace whose /etc/hosts
        # names the MTA-STS policy hosts (Postfix has its own, per instance).
        mdir = base / "milterd"
        mdir.mkdir()
        state_dir = mdir / "state"
        def write_config(tlsrpt: str) -> None:
            (mdir / "milterd.toml").write_text(f"""
[log]
level = "debug"
[milter]
listen = "unix:{mdir}/milter.sock"
[plugins]
modules = []
[socketmap]
listen = "127.0.0.1:{socketmap_port}"
tlsrpt = {tlsrpt}
[domain_security]
send_domains = [{", ".join(f'"{d}"' for d in SEND_LIST)}]
[outbound]
maillog = "{pf37.maillog}"
state_dir = "{state_dir}"
dns_servers = ["127.0.0.1:{dns.port}"]
mtasts_ca_file = "{pki.ca_path}"
""")

        write_config("false")
        hosts_file = mdir / "hosts"
        hosts_file.write_text("127.0.0.1 localhost\n" + "".join(
            f"{STS_HOST} mta-sts.{d}\n" for d, v in RECEIVERS.items() if v[2]))
        wrapper = mdir / "python-in-namespace"
        wrapper.write_text('#!/bin/sh\nexec unshare -m sh -c \'mount --bind "$1" /etc/hosts '
                           '&& shift && exec "$@"\' ns "' + str(hosts_file) + '" "'
                           + sys.executable + '" "$@"\n')
        wrapper.chmod(0o755)
        m = MilterdProcess(mdir / "milterd.toml", f"unix:{mdir}/milter.sock",
                           log_path=mdir / "milterd.log", python=str(wrapper))
        started.append(m)
        m.start()
        assert wait_for_port("127.0.0.1", socketmap_port, timeout=10)
        yield {"receivers": receivers, "pf37": pf37, "milterd": m, "sender": sender,
               "sessions": state_dir / "tlsrpt-sessions.jsonl", "socketmap": socketmap_port,
               "write_config": write_config, "dns": dns, "web": web}
    finally:
        logs = []
        for thing in reversed(started):
            if isinstance(thing, MilterdProcess):
                thing.stop()
                logs.append(thing.log_text())
            elif isinstance(thing, PostfixLab):
                thing.cleanup()
            else:
                thing.stop()
        shutil.rmtree(base, ignore_errors=True)
        assert_no_tracebacks(logs)


def _record_for(lab, domain: str, timeout: float = 30) -> dict:
    def find():
        recs = [r for r in _records(lab["sessions"]) if r["policy_domain"] == domain]
        return recs[-1] if recs else None

    wait_until(lambda: find() is not None, timeout,
               f"a TLS-RPT session record for {domain}\n{lab['milterd'].log_tail()}"
               f"{lab['pf37'].log_tail()}")
    return find()


def test_session_records_carry_the_policy_served(lab):
    pf37, rx = lab["pf37"], lab["receivers"]
    for domain in ("sts.test", "sendlist.test", "plain.test"):
        _send(pf37.port, f"bob@{domain}", f"to {domain}")
    for domain in ("sts.test", "sendlist.test", "plain.test"):
        assert [m["Subject"] for m in rx[domain].wait_delivered(1, timeout=60)] == [
            f"to {domain}"], pf37.log_tail() + "\n--- milterd ---\n" + lab["milterd"].log_tail()
    sts = _record_for(lab, "sts.test")
    assert sts["policy_type"] == "sts", sts
    assert sts["policy_string"] == _policy_strings(RECEIVERS["sts.test"][2])
    assert sts["mx_host"] == list(RECEIVERS["sts.test"][2])
    assert (sts["result"], sts["tls_level"], sts["receiving_ip"]) == (
        "success", "verified", "127.0.74.1"), sts
    # A send-list domain gets a local policy, not one the domain published: RFC 8460 has no
    # type for that (sts | tlsa | no-policy-found), and Postfix 3.10 reports such a policy as
    # no-policy-found too.  The TLS session itself is reported (success, verified).
    sent = _record_for(lab, "sendlist.test")
    assert (sent["policy_type"], sent["policy_string"], sent["mx_host"]) == (
        "no-policy-found", [], [])
    assert (sent["result"], sent["tls_level"]) == ("success", "verified")
    plain = _record_for(lab, "plain.test")
    assert (plain["policy_type"], plain["policy_string"]) == ("no-policy-found", [])
    # Postfix's smtp delivered under exactly the policy recorded: match= from the STS policy
    assert "Verified TLS connection established to sts.test[127.0.74.1]:25" in pf37.log_text()


def _reload_with_tlsrpt(lab, value: str) -> None:
    lab["write_config"](value)
    lab["milterd"].signal(signal.SIGHUP)
    want = "policy_type=sts" if value == "true" else None

    def applied():
        reply = _socketmap_query(lab["socketmap"], "sts.test")
        return (want in reply) if want else ("policy_type" not in reply)

    wait_until(applied, 20, f"reload with tlsrpt={value}\n{lab['milterd'].log_tail()}")


def test_tlsrpt_switch_and_a_real_postfix_3_10(lab):
    q = lambda key: _socketmap_query(lab["socketmap"], key)  # noqa: E731
    assert "policy_type" not in q("sts.test")                # default: Postfix 3.7 form
    _reload_with_tlsrpt(lab, "true")
    assert q("sts.test") == (
        "OK secure match=sts.test:.sts.test servername=hostname policy_type=sts "
        "policy_domain=sts.test { policy_string = version: STSv1 } "
        "{ policy_string = mode: enforce } { policy_string = mx: sts.test } "
        "{ policy_string = mx: *.sts.test } { policy_string = max_age: 86400 } "
        "mx_host_pattern=sts.test mx_host_pattern=*.sts.test")
    assert q("sendlist.test") == (
        "OK secure match=sendlist.test:.sendlist.test protocols=>=TLSv1.2")
    assert q("dane.test") == "OK dane-only"                   # Postfix reports DANE itself
    assert q("plain.test") == "NOTFOUND "

    # Postfix 3.7 refuses the attributes: the switch must stay off for it.
    pf37 = lab["pf37"]
    _send(pf37.port, "carol@mismatch.test", "3.7 with tlsrpt attributes")
    wait_until(lambda: 'invalid attribute name: "policy_type"' in pf37.log_text(), 30,
               "Postfix 3.7 refusing policy_type" + pf37.log_tail())
    assert lab["receivers"]["mismatch.test"].delivered() == []

    # A real Postfix 3.10 takes them.
    setup = subprocess.run([str(REPO / "scripts/setup-postfix310.sh"), "--print-root"],
                           capture_output=True, text=True, timeout=1200)
    assert setup.returncode == 0, setup.stderr[-3000:]
    Postfix310Lab.root = Path(setup.stdout.strip().splitlines()[-1])
    pf310 = lab["sender"](Postfix310Lab, name="sender310")
    version = subprocess.run([str(Postfix310Lab.root / "usr/sbin/postconf"), "-c",
                              str(pf310.conf), "-h", "mail_version"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version.startswith("3.10."), version
    assert os.readlink(f"/proc/{pf310.master_pid()}/exe").startswith(str(Postfix310Lab.root))
    before = {d: len(r.delivered()) for d, r in lab["receivers"].items()}
    for domain in ("sts.test", "sendlist.test", "mismatch.test"):
        _send(pf310.port, f"dave@{domain}", f"3.10 to {domain}")
    for domain in ("sts.test", "sendlist.test"):
        msgs = lab["receivers"][domain].wait_delivered(before[domain] + 1)
        assert len(msgs) == before[domain] + 1, pf310.log_tail()
    log = pf310.log_text()
    assert "Verified TLS connection established to sts.test[127.0.74.1]:25" in log
    # Postfix 3.10 parsed policy_type, policy_domain and mx_host_pattern: it enforces the STS
    # MX patterns (smtp_tls_enforce_sts_mx_patterns = yes) on the host it would deliver to.
    wait_until(lambda: "MX name 'mismatch.test' does not match STS MX pattern for "
               "'mismatch.test'" in pf310.log_text(), 30, "3.10 STS MX check" + pf310.log_tail())
    assert lab["receivers"]["mismatch.test"].delivered() == []
    assert "invalid attribute" not in log and "policy table" not in log, pf310.log_tail()
    _reload_with_tlsrpt(lab, "false")
