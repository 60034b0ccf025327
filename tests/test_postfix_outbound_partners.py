"""Per-partner outbound terms (#15) end to end: ``[partners."…"] server_names`` decide what a
real Postfix accepts as the partner's MX certificate.

One loopback MX, ``mx.hoster.test``, hosts two send partners (both domain names point at it in
the sending Postfix's private /etc/hosts) and presents one lab-CA certificate naming only
``mx.hoster.test``, the way a hosting provider's MX does.  milterd serves the TLS policy through
its socketmap and counts outcomes from the sending Postfix's maillog:

* ``woodgrovebank.test`` has ``server_names = ["mx.hoster.test"]`` (and ``min_version =
  "TLSv1.3"``): answered ``secure match=mx.hoster.test protocols=>=TLSv1.3``, delivered over a
  verified session, counted as sent;
* ``fabrikam.test`` is a send partner without ``server_names``: answered with the default
  ``secure match=fabrikam.test:.fabrikam.test``; the same server and certificate fail Postfix's
  name check, the message stays in the queue (never sent in clear) and the failure is counted as
  ``name_mismatch``.  Once a reload gives it ``server_names = [".hoster.test"]`` (hosts under that
  domain) a queue flush delivers that very message.

A plain ``send_domains`` entry keeps the old answer.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
from dataclasses import dataclass
from typing import Iterator

import pytest

from milterd.lab.metrics import sample_key, scrape
from milterd.lab.net import free_port
from milterd.lab.postfix import PostfixLab, PostfixTLS
from milterd.lab.proc import MilterdProcess
from milterd.lab.smtp import make_message, send
from milterd.lab.wait import wait_until

from support import MilterdFactory, make_lab_dir

pytestmark = pytest.mark.postfix

MX_ADDR = "127.0.72.1"           # the hoster's MX (test_postfix_outbound uses 127.0.71.x)
WOODGROVE, FABRIKAM, NORTHWIND = "woodgrovebank.test", "fabrikam.test", "northwind.test"

SENT = "milterd_domain_secured_messages_sent_total"
FAILED = "milterd_domain_secured_outbound_session_failures_total"

PARTNER_TABLES = f"""
[partners."{WOODGROVE}"]
send = true
server_names = ["mx.hoster.test"]
min_version = "TLSv1.3"

[partners."{FABRIKAM}"]
send = true
"""
# After the reload: fabrikam's MX may be any host under hoster.test.
PARTNER_TABLES_FABRIKAM_HOSTED = PARTNER_TABLES + 'server_names = [".hoster.test"]\n'


@dataclass
class Lab:
    mx: PostfixLab
    sender: PostfixLab
    milterd: MilterdProcess
    head: str                  # the milterd config before the [partners] tables
    socketmap_port: int
    metrics_port: int


def _address_free(addr: str, port: int = 25) -> bool:
    with socket.socket() as s:
        try:
            s.bind((addr, port))
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def lab(partners) -> Iterator[Lab]:
    pki = partners.pki
    assert _address_free(MX_ADDR), f"{MX_ADDR}:25 is busy"
    with contextlib.ExitStack() as stack:
        hoster = pki.issue("mx-hoster", "mx.hoster.test")
        mx = PostfixLab(milter_socket=None,
                        tls=PostfixTLS(hoster.cert_path, hoster.key_path, pki.ca_path),
                        local_domains=(WOODGROVE, FABRIKAM), hostname="mx.hoster.test",
                        listen_address=MX_ADDR, port=25)
        stack.callback(mx.cleanup)
        mx.start()
        socketmap_port, metrics_port = free_port(), free_port()
        sender = PostfixLab(
            milter_socket=None, hostname="mx.contoso.test",
            hosts={WOODGROVE: MX_ADDR, FABRIKAM: MX_ADDR},
            tls=PostfixTLS(partners.server.cert_path, partners.server.key_path, pki.ca_path),
            extra={
                "smtp_tls_security_level": "may",
                "smtp_tls_CAfile": str(pki.ca_path),
                "smtp_tls_loglevel": "1",
                "smtp_tls_policy_maps": f"socketmap:inet:127.0.0.1:{socketmap_port}:tlspolicy",
                "smtp_connect_timeout": "5s",
            })
        stack.callback(sender.cleanup)
        sender.start()
        factory = MilterdFactory(make_lab_dir("milterd-out-partners-"))
        stack.callback(factory.close)   # also fails on an unexpected traceback in milterd's log
        head = f"""
