from __future__ import annotations

import pytest

from milterd.session import CertVerify
from milterd.inbound.tlsfacts import from_macros, merge_policy_facts

FP = ":".join(["EA"] * 32)
TLS = {"{tls_version}": "TLSv1.3", "{cipher}": "TLS_AES_256_GCM_SHA384", "{cipher_bits}": "256"}


def test_postfix_no_tls():
    facts, warnings = from_macros({})
    assert not facts.encrypted and facts.verify is CertVerify.NONE and not warnings


def test_postfix_anonymous_or_untrusted_is_unknown():
    facts, _ = from_macros(TLS)
    assert facts.dialect == "postfix" and facts.bits == 256
    assert facts.verify is CertVerify.UNKNOWN and facts.subject_cn is None


def test_postfix_trusted_cert_gives_cn_and_issuer():
    facts, _ = from_macros({**TLS, "{cert_subject}": "mail.woodgrovebank.test",
                            "{cert_issuer}": "Lab CA"})
    assert (facts.verify, facts.subject_cn, facts.issuer) == (
        CertVerify.OK, "mail.woodgrovebank.test", "Lab CA")


def test_postfix_trusted_cert_without_cn():
    facts, _ = from_macros({**TLS, "{cert_subject}": "", "{cert_issuer}": "Lab CA"})
    assert facts.verify is CertVerify.OK and facts.subject_cn is None


def test_postfix_policy_view_distinguishes_untrusted_from_none():
    facts, _ = from_macros(TLS)
    assert merge_policy_facts(facts, FP.lower()).verify is CertVerify.FAIL
    assert merge_policy_facts(facts, FP.lower()).fingerprint_sha256 == FP
    assert merge_policy_facts(facts, None).verify is CertVerify.NONE
    trusted, _ = from_macros({**TLS, "{cert_subject}": "x.test"})
    assert merge_policy_facts(trusted, FP).verify is CertVerify.OK


def test_sendmail_dialect_cases():
    # notes/sendmail.md table
    anon, _ = from_macros({**TLS, "{verify}": "NO", "{cert_subject}": "", "{cn_subject}": "",
                           "{cert_fp}": ""})
    assert (anon.dialect, anon.verify, anon.subject_cn, anon.fingerprint_sha256) == (
        "sendmail", CertVerify.NONE, None, None)
    ok, _ = from_macros({**TLS, "{verify}": "OK",
                         "{cert_subject}": "/O=Lab/CN=mail.woodgrovebank.test",
                         "{cn_subject}": "mail.woodgrovebank.test",
                         "{cert_issuer}": "/O=Lab+20Corp/CN=Lab+20CA", "{cert_fp}": FP})
    assert (ok.verify, ok.subject_cn, ok.issuer, ok.fingerprint_sha256) == (
        CertVerify.OK, "mail.woodgrovebank.test", "/O=Lab Corp/CN=Lab CA", FP)
    bad, _ = from_macros({**TLS, "{verify}": "FAIL",
                          "{cert_subject}": "/O=Evil/CN=mail.woodgrovebank.test",
                          "{cn_subject}": "mail.woodgrovebank.test", "{cert_fp}": FP})
    assert bad.verify is CertVerify.FAIL and bad.subject_cn == "mail.woodgrovebank.test"
    trusted, _ = from_macros({**TLS, "{verify}": "TRUSTED", "{cn_subject}": "a.test"})
    assert trusted.verify is CertVerify.OK
    for v in ("TEMP", "PROTOCOL", "DANE_FAIL", "SOFTWARE", "garbage"):
        assert from_macros({**TLS, "{verify}": v})[0].verify is CertVerify.FAIL


def test_sendmail_smuggled_second_cn_is_no_name():
    # A CN *value* "evil/CN=mail.woodgrovebank.test" prints like two CNs in a one-line DN.
    facts, warnings = from_macros({
        **TLS, "{verify}": "OK",
        "{cert_subject}": "/O=X/CN=evil.test/CN=mail.woodgrovebank.test",
        "{cn_subject}": "evil.test/CN=mail.woodgrovebank.test"})
    assert facts.subject_cn is None
    assert warnings


def test_sendmail_md5_fingerprint_is_never_a_pin():
    facts, _ = from_macros({**TLS, "{verify}": "FAIL", "{cert_md5}": "AB:CD"})
    assert facts.fingerprint_sha256 is None and facts.fingerprint_other == "AB:CD"


def test_malformed_macros_do_not_raise():
    facts, warnings = from_macros({"{tls_version}": "TLSv9\x00", "{cipher_bits}": "lots",
                                   "{cert_subject}": "x" * 100000})
    assert facts.bits is None and len(warnings) == 2
    assert len(facts.subject_cn or "") <= 4096


def test_sendmail_cn_hidden_in_another_attribute_is_no_name():
    # No real CN; the O value carries "/CN=…".  {cn_subject} is empty: the DN must not be read.
    facts, _ = from_macros({**TLS, "{verify}": "OK",
                            "{cert_subject}": "/O=x/CN=mail.woodgrovebank.test",
                            "{cn_subject}": ""})
    assert facts.subject_cn is None


@pytest.mark.parametrize("name, value", [
    ("{cipher_bits}", "²"), ("{cipher_bits}", "٣"), ("{cipher_bits}", "256\n"),
    ("{tls_version}", "TLSv1.3\n"), ("{cipher}", "AES\r\nX-Evil: 1"), ("{cert_subject}", "a\nb"),
    ("{cert_issuer}", "\udcff\udcfe"), ("{verify}", "OK\n"), ("{cert_fp}", "Z" * 5000),
])
def test_hostile_macro_values_never_raise_and_never_reach_the_stamp_raw(name, value):
    from milterd.policy.stamp import stamp_value

    macros = {"{tls_version}": "TLSv1.3", "{cipher}": "TLS_AES_256_GCM_SHA384",
              "{cipher_bits}": "256", name: value}
    facts, _warnings = from_macros(macros)
    stamp = stamp_value(facts, "none", None)
    assert "\n" not in stamp and "\r" not in stamp
