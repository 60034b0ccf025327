"""Coverage fails closed: whenever any reader finds a partner in a From: field, milterd covers it.

The readers (oracles) are the real things, never milterd's code: ``email.headerregistry`` under
the default and the strict policy, ``email.utils.getaddresses`` in both behaviours (strict, as in
Debian's and every CVE-2023-27043-fixed CPython, and the legacy parser it replaced — run on every
interpreter, so the result does not depend on which Python runs the tests), and a plain
``local@domain`` scan.  What a reader is *shown* counts too: invisible characters removed,
compatibility forms folded.  Inputs are generated (hypothesis): mailboxes mixed with junk,
comments, quotes, encoded words, invisible characters, folding, several From: headers.

``MILTERD_COVERAGE_EXAMPLES`` sets the examples per property (10,000 in CI, the default).
"""

from __future__ import annotations

import base64
import email
import email._parseaddr
import email.policy
import email.utils
import os
import re
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from milterd.policy.coverage import envelope_covered, from_covered, is_from_field, value_domains
from milterd.policy.names import domain_listed, normalize_dns_name

RECEIVE = ("woodgrovebank.test", ".woodgrovebank.test")
EXAMPLES = int(os.environ.get("MILTERD_COVERAGE_EXAMPLES", "10000"))
# CI replays the same examples every run (derandomize), so a landing never depends on luck; a
# developer's run explores new ones (MILTERD_COVERAGE_EXAMPLES=100000 for a deep search).
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=bool(os.environ.get("CI")),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- oracles --------------------------------------------------------------------------------------

def _shown(text: str) -> str:
    """What a reader sees: format/control characters drop out, compatibility forms fold."""
    return unicodedata.normalize(
        "NFKC", "".join(c for c in text if unicodedata.category(c) not in ("Cf", "Cc")))


def _names_partner(domain: str | None) -> bool:
    if not domain:
        return False
    for d in {domain, _shown(domain), domain.strip("[]"), _shown(domain).strip("[]")}:
        name = normalize_dns_name(d.strip().rstrip("."))
        if name and domain_listed(name, RECEIVE):
            return True
    return False


def _getaddresses_strict(value: str) -> list[str]:
    try:
        pairs = email.utils.getaddresses([value], strict=True)
    except TypeError:  # an interpreter without the strict parser: the legacy one is all there is
        pairs = email.utils.getaddresses([value])
    return [a for _n, a in pairs]


def _getaddresses_legacy(value: str) -> list[str]:
    # The pre-CVE-2023-27043 parser, on every interpreter.
    return [a for _n, a in email._parseaddr.AddressList(value).addresslist]


def _domain_of(addr: str) -> str | None:
    return addr.rpartition("@")[2] if "@" in addr else None


def _headerregistry(value: str, policy) -> list[str]:
    try:
        header = policy.header_factory("From", value)
        return [a.domain for a in header.addresses]
    except Exception:
        return []


_PLAIN = re.compile(r"[^\s<>()\[\]\",;:@\\]+@([^\s<>()\[\]\",;:@\\]+)")


def readers_find_partner(value: str) -> list[str]:
    """Names of the readers that see a partner in one From: value."""
    found = []
    for reader, domains in (
        ("headerregistry-default", _headerregistry(value, email.policy.default)),
        ("headerregistry-strict", _headerregistry(value, email.policy.strict)),
        ("getaddresses-strict", [_domain_of(a) for a in _getaddresses_strict(value)]),
        ("getaddresses-legacy", [_domain_of(a) for a in _getaddresses_legacy(value)]),
        ("plain-scan", _PLAIN.findall(value) + _PLAIN.findall(_shown(value))),
    ):
        if any(_names_partner(d) for d in domains):
            found.append(reader)
    return found


# -- generated From: fields ---------------------------------------------------------------------

INVISIBLE = ["\u200b", "\u00ad", "\u200c", "\u200d", "\u2060", "\ufeff", "\u180e", "\x00", "\x7f",
             "\x1b", "\u202e", "\u061c"]


@st.composite
def partner_like(draw) -> str:
    base = draw(st.sampled_from(["woodgrovebank.test", "WoodGroveBank.TEST", "sales.woodgrovebank.test",
                                 "woodgrovebank.test.", "ｗｏｏｄｇｒｏｖｅｂａｎｋ.test",
                                 "woodgrovebank\u3002test"]))
    if draw(st.booleans()):
        i = draw(st.integers(0, len(base)))
        base = base[:i] + draw(st.sampled_from(INVISIBLE)) + base[i:]
    return base


DOMAINS = st.one_of(partner_like(), st.sampled_from(
    ["fabrikam.test", "woodgrovebank.test.evil.example", "evilwoodgrovebank.test", "x.test",
     "[192.0.2.1]", "woodgrovebank", "xn--strae-oqa.test"]))
LOCALS = st.one_of(
    st.text("abcXYZ019.+-_'=/?^{}|~#$&*", min_size=1, max_size=8),
    st.builds(lambda a, b: f'"{a}"{b}', st.text("abc @<>(),;:.\\", max_size=6),
              st.sampled_from(["", ".x", ".\"y\""])),
    st.builds(lambda a, b: f'{a}."{b}"', st.text("abc", min_size=1, max_size=3),
              st.text("abc ", max_size=3)),
)
COMMENTS = st.builds(lambda t: f"({t})", st.text("abc ()@<>\\\"", max_size=8))


def _ew(text: str) -> str:
    return "=?utf-8?b?" + base64.b64encode(text.encode()).decode() + "?="


