"""Domain Security decisions as pure functions: every reason, in order of precedence."""

from __future__ import annotations

from dataclasses import replace

import pytest

from milterd import domain_security as ds
from milterd import reasons
from milterd.config import parse_config
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
    assert ds.covered_domain("woodgrovebank.test", rd) == "woodgrovebank.test"
    assert ds.covered_domain("sales.contoso.test", rd) == "contoso.test"
    assert ds.covered_domain("sub.woodgrovebank.test", rd) is None  # exact entry: exact only
    assert ds.covered_domain("fabrikam.test", rd) is None
    assert ds.covered_domain(None, rd) is None


def test_from_header_domains_every_mailbox():
    assert ds.from_header_domains(['"A" <a@x.test>, b@WoodgroveBank.test',
                                   "garbage <<<"]) == ["x.test", "woodgrovebank.test"]


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


# -- the From: fast path must agree with the RFC 5322 parser on everything it accepts -------------
from email.utils import getaddresses  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

from milterd.names import address_domain  # noqa: E402


def _slow_from_domains(value: str) -> list[str]:
    out = []
    for _name, addr in getaddresses([value]):
        d = address_domain(addr) if addr else None
        if d and d not in out:
            out.append(d)
    return out


# Characters that matter to the parser (specials, quotes, comments, whitespace, 8-bit, IDN)
# alongside plain ones, so generated values hit both sides of the fast-path pattern.
_FROM_CHARS = st.sampled_from(list("abcXYZ019.-_+=@<> \t\"()\\,;:[]!#'\r\n") + ["é", "ü", "ß"])


@settings(max_examples=3000, deadline=None)
@given(st.lists(_FROM_CHARS, max_size=40).map("".join))
def test_from_fast_path_agrees_with_getaddresses(value):
    assert ds.from_header_domains([value]) == _slow_from_domains(value)


@settings(max_examples=2000, deadline=None)
@given(name=st.text("abc XYZ.-_", max_size=12), local=st.text("abc.+-_=", min_size=1, max_size=8),
       domain=st.text("abcwoodgrvn.-", min_size=1, max_size=20), bracket=st.booleans(),
       pad=st.sampled_from(["", " ", "\t", "  "]))
def test_from_fast_path_on_mailbox_shapes(name, local, domain, bracket, pad):
    addr = f"{local}@{domain}"
    value = pad + (f"{name}<{addr}>" if bracket else addr) + pad
    assert ds.from_header_domains([value]) == _slow_from_domains(value)


@pytest.mark.parametrize("value, expect", [
    ("<a@WoodgroveBank.test>", ["woodgrovebank.test"]),
    ("Alice Smith <alice@woodgrovebank.test>", ["woodgrovebank.test"]),
    ("bob@fabrikam.test", ["fabrikam.test"]),
    ('"Woodgrove, Bank" <x@woodgrovebank.test>', ["woodgrovebank.test"]),   # slow path
    ("a@fabrikam.test, b@woodgrovebank.test", ["fabrikam.test", "woodgrovebank.test"]),
    ("x@woodgrovebank(comment).test", ["woodgrovebank.test"]),              # obs-domain
    ("<>", []),
])
def test_from_header_domains_shapes(value, expect):
    assert ds.from_header_domains([value]) == expect
