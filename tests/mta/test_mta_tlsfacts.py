"""Pure TLS helpers: xtext, OpenSSL one-line DNs, chain verification, the
verify-callback hook and its fallback."""

from __future__ import annotations

import ssl

from cryptography import x509
from cryptography.x509.oid import NameOID

from milterd.mta import tls
from mta_fixtures import (  # noqa: F401 - pytest fixtures, used by name
    allow_warnings, no_unexpected_warnings, pki)


def test_xtext_like_sendmail():
    assert tls.xtext("/O=Lab/CN=Milterd Test CA") == "/O=Lab/CN=Milterd+20Test+20CA"
    assert tls.xtext('a"b+c<d>e)f;g=h') == "a+22b+2Bc+3Cd+3Ee+29f;g=h"
    assert tls.xtext("é") == "+C3+A9"


def test_openssl_oneline_and_exchange_forms():
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Corp"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "smi.extest.contoso.com")])
    assert tls.openssl_oneline(name) == "/C=US/O=Corp/CN=smi.extest.contoso.com"
    assert tls.exchange_dn(name) == "CN=smi.extest.contoso.com, O=Corp, C=US"
    assert tls.common_name(name) == "smi.extest.contoso.com"


def test_verify_chain_reasons(pki):
    cas = [pki.ca.ca.cert]
    assert tls.verify_chain(pki.woodgrove_client.cert, cas) == (True, "ok")
    assert tls.verify_chain(pki.woodgrove_selfsigned.cert, cas) == (
        False, "self-signed certificate")
    assert tls.verify_chain(pki.untrusted_server.cert, cas)[0] is False
    assert tls.verify_chain(pki.woodgrove_client.cert, []) == (
        False, "no trusted CAs configured")


def test_cert_facts(pki):
    facts = tls.CertFacts.from_cert(pki.woodgrove_client.cert)
    assert facts.subject == "/O=Lab/CN=mail.woodgrovebank.test"
    assert facts.issuer_cn == "Milterd Test CA"
    assert facts.dns_names == ("mail.woodgrovebank.test",)
    assert len(facts.sha256.split(":")) == 32 and facts.sha256 == facts.sha256.upper()
    assert len(facts.sha1) == 40
    assert tls.cert_covers_domain(facts, "woodgrovebank.test")
    assert not tls.cert_covers_domain(facts, "evilwoodgrovebank.test")


def test_verify_callback_is_installed_on_this_python(pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert tls.accept_any_client_cert(ctx) is True
    assert ctx.verify_mode == ssl.CERT_OPTIONAL


def test_fallback_when_the_pointer_cannot_be_validated(monkeypatch, caplog, allow_warnings):
    monkeypatch.setattr(tls, "_ssl_ctx_pointer", lambda ctx, lib: None)
    monkeypatch.setattr(tls, "_warned_fallback", False)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert tls.accept_any_client_cert(ctx) is False
    assert ctx.verify_mode == ssl.CERT_OPTIONAL  # OpenSSL verifies: untrusted certs fail
    assert "cannot install the TLS verify callback" in caplog.text
