"""Subject/issuer DNs from MTA macros: xtext, one-line and RFC 4514 forms, the single-CN rule.

Fuzz depth follows ``MILTERD_FUZZ_EXAMPLES`` (default 150), as in test_names.py.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milterd.policy.dn import format_dn, parse_dn, subject_cn, xtext_decode

EXAMPLES = int(os.environ.get("MILTERD_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
GOOD = "good.partner.test"


def xtext_encode(s: str) -> str:
    """RFC 3461 xtext as Sendmail writes it: '+', '=', controls, space and non-ASCII as +XX."""
    out = []
    for b in s.encode("utf-8"):
        out.append("+%02X" % b if b < 0x21 or b > 0x7E or b in (0x2B, 0x3D) else chr(b))
    return "".join(out)


# --------------------------------------------------------------------------- xtext


@pytest.mark.parametrize("raw, expected", [
    ("/O=Lab/CN=mail.woodgrovebank.test", "/O=Lab/CN=mail.woodgrovebank.test"),
    ("/O=Woodgrove+20Bank/CN=x", "/O=Woodgrove Bank/CN=x"),
    ("+22quoted+22", '"quoted"'),
    ("a+2Bb", "a+b"),
    ("+C3+A9t+C3+A9", "été"),
    ("+2b", "+"),           # lower-case hex tolerated
    ("a+2", "a+2"),         # truncated: kept literally
    ("+zz", "+zz"),
    ("+", "+"),
    ("++41", "+A"),
    ("+FF", "\ufffd"),      # not UTF-8: replacement character, never an exception
    ("", ""),
])
def test_xtext_decode(raw: str, expected: str) -> None:
    assert xtext_decode(raw) == expected


@FUZZ
@given(st.text())
def test_xtext_roundtrip(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return  # lone surrogates cannot travel as octets
    assert xtext_decode(xtext_encode(s)) == s


# --------------------------------------------------------------------------- parse_dn


def test_parse_oneline() -> None:
    assert parse_dn("/C=US/O=Lab/CN=mail.woodgrovebank.test") == (
        ("C", "US"), ("O", "Lab"), ("CN", "mail.woodgrovebank.test"))
    # A '/' not followed by TYPE= stays in the value; types are upper-cased.
    assert parse_dn("/o=A/B Corp/emailAddress=x@y.test") == (("O", "A/B Corp"), ("EMAILADDRESS", "x@y.test"))
    assert parse_dn("/O=Lab/2.5.4.3=x.test") == (("O", "Lab"), ("2.5.4.3", "x.test"))


def test_parse_rfc4514_escapes() -> None:
    assert parse_dn("CN=mail.contoso.com,O=Contoso,DC=contoso,DC=com") == (
        ("CN", "mail.contoso.com"), ("O", "Contoso"), ("DC", "contoso"), ("DC", "com"))
    assert parse_dn(r'CN=a\,b\+c\"d\\e\3Df,O=\C3\A9t\C3\A9') == (("CN", 'a,b+c"d\\e=f'), ("O", "été"))
    assert parse_dn("cn=x+ou=y, o = Org ") == (("CN", "x"), ("OU", "y"), ("O", "Org"))
    assert parse_dn(r"CN=\ lead and trail\ ") == (("CN", " lead and trail "),)
    assert parse_dn('O="Quoted, Inc.",C=US') == (("O", "Quoted, Inc."), ("C", "US"))


@pytest.mark.parametrize("garbage, expected", [
    ("", ()),
    ("garbage", ()),
    ("mail.woodgrovebank.test", ()),           # Postfix's bare CN is not a DN
    ("CN=a,garbage,CN=b", (("CN", "a"),)),     # stops at the error
    ("CN=a,", (("CN", "a"),)),
    ("CN=ok\\", ()),
    ('O="unterminated', ()),
    ("=x", ()),
    ("/", ()),
])
def test_parse_garbage_is_partial_not_an_error(garbage: str, expected: tuple) -> None:
    assert parse_dn(garbage) == expected


# --------------------------------------------------------------------------- subject_cn


@pytest.mark.parametrize("subject, expected", [
    ("/O=Lab/CN=mail.woodgrovebank.test", "mail.woodgrovebank.test"),
    ("CN=mail.contoso.com,O=Contoso", "mail.contoso.com"),
    ("/O=Lab", None),
    ("", None),
    ("/O=Lab/CN=", None),
    ("/O=Evil/CN=evil.test/CN=" + GOOD, None),    # CN value smuggling a second CN: ambiguous
    ("/CN=" + GOOD + "/CN=evil.test", None),
    ("CN=evil.test+CN=" + GOOD, None),              # multi-valued RDN with two CNs
    ("CN=evil.test,CN=" + GOOD, None),
    (r"CN=evil.test\,CN=" + GOOD, None),            # escaped: one CN, but it carries "CN=": no name
    (r"CN=x\/CN=" + GOOD, None),
    ("CN=" + GOOD + ",garbage", None),              # did not parse cleanly: no name
    ("garbage/CN=" + GOOD, None),                   # one-line form must start with '/'
    ("/O=" + "A" * 240 + "/CN=" + GOOD, None),      # ≥ 255 chars: Sendmail may have truncated it
])
def test_subject_cn(subject: str, expected: str | None) -> None:
    assert subject_cn(subject) == expected


def test_subject_cn_cross_checks_sendmail_cn_macro() -> None:
    """O smuggling "/CN=" into a certificate without a real CN is byte-identical to a real CN in
    the one-line form; only Sendmail's {cn_subject} (the real CN, here empty) tells them apart."""
    forged = "/O=Evil/CN=" + GOOD   # O value "Evil/CN=good.partner.test", no CN attribute
    assert subject_cn(forged, cn_macro="") is None
    assert subject_cn(forged, cn_macro=GOOD) == GOOD
    assert subject_cn("/O=Lab/CN=" + GOOD, cn_macro="other.test") is None