[socketmap]
listen = "127.0.0.1:{socketmap_port}"
[metrics]
listen = "127.0.0.1:{metrics_port}"
[domain_security]
send_domains = ["{NORTHWIND}"]
[outbound]
maillog = "{sender.maillog}"
state_dir = "{factory.root}/state"
dns_servers = ["127.0.0.1:{free_port()}"]
"""
        m = factory(head + PARTNER_TABLES)
        yield Lab(mx, sender, m, m.config_path.read_text().removesuffix(PARTNER_TABLES),
                  socketmap_port, metrics_port)


# -- what Postfix asks and sees ----------------------------------------------------------------
def socketmap_lookup(port: int, key: str, name: str = "tlspolicy") -> str:
    """One lookup as Postfix's dict_socketmap makes it: the netstring ``<name> <key>`` over TCP,
    the reply read as a complete netstring."""
    request = f"{name} {key}".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"%d:%s," % (len(request), request))
        buf = b""
        while True:
            head, colon, rest = buf.partition(b":")
            if colon and len(rest) > int(head):
                assert rest[int(head):] == b",", f"bad netstring {buf!r}"
                return rest[:int(head)].decode()
            chunk = s.recv(4096)
            assert chunk, f"socketmap closed the connection after {buf!r}"
            buf += chunk


def queued(sender: PostfixLab) -> dict[str, dict]:
    """Postfix's queue (``postqueue -j``): recipient address -> that recipient's entry plus
    ``queue_name``."""
    r = subprocess.run(["postqueue", "-c", str(sender.conf), "-j"], capture_output=True,
                       text=True, timeout=30, check=True)
    out = {}
    for line in r.stdout.splitlines():
        if line.strip():
            msg = json.loads(line)
            for rcpt in msg["recipients"]:
                out[rcpt["address"]] = {**rcpt, "queue_name": msg["queue_name"]}
    return out


def metric(lab: Lab, name: str, **labels: str) -> float:
    return scrape(lab.metrics_port).get(sample_key(name, labels), 0.0)


def wait_metric(lab: Lab, value: float, name: str, **labels: str) -> None:
    wait_until(lambda: metric(lab, name, **labels) == value, 30,
               lambda: f"{name}{labels} == {value} (now {metric(lab, name, **labels)})"
               + lab.sender.log_tail(15))


def send_to(lab: Lab, rcpt: str) -> None:
    result = send(lab.sender.port, "alice@contoso.test", [rcpt],
                  make_message("alice@contoso.test", rcpt, f"to {rcpt}"))
    assert result.accepted, result


def subjects(mx: PostfixLab) -> list[str]:
    return sorted(str(m["Subject"]) for m in mx.delivered())


def reload_milterd(lab: Lab, tables: str) -> None:
    """Write the new config, SIGHUP, and wait until milterd says it reloaded."""
    done = lab.milterd.log_text().count("configuration reloaded")
    lab.milterd.config_path.write_text(lab.head + tables)
    lab.milterd.signal(signal.SIGHUP)

    def reloaded() -> bool:
        text = lab.milterd.log_text()
        assert "reload refused" not in text, lab.milterd.log_tail()
        return text.count("configuration reloaded") > done

    wait_until(reloaded, 20, lab.milterd.log_tail)


# -- tests -------------------------------------------------------------------------------------
def test_socketmap_serves_each_partners_terms(lab):
    answers = {d: socketmap_lookup(lab.socketmap_port, d) for d in (WOODGROVE, FABRIKAM, NORTHWIND)}
    assert answers == {
        # the table's server_names and min_version replace the defaults
        WOODGROVE: "OK secure match=mx.hoster.test protocols=>=TLSv1.3",
        # a send partner without server_names: its own names, the global minimum
        FABRIKAM: "OK secure match=fabrikam.test:.fabrikam.test protocols=>=TLSv1.2",
        # a send_domains entry keeps the answer it had before partner tables
        NORTHWIND: "OK secure match=northwind.test:.northwind.test protocols=>=TLSv1.2",
    }


def test_server_names_decide_delivery_to_a_hosted_mx(lab):
    mx, sender = lab.mx, lab.sender
    assert subjects(mx) == [] and queued(sender) == {}
    try:
        send_to(lab, f"bob@{WOODGROVE}")
        send_to(lab, f"carol@{FABRIKAM}")

        # woodgrovebank.test: mx.hoster.test's certificate matches its server_names.
        wait_until(lambda: subjects(mx) == [f"to bob@{WOODGROVE}"], 30,
                   lambda: f"delivery to {WOODGROVE}{sender.log_tail(15)}")
        wait_metric(lab, 1.0, SENT, domain=WOODGROVE)
        log = sender.log_text()
        assert (f"Verified TLS connection established to {WOODGROVE}[{MX_ADDR}]:25: TLSv1.3"
                in log), sender.log_tail(15)

        # fabrikam.test: the same server and certificate, but nothing names it: deferred.
        wait_metric(lab, 1.0, FAILED, domain=FABRIKAM, reason="name_mismatch")
        wait_until(lambda: f"to=<carol@{FABRIKAM}>" in sender.log_text(), 10, sender.log_tail)
        log = sender.log_text()
        line = next(ln for ln in log.splitlines() if f"to=<carol@{FABRIKAM}>" in ln)
        assert "status=deferred" in line and "dsn=4.7.5" in line, line
        assert "hostname mismatch" in log, sender.log_tail(15)
        q = queued(sender)
        assert list(q) == [f"carol@{FABRIKAM}"], q     # held by Postfix, woodgrove's is gone
        assert q[f"carol@{FABRIKAM}"]["queue_name"] == "deferred"
        assert "Server certificate not verified" in q[f"carol@{FABRIKAM}"]["delay_reason"]
        assert subjects(mx) == [f"to bob@{WOODGROVE}"]  # never delivered, not even in clear
        assert metric(lab, SENT, domain=FABRIKAM) == 0.0
        assert metric(lab, FAILED, domain=WOODGROVE, reason="name_mismatch") == 0.0

        # Give fabrikam.test the hoster's names: the held message goes out on the next run.
        reload_milterd(lab, PARTNER_TABLES_FABRIKAM_HOSTED)
        assert socketmap_lookup(lab.socketmap_port, FABRIKAM) == (
            "OK secure match=.hoster.test protocols=>=TLSv1.2")
        subprocess.run(["postqueue", "-c", str(sender.conf), "-f"], capture_output=True,
                       text=True, timeout=30, check=True)
        wait_until(lambda: subjects(mx) == sorted([f"to bob@{WOODGROVE}", f"to carol@{FABRIKAM}"]),
                   30, lambda: f"delivery to {FABRIKAM} after the reload{sender.log_tail(15)}")
        wait_metric(lab, 1.0, SENT, domain=FABRIKAM)
        assert (f"Verified TLS connection established to {FABRIKAM}[{MX_ADDR}]:25"
                in sender.log_text()), sender.log_tail(15)
        wait_until(lambda: queued(sender) == {}, 10, lambda: str(queued(sender)))
        assert metric(lab, FAILED, domain=FABRIKAM, reason="name_mismatch") == 1.0
        assert metric(lab, SENT, domain=WOODGROVE) == 1.0
    finally:
        reload_milterd(lab, PARTNER_TABLES)   # other tests in this module see the first terms
