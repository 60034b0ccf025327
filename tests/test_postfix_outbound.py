"""Outbound Domain Security end to end: a real Postfix asks milterd's socketmap for its TLS policy,
relays to receivers on loopback, and milterd counts the outcomes from Postfix's maillog_file."""

from __future__ import annotations

import contextlib
import socket

import pytest

from milterd.lab.net import free_port, port_free
from milterd.lab.metrics import scrape
from milterd.lab.postfix import PostfixLab, PostfixTLS
from milterd.lab.smtp import make_message, send
from milterd.lab.wait import wait_until

from support import MilterdFactory, make_lab_dir

pytestmark = pytest.mark.postfix

# send-list domain -> (receiver address, how its server certificate is made)
RECEIVERS = {
    "woodgrovebank.test": ("127.0.71.1", "good"),
    "wrongname.test": ("127.0.71.2", "wrong_name"),
    "untrusted.test": ("127.0.71.3", "self_signed"),
    "plaintext.test": ("127.0.71.4", "no_starttls"),
    "opportunistic.test": ("127.0.71.5", "self_signed"),   # not on the send list
}
SEND_LIST = [d for d in RECEIVERS if d != "opportunistic.test"]


@pytest.fixture(scope="module")
def outbound(partners):
    pki = partners.pki
    assert all(port_free(a, 25) for a, _ in RECEIVERS.values()), "receiver addresses busy"
    receivers = []
    for domain, (addr, kind) in RECEIVERS.items():
        tls = None
        if kind != "no_starttls":
            cn = f"mx.{domain}" if kind != "wrong_name" else "mx.fabrikam.test"
            issued = pki.issue(f"rx-{domain}", cn, self_signed=(kind == "self_signed"))
            tls = PostfixTLS(issued.cert_path, issued.key_path, pki.ca_path)
        receivers.append(PostfixLab(milter_socket=None, tls=tls, local_domains=(domain,),
                                    hostname=f"mx.{domain}", listen_address=addr,
                                    port=25).start())
    socketmap_port, metrics_port = free_port(), free_port()
    sender = PostfixLab(
        milter_socket=None, hostname="mx.contoso.test",
        hosts={d: a for d, (a, _) in RECEIVERS.items()},
        tls=PostfixTLS(partners.server.cert_path, partners.server.key_path, pki.ca_path),
        extra={
            "smtp_tls_security_level": "may",
            "smtp_tls_CAfile": str(pki.ca_path),
            "smtp_tls_loglevel": "1",
            "smtp_tls_policy_maps": f"socketmap:inet:127.0.0.1:{socketmap_port}:tlspolicy",
            "smtp_connect_timeout": "5s",
        })
    sender.start()
    factory = MilterdFactory(make_lab_dir("milterd-out-"))
    send_list = ", ".join(f'"{d}"' for d in SEND_LIST)
    m = factory(f"""
[socketmap]
listen = "127.0.0.1:{socketmap_port}"
[metrics]
listen = "127.0.0.1:{metrics_port}"
[domain_security]
send_domains = [{send_list}]
[outbound]
maillog = "{sender.maillog}"
state_dir = "{factory.root}/state"
dns_servers = ["127.0.0.1:{free_port()}"]
""")
    yield sender, receivers, m, metrics_port
    sender.cleanup()
    for r in receivers:
        r.cleanup()
    factory.stop_all()


def _metric(port: int, name: str) -> float:
    return scrape(port).get(name, 0.0)


def _wait_metric(port: int, name: str, value: float, timeout: float = 30) -> float:
    with contextlib.suppress(AssertionError):   # the caller asserts the value
        wait_until(lambda: _metric(port, name) == value, timeout, f"{name} == {value}")
    return _metric(port, name)


def _socketmap_query(port: int, key: str) -> str:
    payload = f"tlspolicy {key}".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(str(len(payload)).encode() + b":" + payload + b",")
        data = s.recv(4096).decode()
    return data.split(":", 1)[1][:-1]


def _send(sender, rcpt):
    return send(sender.port, "alice@contoso.test", [rcpt],
                make_message("alice@contoso.test", rcpt, f"to {rcpt}"))


def test_socketmap_answers_over_tcp(outbound):
    sender, receivers, m, metrics_port = outbound
    port = int(sender.main_cf().split("socketmap:inet:127.0.0.1:")[1].split(":")[0])
    assert _socketmap_query(port, "woodgrovebank.test") == (
        "OK secure match=woodgrovebank.test:.woodgrovebank.test protocols=>=TLSv1.2")
    # Not on the send list and DNS unreachable: defer (TEMP), never silently downgrade.
    assert _socketmap_query(port, "opportunistic.test").startswith(("TEMP", "NOTFOUND"))


def test_good_certificate_delivers_and_counts_sent(outbound):
    sender, receivers, m, metrics_port = outbound
    assert _send(sender, "bob@woodgrovebank.test").accepted
    rx = receivers[0]
    assert [d["Subject"] for d in rx.wait_delivered(1)] == ["to bob@woodgrovebank.test"]
    name = 'milterd_domain_secured_messages_sent_total{domain="woodgrovebank.test"}'
    assert _wait_metric(metrics_port, name, 1.0) == 1.0


@pytest.mark.parametrize("domain,reason", [
    ("wrongname.test", "name_mismatch"),
    ("untrusted.test", "untrusted_cert"),
    ("plaintext.test", "starttls_not_offered"),
])
def test_policy_failure_defers_and_counts(outbound, domain, reason):
    sender, receivers, m, metrics_port = outbound
    rx = receivers[list(RECEIVERS).index(domain)]
    assert _send(sender, f"bob@{domain}").accepted
    name = ('milterd_domain_secured_outbound_session_failures_total'
            f'{{domain="{domain}",reason="{reason}"}}')
    assert _wait_metric(metrics_port, name, 1.0) == 1.0, sender.log_tail(15)
    assert rx.delivered() == []                      # never sent in clear, never delivered
    log = sender.log_text()
    assert f"to=<bob@{domain}>" in log and "status=deferred" in log
    assert sender.queue_ids(), "the message must stay in Postfix's queue"