# --------------------------------------------------------------------------- format_dn


def test_format_dn() -> None:
    assert format_dn([("CN", "mail.contoso.com"), ("O", "Contoso")]) == "CN=mail.contoso.com,O=Contoso"
    assert format_dn([("O", 'a,b+c"d\\e;f<g>h=i')]) == r'O=a\,b\+c\"d\\e\;f\<g\>h\=i'
    assert format_dn([("CN", " x ")]) == r"CN=\ x\ "
    assert format_dn([("CN", "#x")]) == r"CN=\#x"
    assert format_dn([("CN", "a\nb\x00")]) == r"CN=a\0Ab\00"   # stays one line
    assert format_dn([]) == ""


types = st.sampled_from(["CN", "O", "OU", "C", "DC", "L", "2.5.4.3", "EMAILADDRESS"])
values = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)


@FUZZ
@given(st.lists(st.tuples(types, values), max_size=5))
def test_format_parse_roundtrip(pairs: list[tuple[str, str]]) -> None:
    assert parse_dn(format_dn(pairs)) == tuple(pairs)


@FUZZ
@given(st.text(max_size=120))
def test_never_raises_on_arbitrary_text(s: str) -> None:
    for candidate in (s, "/" + s, "CN=" + s, xtext_decode(s)):
        pairs = parse_dn(candidate)
        assert isinstance(pairs, tuple) and all(t == t.upper() for t, _ in pairs)
        cn = subject_cn(candidate)
        assert cn is None or (cn and [v for t, v in pairs if t in ("CN", "2.5.4.3")] == [cn])
        assert isinstance(format_dn(pairs), str)


safe_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
other_attr = st.tuples(st.sampled_from(["C", "O", "OU", "L", "ST"]), safe_text)


@FUZZ
@given(
    before=st.lists(other_attr, max_size=3), after=st.lists(other_attr, max_size=3),
    prefix=safe_text, suffix=safe_text, crafted_in=st.sampled_from(["CN", "O", "OU"]),
    real_cn=st.sampled_from(["evil.test", "x", ""]), sep=st.sampled_from(["/", ",", "+", "/ ", ", "]),
    cn_type=st.sampled_from(["CN", "cn", "2.5.4.3"]),
)
def test_crafted_value_never_yields_the_smuggled_cn(
    before, after, prefix, suffix, crafted_in, real_cn, sep, cn_type,
) -> None:
    """The certificate holder picks a value containing "<sep>CN=good.partner.test"; in every
    rendering (one-line, its xtext form as Sendmail sends it, RFC 4514) the result is never that
    name, given Sendmail's real CN in {cn_subject} (the attribute the crafted value is not)."""
    crafted = prefix + sep + cn_type + "=" + GOOD + suffix
    attrs = list(before) + [(crafted_in, crafted)] + list(after)
    if crafted_in != "CN" and real_cn:
        attrs.append(("CN", real_cn))
    real = crafted if crafted_in == "CN" else real_cn
    oneline = "".join("/%s=%s" % kv for kv in attrs)
    for s in (oneline, xtext_decode(xtext_encode(oneline)), format_dn(attrs)):
        assert subject_cn(s, cn_macro=real) != GOOD
        if crafted_in == "CN" or real_cn:
            assert subject_cn(s) != GOOD  # with a real CN present, even without the macro
