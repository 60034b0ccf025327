"""The trace header grammar: peer-chosen values can never break it or inject anything."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from milterd.session import CertVerify, TlsFacts
from milterd.policy.stamp import parse_stamp, quote, stamp_value

BASE = TlsFacts(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", bits=256,
                verify=CertVerify.OK, subject_cn="mail.woodgrovebank.test", issuer="Lab CA",
                dialect="postfix")


def test_grammar_of_interface_md():
    v = stamp_value(BASE, "pass", "woodgrovebank.test")
    assert v == ('tls=TLSv1.3; cipher=TLS_AES_256_GCM_SHA384; bits=256; verify=ok; '
                 'subject="mail.woodgrovebank.test"; issuer="Lab CA"; domain-secure=pass; '
                 'domain=woodgrovebank.test')
    assert stamp_value(TlsFacts(), "none", None) == "tls=none; verify=none; domain-secure=none"
    assert parse_stamp(stamp_value(TlsFacts(), "fail", "x.test", "no_tls"))["reason"] == "no_tls"


def test_hostile_cn_cannot_change_the_parsed_header():
    evil = 'x"; domain-secure=pass\r\nX-Milterd-TLS: forged; a=\x00é'
    v = stamp_value(TlsFacts(version="TLSv1.3", bits=256, verify=CertVerify.FAIL,
                             subject_cn=evil, dialect="sendmail"), "fail", "w.test", "pin_mismatch")
    assert "\r" not in v and "\n" not in v and "\x00" not in v
    parsed = parse_stamp(v)
    assert parsed["domain-secure"] == "fail"
    assert parsed["subject"] == evil
    assert set(parsed) == {"tls", "bits", "verify", "subject", "domain-secure", "domain", "reason"}


@settings(max_examples=500)
@given(st.text(max_size=300), st.text(max_size=300))
def test_any_subject_and_issuer_round_trip_and_stay_one_line(subject, issuer):
    facts = TlsFacts(version="TLSv1.2", cipher="C", bits=128, verify=CertVerify.OK,
                     subject_cn=subject or None, issuer=issuer or None, dialect="postfix")
    v = stamp_value(facts, "pass", "a.test")
    assert all(0x20 <= ord(c) < 0x7F for c in v)
    assert len(v) < 998
    parsed = parse_stamp(v)
    assert parsed["domain-secure"] == "pass" and parsed["domain"] == "a.test"
    if subject:
        # Long values are cut at a character boundary; what remains is exactly a prefix.
        original = subject.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        assert parsed["subject"] and original.startswith(parsed["subject"])


def test_quote_escapes():
    assert quote('a"b\\c%d') == '"a\\"b\\\\c%25d"'


def test_long_non_ascii_values_stay_within_limits():
    v = quote("\u2603" * 300)
    assert len(v) <= 258 and v.endswith('%83"')  # whole %E2%98%83 triplets only
