"""STARTTLS with client certificates: what the milter sees (Sendmail dialect)
and what the protocol log records."""

from __future__ import annotations

import hashlib
import smtplib

from cryptography.hazmat.primitives.serialization import Encoding

from mta_helpers import client_tls_context, converse, maildir_messages, send_one
from milterd.lab.wait import wait_until
from mta_fixtures import (  # noqa: F401 - pytest fixtures, used by name
    make_mta, milter, no_unexpected_warnings, pki, short_dir)


def _fp(issued) -> str:  # type: ignore[no-untyped-def]
    der = issued.cert.public_bytes(Encoding.DER)
    return ":".join("%02X" % b for b in hashlib.sha256(der).digest())


def _macros_by_stage(milter, port: int) -> dict[str, list[dict[str, str]]]:  # type: ignore[no-untyped-def]
    out: dict[str, list[dict[str, str]]] = {}
    for e in milter.events(port):
        out.setdefault(e["stage"], []).append(e.get("macros", {}))
    return out


def test_ca_signed_client_cert_gives_verify_ok(make_mta, milter, pki):
    mta = make_mta(milter=milter.spec)
    ctx = client_tls_context(pki, pki.woodgrove_client)
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test", ["bob@contoso.test"],
                             starttls=True, ctx=ctx)
    port = conv.client_port
    conv.close()
    assert replies[-1][0] == 250
    stages = _macros_by_stage(milter, port)
    # HELO twice (around STARTTLS); TLS macros only on the second
    helo_plain, helo_tls = stages["helo"]
    assert "{verify}" not in helo_plain and "{tls_version}" not in helo_plain
    for m in (helo_tls, stages["mail"][0], stages["eom"][0]):
        assert m["{verify}"] == "OK"
        assert m["{cert_subject}"] == "/O=Lab/CN=mail.woodgrovebank.test"
        assert m["{cn_subject}"] == "mail.woodgrovebank.test"
        assert m["{cert_issuer}"] == "/O=Lab/CN=Milterd+20Test+20CA"  # xtext: space is +20
        assert m["{cn_issuer}"] == "Milterd+20Test+20CA"
        assert m["{cert_fp}"] == _fp(pki.woodgrove_client)
        assert m["{tls_version}"] in ("TLSv1.2", "TLSv1.3")
        assert int(m["{cipher_bits}"]) >= 128 and m["{cipher}"]
    (raw,) = wait_until(lambda: maildir_messages(mta.cfg.maildir_root, "bob@contoso.test"),
                      what="delivery")
    assert b"with ESMTPS id" in raw and b"verify=OK)" in raw


def test_self_signed_client_cert_gives_verify_fail_with_same_cn(make_mta, milter, pki):
    mta = make_mta(milter=milter.spec)
    ctx = client_tls_context(pki, pki.woodgrove_selfsigned)
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test", ["bob@contoso.test"],
                             starttls=True, ctx=ctx)
    port = conv.client_port
    conv.close()
    assert replies[-1][0] == 250  # the MTA accepts; refusing is the milter's job
    m = _macros_by_stage(milter, port)["mail"][0]
    assert m["{verify}"] == "FAIL"
    assert m["{cn_subject}"] == "mail.woodgrovebank.test"
    assert m["{cert_subject}"] == "/O=Evil/CN=mail.woodgrovebank.test"
    assert m["{cert_fp}"] == _fp(pki.woodgrove_selfsigned)
    log = mta.cfg.protocol_log.read_text()
    assert "verify=FAIL,self-signed certificate" in log


def test_no_client_cert_gives_verify_no(make_mta, milter, pki):
    mta = make_mta(milter=milter.spec)
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test", ["bob@contoso.test"],
                             starttls=True, ctx=client_tls_context(pki, None))
    port = conv.client_port
    conv.close()
    m = _macros_by_stage(milter, port)["mail"][0]
    assert m["{verify}"] == "NO"
    assert m["{cert_subject}"] == "" and m["{cn_subject}"] == "" and m["{cert_fp}"] == ""
    assert m["{tls_version}"].startswith("TLSv1.")