@st.composite
def mailbox(draw) -> str:
    local, domain = draw(LOCALS), draw(DOMAINS)
    addr_spec = draw(st.sampled_from([
        "{l}@{d}", "{l} @ {d}", "{l}@{c}{d}", "{l}@{d}{c}", "@relay.test:{l}@{d}", "{l}@ {d} "]))
    addr_spec = addr_spec.format(l=local, d=domain, c=draw(COMMENTS))
    shape = draw(st.integers(0, 6))
    name = draw(st.text("abc XYZ.,'", max_size=8))
    if shape == 0:
        return addr_spec
    if shape == 1:
        return f"{name} <{addr_spec}>"
    if shape == 2:
        return f'"{name}" <{addr_spec}>'
    if shape == 3:
        return f"{_ew(name or 'x')} <{addr_spec}>"
    if shape == 4:  # an address in the display name: what the reader sees
        return f'"{addr_spec}" <x@fabrikam.test>'
    if shape == 5:
        return f"{_ew(addr_spec)} <x@fabrikam.test>"
    return f"{addr_spec} {draw(COMMENTS)}"


JUNK = st.sampled_from(["<", ">", "(", ")", '"', ",", ";", ":", "\\", "@", " ", "\t", "\r\n ",
                        "=?", "?=", "[", "]", "!", "%", "group:", ";"] + INVISIBLE)
SEPARATORS = st.sampled_from([", ", ",", " ", "", "\r\n\t", ";", ",\r\n "])


@st.composite
def from_field(draw) -> str:
    parts = draw(st.lists(st.one_of(mailbox(), mailbox(), JUNK), min_size=1, max_size=6))
    return "".join(p + draw(SEPARATORS) for p in parts)


# -- properties ------------------------------------------------------------------------------------

@pytest.mark.timeout(1800)  # 10,000 examples take ~75 s here; leave room on a busy machine
@SETTINGS
@given(st.lists(from_field(), min_size=1, max_size=3))
def test_any_reader_finding_a_partner_means_covered(values):
    for v in values:
        found = readers_find_partner(v)
        if found:
            assert from_covered(values, RECEIVE) == ("woodgrovebank.test",), (v, found)


@pytest.mark.timeout(1800)
@SETTINGS
@given(st.lists(from_field(), min_size=1, max_size=3))
def test_several_from_headers_each_read_whole(values):
    # The whole message, as a reader's mail client gets it: every From: header counts, one header's
    # unclosed comment or quote never swallows the next.
    text = "".join(f"From: {v}\r\n" for v in values) + "Subject: x\r\n\r\nbody\r\n"
    msg = email.message_from_string(text, policy=email.policy.default)
    try:
        shown = [str(h) for h in msg.get_all("From") or []]
    except Exception:
        shown = []
    if any(readers_find_partner(v) for v in shown):
        assert from_covered(values, RECEIVE), (values, shown)


@pytest.mark.parametrize("value", [
    "ceo@woodgrovebank.test (unclosed comment",            # strict getaddresses returns nothing
    "ceo@woodgrovebank.test <",                             # stray <
    'a."b"@woodgrovebank.test',                             # quoted and atoms mixed
    "x@fabrikam.test ceo@woodgrovebank.test",               # two mailboxes, only a space between
    "ceo@wood\u200bgrovebank.test",                         # zero-width space
    "ceo@wood\u00adgrovebank.test",                         # soft hyphen
    "ceo@woodgrovebank\x00.test",                           # control character
    "ceo@ｗｏｏｄｇｒｏｖｅｂａｎｋ.ｔｅｓｔ",                    # full-width forms
    "ceo@woodgrovebank (c) . test",                         # obs-domain CFWS
    '"ceo@woodgrovebank.test" <x@fabrikam.test>',           # shown in the display name
    _ew("ceo@woodgrovebank.test") + " <x@fabrikam.test>",   # shown after decoding
    "<@relay.test:ceo@woodgrovebank.test>",                 # source route
    "ceo%woodgrovebank.test@relay.test",                    # percent hack
    "woodgrovebank.test!ceo",                               # bang path
    "ceo@[woodgrovebank.test]",
    "partners: ceo@woodgrovebank.test;",                    # group
    "ceo@sales.woodgrovebank.test.",
])
def test_known_escapes_are_covered(value):
    assert from_covered([value], RECEIVE) == ("woodgrovebank.test",)
    assert envelope_covered(value, RECEIVE) == ("woodgrovebank.test",)


def test_unclosed_comment_does_not_swallow_the_next_from_header():
    assert from_covered(["x@fabrikam.test (open", "ceo@woodgrovebank.test"], RECEIVE)


@pytest.mark.parametrize("value", [
    "bob@fabrikam.test", "bob@woodgrovebank.test.evil.example", "bob@evilwoodgrovebank.test",
    "woodgrovebank.test <bob@fabrikam.test>", "<>", "", "bob@woodgrovebank",
    "woodgrovebank.test@fabrikam.test",   # a local part is no domain in any reading
])
def test_lookalikes_are_not_covered(value):
    assert from_covered([value], RECEIVE) == ()
    assert envelope_covered(value, RECEIVE) == ()


def test_idna_2003_and_2008_readings_both_cover():
    assert envelope_covered("ceo@xn--strae-oqa.test", ("strasse.test",)) == ("strasse.test",)
    assert "xn--strae-oqa.test" in value_domains("ceo@straße.test")
    assert "strasse.test" in value_domains("ceo@straße.test")


def test_from_field_names():
    assert is_from_field("From") and is_from_field("FROM") and is_from_field("From ")
    assert not is_from_field("X-From") and not is_from_field("Resent-From")


def test_a_long_field_is_read_whole():
    filler = ", ".join(f"user{i}@fabrikam.test" for i in range(3000))  # ~70 KB
    assert len(filler) > 60000
    assert from_covered([filler + ", ceo@woodgrovebank.test"], RECEIVE) == ("woodgrovebank.test",)
