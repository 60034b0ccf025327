"""Domain Security decisions as pure functions: every reason, in order of precedence."""

from __future__ import annotations

from dataclasses import replace

import pytest

from milterd.policy import domain_security as ds
from milterd.policy import reasons
from milterd.policy.coverage import covered_entries
from milterd.core.config import parse_config
from milterd.session import CertVerify, TlsFacts

PIN = ":".join(["AA"] * 32)
OTHER_FP = ":".join(["BB"] * 32)
CONFIG = parse_config(f"""
[domain_security]
receive_domains = ["woodgrovebank.test", ".contoso.test"]
[tls]
min_version = "TLSv1.2"
min_cipher_bits = 128
[peer_cert.pins]
"pinned.test" = ["{PIN}"]
""")
GOOD = TlsFacts(version="TLSv1.3", cipher="X", bits=256, verify=CertVerify.OK,
                subject_cn="mail.woodgrovebank.test", issuer="Lab CA", dialect="postfix")


@pytest.mark.parametrize("facts,domain,expect", [
    (GOOD, "woodgrovebank.test", (ds.PASS, None)),
    (TlsFacts(), "woodgrovebank.test", (ds.FAIL, reasons.NO_TLS)),
    (replace(GOOD, version="TLSv1.1"), "woodgrovebank.test", (ds.FAIL, reasons.TLS_VERSION)),
    (replace(GOOD, version="SSLv3"), "woodgrovebank.test", (ds.FAIL, reasons.TLS_VERSION)),
    (replace(GOOD, bits=56), "woodgrovebank.test", (ds.FAIL, reasons.CIPHER_BITS)),
    (replace(GOOD, bits=None), "woodgrovebank.test", (ds.FAIL, reasons.CIPHER_BITS)),
    (replace(GOOD, verify=CertVerify.FAIL), "woodgrovebank.test",
     (ds.FAIL, reasons.NO_TRUSTED_CERT)),
    (replace(GOOD, verify=CertVerify.UNKNOWN), "woodgrovebank.test",
     (ds.FAIL, reasons.NO_TRUSTED_CERT)),
    (replace(GOOD, subject_cn="mail.fabrikam.test"), "woodgrovebank.test",
     (ds.FAIL, reasons.NAME_MISMATCH)),
    (replace(GOOD, subject_cn="evilwoodgrovebank.test"), "woodgrovebank.test",
     (ds.FAIL, reasons.NAME_MISMATCH)),
    (replace(GOOD, subject_cn=None), "woodgrovebank.test", (ds.FAIL, reasons.NAME_MISMATCH)),
    (replace(GOOD, subject_cn="MAIL.WoodgroveBank.TEST."), "woodgrovebank.test", (ds.PASS, None)),
    # Direct Trust: a pinned self-signed certificate passes without chain or name.
    (replace(GOOD, verify=CertVerify.FAIL, subject_cn="whatever", fingerprint_sha256=PIN),
     "pinned.test", (ds.PASS, None)),
    (replace(GOOD, verify=CertVerify.FAIL, fingerprint_sha256=OTHER_FP), "pinned.test",
     (ds.FAIL, reasons.PIN_MISMATCH)),
    # A pin does not help below the TLS minimums.
    (replace(GOOD, version="TLSv1", fingerprint_sha256=PIN), "pinned.test",
     (ds.FAIL, reasons.TLS_VERSION)),
])
def test_evaluate(facts, domain, expect):
    r = ds.evaluate(facts, domain, CONFIG)
    assert (r.status, r.reason) == expect
    assert r.domain == domain


def test_issuer_allow_list_accepts_cn_or_dn():
    cfg = parse_config('[peer_cert]\ntrusted_issuers = ["Lab CA"]\n')
    assert ds.evaluate(GOOD, "woodgrovebank.test", cfg).status == ds.PASS
    sendmail = replace(GOOD, issuer="/O=Lab/CN=Lab CA", dialect="sendmail")
    assert ds.evaluate(sendmail, "woodgrovebank.test", cfg).status == ds.PASS
    other = replace(GOOD, issuer="Other CA")
    assert ds.evaluate(other, "woodgrovebank.test", cfg).reason == reasons.ISSUER_NOT_ALLOWED


def test_coverage_by_list_entry():
    rd = CONFIG.domain_security.receive_domains
    assert covered_entries({"woodgrovebank.test"}, rd) == ("woodgrovebank.test",)
    assert covered_entries({"sales.contoso.test"}, rd) == ("contoso.test",)
    assert covered_entries({"sub.woodgrovebank.test"}, rd) == ()  # exact entry: exact only
    assert covered_entries({"fabrikam.test"}, rd) == ()
    assert covered_entries(set(), rd) == ()


def test_combine_first_failure_wins():
    p = ds.Result(ds.PASS, "a.test", via="trusted")
    f = ds.Result(ds.FAIL, "b.test", reasons.NO_TLS)
    assert ds.combine([p, f]) == f and ds.combine([p]) == p and ds.combine([]) == ds.NOT_COVERED


def test_postfix_pinned_partner_is_decided_once_the_fingerprint_can_be_known():
    anon = TlsFacts(version="TLSv1.3", bits=256, verify=CertVerify.UNKNOWN, dialect="postfix")
    assert ds.may_still_pass(anon, "pinned.test", CONFIG)
    assert not ds.may_still_pass(anon, "woodgrovebank.test", CONFIG)   # no pins there
    assert not ds.may_still_pass(replace(anon, fingerprint_sha256=OTHER_FP), "pinned.test", CONFIG)
    assert not ds.may_still_pass(TlsFacts(), "pinned.test", CONFIG)   # no TLS: nothing to wait for


def test_every_rcpt_of_a_pinned_partner_gets_the_same_answer():
    # Postfix: an impostor's self-signed certificate for a pinned domain is refused at the first
    # RCPT and at every later one — never accepted until end of data.
    from milterd.session import Connection, Message
    from milterd_plugins import domain_security as plugin

    config = parse_config(f"""
[domain_security]
receive_domains = ["pinned.test"]
[peer_cert.pins]
"pinned.test" = ["{PIN}"]
""")
    tls = TlsFacts(version="TLSv1.3", bits=256, verify=CertVerify.FAIL,
                   fingerprint_sha256=OTHER_FP, dialect="postfix")
    conn = Connection(id="c1", tls=tls)
    msg = Message(sender="<a@pinned.test>")
    verdicts = [plugin.milterd_rcpt_to(config=config, connection=conn, message=msg,
                                       recipient=f"<r{i}@contoso.test>") for i in range(3)]
    assert all(v is not None and v.code == "550" for v in verdicts), verdicts
    assert msg.stash[ds.RESULT_KEY].reason == reasons.PIN_MISMATCH