def test_no_starttls_no_tls_macros(make_mta, milter):
    mta = make_mta(milter=milter.spec)
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test", ["bob@contoso.test"])
    port = conv.client_port
    conv.close()
    for stage, macro_sets in _macros_by_stage(milter, port).items():
        for m in macro_sets:
            assert not {"{verify}", "{cert_subject}", "{cn_subject}", "{cert_fp}",
                        "{tls_version}", "{cipher}"} & set(m), stage


def test_protocol_log_records_certificates_not_bodies(make_mta, pki):
    mta = make_mta()
    ctx = client_tls_context(pki, pki.woodgrove_client)
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test", ["bob@contoso.test"],
                             starttls=True, ctx=ctx)
    conv.close()
    wait_until(lambda: maildir_messages(mta.cfg.maildir_root, "bob@contoso.test"))
    # the disconnect line follows the 221 reply asynchronously
    log = wait_until(lambda: (lambda t: t if ",-,," in t else "")(mta.cfg.protocol_log.read_text()),
                   what="disconnect line")
    lines = log.splitlines()
    assert lines[1].startswith("#Fields: date-time,connector-id,session-id,sequence-number")
    assert ",Receive," in log and ",+,," in log and ",-,," in log
    assert ",<,STARTTLS," in log and ",>,220 Ready to start TLS," in log
    assert ',*,,Sending certificate' in log and ',*,,Received certificate' in log
    assert '"CN=mail.woodgrovebank.test, O=Lab",Certificate subject' in log  # CSV-quoted
    assert "%s,Certificate thumbprint" % hashlib.sha1(
        pki.woodgrove_client.cert.public_bytes(Encoding.DER)).hexdigest().upper() in log
    assert "mail.woodgrovebank.test,Certificate alternate names" in log
    assert "TLS negotiated" in log
    assert "Hello Bob" not in log and "original subject" not in log


def test_auth_secrets_are_not_logged(make_mta):
    mta = make_mta()
    conv = converse(mta.port)
    code, _ = conv.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==")
    conv.close()
    assert code == 502
    log = mta.cfg.protocol_log.read_text()
    assert "AUTH PLAIN ****" in log and "AGFsaWNlAHNlY3JldA" not in log


def test_require_client_cert_refuses_self_signed(make_mta, pki):
    mta = make_mta(require_client_cert=True)
    conv = converse(mta.port, starttls=True, ctx=client_tls_context(pki, pki.woodgrove_selfsigned))
    try:
        code, _ = conv.cmd("MAIL FROM:<alice@woodgrovebank.test>")
        assert code == 554
    finally:
        try:
            conv.close()
        except smtplib.SMTPException:
            pass
    conv = converse(mta.port, starttls=True, ctx=client_tls_context(pki, pki.woodgrove_client))
    assert conv.cmd("MAIL FROM:<alice@woodgrovebank.test>")[0] == 250
    conv.close()


def test_expired_client_cert_from_trusted_ca_gives_verify_fail(make_mta, milter, pki):
    import datetime as dt

    expired = pki.ca.issue("wg_expired", "mail.woodgrovebank.test",
                           not_after=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1))
    mta = make_mta(milter=milter.spec)
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test", ["bob@contoso.test"],
                             starttls=True, ctx=client_tls_context(pki, expired))
    port = conv.client_port
    conv.close()
    assert replies[-1][0] == 250
    m = _macros_by_stage(milter, port)["mail"][0]
    assert m["{verify}"] == "FAIL" and m["{cn_subject}"] == "mail.woodgrovebank.test"
    assert "verify=FAIL,certificate has expired" in mta.cfg.protocol_log.read_text()


def test_cert_from_another_ca_gives_verify_fail(make_mta, milter, pki):
    other = pki.other.issue("wg_other_client", "mail.woodgrovebank.test")
    mta = make_mta(milter=milter.spec)
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test", ["bob@contoso.test"],
                             starttls=True, ctx=client_tls_context(pki, other))
    port = conv.client_port
    conv.close()
    m = _macros_by_stage(milter, port)["mail"][0]
    assert m["{verify}"] == "FAIL"
    assert m["{cert_issuer}"] == "/O=Elsewhere/CN=Other+20CA"
