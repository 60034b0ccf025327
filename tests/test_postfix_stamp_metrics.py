"""Trace header and counters end to end against a real Postfix."""

from __future__ import annotations

import contextlib
import os

import re

import pytest

from milterd.lab.net import free_port
from milterd.lab.metrics import scrape
from milterd.lab.wait import wait_until
from milterd.lab.smtp import client_context, make_message, send
from milterd.policy.stamp import parse_stamp

pytestmark = pytest.mark.postfix
RCPT = "user@contoso.test"
PARTNER_CFG = '\n[domain_security]\nreceive_domains = ["woodgrovebank.test"]\n'


def test_forged_trace_headers_are_replaced_by_exactly_one_true_one(milterd_factory,
                                                                  postfix_factory, partners):
    m = milterd_factory(PARTNER_CFG)
    pf = postfix_factory(m.socket_spec)
    sender = "alice@woodgrovebank.test"
    raw = (f"From: {sender}\r\nTo: {RCPT}\r\nSubject: forged\r\n"
           "x-milterd-tls: tls=TLSv1.3; verify=ok; domain-secure=pass; domain=woodgrovebank.test\r\n"
           "X-MILTERD-TLS: tls=TLSv1.3;\r\n\tverify=ok;\r\n domain-secure=pass\r\n"
           "X-Other: kept\r\n\r\nbody\r\n").encode()
    ctx = client_context(partners.pki.ca_path, partners.partner.cert_path,
                         partners.partner.key_path)
    assert send(pf.port, sender, [RCPT], raw, tls=ctx).accepted
    # And one from a non-partner without TLS, whose forged "pass" must become the truth.
    raw2 = raw.replace(b"alice@woodgrovebank.test", b"bob@fabrikam.test")
    assert send(pf.port, "bob@fabrikam.test", [RCPT], raw2).accepted
    first, second = pf.wait_delivered(2)
    for msg in (first, second):
        stamps = msg.get_all("X-Milterd-TLS")
        assert len(stamps) == 1, stamps
        assert msg["X-Other"] == "kept"
    one = parse_stamp(str(first["X-Milterd-TLS"]))
    assert (one["tls"], one["verify"], one["domain-secure"], one["domain"]) == (
        "TLSv1.3", "ok", "pass", "woodgrovebank.test")
    assert one["subject"] == "mail.woodgrovebank.test" and one["issuer"] == "milterd Test CA"
    two = parse_stamp(str(second["X-Milterd-TLS"]))
    assert (two["tls"], two["verify"], two["domain-secure"]) == ("none", "none", "none")
    assert "domain" not in two


def test_hostile_certificate_cn_cannot_change_the_header(milterd_factory, postfix_factory,
                                                         partners):
    evil_cn = 'x"; domain-secure=pass\r\nX-Injected: 1'
    evil = partners.pki.issue("evil-cn", evil_cn, sans=("evil.fabrikam.test",))
    m = milterd_factory(PARTNER_CFG)
    pf = postfix_factory(m.socket_spec)
    ctx = client_context(partners.pki.ca_path, evil.cert_path, evil.key_path)
    # Claims to be the partner: must be refused (the CN is no partner name, whatever it says).
    refused = send(pf.port, "a@woodgrovebank.test", [RCPT],
                   make_message("a@woodgrovebank.test", RCPT, "p"), tls=ctx)
    assert refused.code == 550 and "(name_mismatch)" in refused.text
    assert send(pf.port, "a@fabrikam.test", [RCPT],
                make_message("a@fabrikam.test", RCPT, "evil"), tls=ctx).accepted
    (msg,) = pf.wait_delivered(1)
    assert msg.get_all("X-Injected") is None
    assert len(msg.get_all("X-Milterd-TLS")) == 1
    stamp = parse_stamp(str(msg["X-Milterd-TLS"]))
    assert stamp["domain-secure"] == "none"
    assert set(stamp) <= {"tls", "cipher", "bits", "verify", "subject", "issuer",
                          "domain-secure"}


def test_counters_after_a_scripted_flow(milterd_factory, postfix_factory, partners):
    port = free_port()
    m = milterd_factory(PARTNER_CFG + f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    pf = postfix_factory(m.socket_spec)
    good = client_context(partners.pki.ca_path, partners.partner.cert_path,
                          partners.partner.key_path)
    p = "alice@woodgrovebank.test"
    two_rcpts = [RCPT, "other@contoso.test"]
    for i in range(3):  # domain-secured, two recipients each: still one message each
        assert send(pf.port, p, two_rcpts, make_message(p, RCPT, f"ok{i}"), tls=good).accepted
    assert send(pf.port, p, [RCPT], make_message(p, RCPT, "r1")).code == 550  # no TLS
    assert send(pf.port, p, [RCPT], make_message(p, RCPT, "r2"),
                tls=client_context(partners.pki.ca_path)).code == 550     # no cert
    for i in range(4):
        s = f"u{i}@fabrikam.test"
        assert send(pf.port, s, [RCPT], make_message(s, RCPT, f"o{i}")).accepted
    pf.wait_delivered(14)
    metrics = scrape(port)
    assert metrics['milterd_domain_secured_messages_received_total{domain="woodgrovebank.test"}'] == 3
    assert metrics['milterd_domain_security_failures_total{domain="woodgrovebank.test",reason="no_tls"}'] == 1
    assert metrics['milterd_domain_security_failures_total{domain="woodgrovebank.test",reason="no_trusted_cert"}'] == 1
    assert metrics['milterd_messages_total{verdict="accept"}'] == 7
    assert metrics['milterd_messages_total{verdict="reject"}'] == 2
    assert metrics['milterd_messages_total{verdict="tempfail"}'] == 0
    assert metrics['milterd_tls_sessions_total{verify="ok",version="TLSv1.3"}'] == 3
    # CI provisions the thread-per-connection libmilter (scripts/setup.sh); it must be in use
    mode = "pool" if os.environ.get("MILTERD_LIBMILTER") == "debian" else "threads"
    info = [k for k in metrics if k.startswith("milterd_build_info")]
    assert info == [f'milterd_build_info{{libmilter="{mode}",version="0.1.0"}}'], (
        f"expected libmilter={mode}: did scripts/build-libmilter.sh run? {info}")
    assert any(k.startswith('milterd_callback_duration_seconds_bucket{le="0.001",stage="eom"}')
               for k in metrics)
    # Bounded labels: nothing but configured domains.
    domains = {m.group(1) for k in metrics for m in [re.search(r'domain="([^"]*)"', k)] if m}
    assert domains == {"woodgrovebank.test"}


def test_one_json_log_line_per_message(milterd_factory, postfix_factory, partners):
    import json

    m = milterd_factory(PARTNER_CFG, extra_args=("--log-format", "json"))
    pf = postfix_factory(m.socket_spec)
    good = client_context(partners.pki.ca_path, partners.partner.cert_path,
                          partners.partner.key_path)
    p = "alice@woodgrovebank.test"
    assert send(pf.port, p, [RCPT, "second@contoso.test"], make_message(p, RCPT, "j1"),
                tls=good).accepted
    assert send(pf.port, p, [RCPT], make_message(p, RCPT, "j2")).code == 550
    pf.wait_delivered(2)
    def message_lines() -> list:
        return [json.loads(l) for l in m.log_text().splitlines() if '"milterd.message"' in l]
    with contextlib.suppress(AssertionError):   # poll the log (bounded) until both are written
        wait_until(lambda: len(message_lines()) >= 2, 10, "two milterd.message lines")
    lines = message_lines()
    assert len(lines) == 2  # one per message, not per recipient
    ok, refused = lines
    assert ok["queue_id"] and ok["verdict"] == "accept" and ok["recipients"] == 2
    assert (ok["tls"], ok["verify"], ok["subject"], ok["issuer"]) == (
        "TLSv1.3", "ok", "mail.woodgrovebank.test", "milterd Test CA")
    assert (ok["domain_secure"], ok["domain"]) == ("pass", "woodgrovebank.test")
    assert ok["client"] == "127.0.0.1" and ok["client_port"]
    assert (refused["verdict"], refused["reason"], refused["tls"]) == ("reject", "no_tls", "none")
    assert refused["reply"].startswith("550 5.7.1 Domain Security")
