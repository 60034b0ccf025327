"""Name matching for Domain Security: examples plus hypothesis properties.

Fuzz depth: each property runs ``MILTERD_FUZZ_EXAMPLES`` examples (default 150, kept small so
CI is fast); e.g. ``MILTERD_FUZZ_EXAMPLES=20000 pytest tests/test_names.py``.  Independently,
``test_fuzz_budget_10k`` (marked ``slow``) runs every property for at least 10,000 examples in
total and asserts that this takes under 30 seconds.  The hypothesis example database is off
(``database=None``) so test runs never write into the repository.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milterd.policy.names import address_domain, domain_listed, name_covers_domain, name_matches, normalize_dns_name

EXAMPLES = int(os.environ.get("MILTERD_FUZZ_EXAMPLES", "150"))


# --------------------------------------------------------------------------- examples


@pytest.mark.parametrize("raw, expected", [
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
    ("xn--zca.de", "xn--zca.de"),          # IDNA 2008 A-label (ß) kept as is
    ("mail1.contoso.com", "mail1.contoso.com"),
    ("a-b.c0.test", "a-b.c0.test"),
    ("a.b。c", "a.b.c"),                    # ideographic full stop is a label separator
    ("x" * 63 + ".test", "x" * 63 + ".test"),
])
def test_normalize_valid(raw: str, expected: str) -> None:
    assert normalize_dns_name(raw) == expected


@pytest.mark.parametrize("raw", [
    "", ".", "..", "a..b", ".a.b", "a.b..", "a b.test", "a\x00b.test", "a\tb.test", "a@b.test",
    "-a.test", "a-.test", "a_b.test", "*.example.com", "x" * 64 + ".test", ".".join(["a" * 63] * 4) + ".x",
    "192.0.2.1", "example.123", "xn--abc-.test", "xn--.test", "xn--a.test", "\u200d.test", "exa\u0085mple.test",
    "ex/ample.test", "ex\u00adample.test", "ex\u200bample.test", "bü\u200dcher.test", "a\u3000b.test",
])
def test_normalize_invalid(raw: str) -> None:
    assert normalize_dns_name(raw) is None


def test_total_length_limit() -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 octets
    assert len(name) == 253 and normalize_dns_name(name) == name
    assert normalize_dns_name("c" + name) is None


@pytest.mark.parametrize("presented, reference, expected", [
    ("mail.example.com", "MAIL.Example.com.", True),
    ("mail.example.com.", "mail.example.com", True),
    ("*.example.com", "mail.example.com", True),
    ("*.Example.COM", "Mail.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.b.example.com", False),
    ("*.com", "example.com", False),
    ("*.test", "woodgrovebank.test", False),
    ("*", "example", False),
    ("f*o.example.com", "foo.example.com", False),
    ("*foo.example.com", "xfoo.example.com", False),
    ("foo*.example.com", "foox.example.com", False),
    ("a.*.example.com", "a.b.example.com", False),
    ("*.*.example.com", "a.b.example.com", False),
    ("**.example.com", "a.example.com", False),
    ("*.example.com", "xn--bcher-kva.example.com", False),  # no wildcard into an A-label
    ("*.example.com", "bücher.example.com", False),         # nor into a U-label
    ("*.bücher.example", "mx.xn--bcher-kva.example", True),
    ("bücher.example", "xn--bcher-kva.example", True),
    ("xn--bcher-kva.example", "BÜCHER.example", True),
    ("mail.example.com", "mail.example.com.evil", False),
    ("mail.example.com", "", False),
    ("", "", False),
    ("mail.example.com\x00.evil", "mail.example.com", False),
    ("192.0.2.1", "192.0.2.1", False),
])
def test_name_matches(presented: str, reference: str, expected: bool) -> None:
    assert name_matches(presented, reference) is expected


@pytest.mark.parametrize("presented, domain, expected", [
    ("mail.woodgrovebank.test", "woodgrovebank.test", True),
    ("woodgrovebank.test", "woodgrovebank.test", True),
    ("A.B.WoodgroveBank.Test.", "woodgrovebank.test", True),
    ("evilwoodgrovebank.test", "woodgrovebank.test", False),
    ("woodgrovebank.test.evil", "woodgrovebank.test", False),
    ("mail.woodgrovebank.test.evil", "woodgrovebank.test", False),
    ("*.woodgrovebank.test", "woodgrovebank.test", True),
    ("*.mail.woodgrovebank.test", "woodgrovebank.test", True),
    ("*.test", "woodgrovebank.test", False),
    ("*.woodgrovebank.test", "mail.woodgrovebank.test", False),  # base above the domain
    ("mail.*.woodgrovebank.test", "woodgrovebank.test", False),
    ("m*l.woodgrovebank.test", "woodgrovebank.test", False),
    ("test", "woodgrovebank.test", False),
    ("mx.xn--bcher-kva.example", "bücher.example", True),
    ("", "woodgrovebank.test", False),
    ("mail.woodgrovebank.test", "", False),
])
def test_name_covers_domain(presented: str, domain: str, expected: bool) -> None:
    assert name_covers_domain(presented, domain) is expected


def test_domain_listed() -> None:
    entries = [".contoso.test", "woodgrovebank.test", ".deep.contoso.test", "bad entry", "*.x.test"]
    assert domain_listed("a.contoso.test", entries) == ".contoso.test"
    assert domain_listed("x.y.contoso.test", entries) == ".contoso.test"
    assert domain_listed("a.deep.contoso.test", entries) == ".deep.contoso.test"  # most specific wins
    assert domain_listed("contoso.test", entries) is None        # dot entry: subdomains only
    assert domain_listed("WoodgroveBank.TEST.", entries) == "woodgrovebank.test"
    assert domain_listed("mail.woodgrovebank.test", entries) is None  # plain entry: exact only
    assert domain_listed("evilcontoso.test", entries) is None
    assert domain_listed("a.x.test", entries) is None
    assert domain_listed("", entries) is None
    assert domain_listed("a.contoso.test", []) is None
    assert domain_listed("sub.contoso.test", ["contoso.test", ".contoso.test"]) == ".contoso.test"
    assert domain_listed("contoso.test", [".contoso.test", "contoso.test"]) == "contoso.test"
    assert domain_listed("xn--bcher-kva.example", ["bücher.example"]) == "xn--bcher-kva.example"
    assert domain_listed("a.b", iter([".b"])) == ".b"  # any iterable; validity, not policy, decides


def test_domain_listed_single_label_parent() -> None:
    assert domain_listed("a.test", [".test"]) == ".test"


@pytest.mark.parametrize("addr, expected", [
    ("<user@Example.COM>", "example.com"),
    ("user@example.com", "example.com"),
    (" <user@example.com.> ", "example.com"),
    ("<>", None),
    ("", None),
    ('<"a@b"@example.com>', "example.com"),
    ('<"user@evil.test">', None),
    ('<"a\\"@x"@example.com>', "example.com"),
    ('<"unterminated@example.com>', None),
    ("<@relay.test,@r2.test:user@example.com>", "example.com"),
    ("<user@[192.0.2.1]>", None),
    ("<user@>", None),
    ("<@example.com>", None),
    ("<user@a@b.test>", None),
    ("<user@example.com", None),
    ("user", None),
    ("<postmaster>", None),
    ("<üser@bücher.example>", "xn--bcher-kva.example"),
    ("<user@bad domain.test>", None),
])
def test_address_domain(addr: str, expected: str | None) -> None:
    assert address_domain(addr) == expected


# --------------------------------------------------------------------------- properties

# Labels over a tiny alphabet so that suffix collisions (the interesting cases) are frequent.
SMALL_LABELS = ["a", "b", "aa", "ab", "ba", "bb", "a-b", "b-a", "aab"]
small_label = st.sampled_from(SMALL_LABELS)
_LDH = "abcdefghijklmnopqrstuvwxyz0123456789-"
# LDH labels: hyphens are kept away from the ends and from positions 3-4 (the xn-- style prefix).
ldh_label = st.text(_LDH, min_size=1, max_size=10).map(
    lambda s: "x" + s.replace("-", "") + "y" if s[0] == "-" or s[-1] == "-" or s[2:4] == "--" else s)
small_name = st.lists(small_label, min_size=1, max_size=4).map(".".join)
ldh_name = st.lists(ldh_label, min_size=1, max_size=4).map(".".join).map(
    lambda n: n + "z" if n.rsplit(".", 1)[-1].isdigit() else n)
unicode_label = st.text(st.characters(min_codepoint=0xC0, max_codepoint=0x24F, categories=("Ll", "Lu")),
                        min_size=1, max_size=6)


def disguise(draw: st.DrawFn, name: str) -> str:
    """Same name, random case (one bit per character) and optional trailing dot."""
    bits = draw(st.integers(0, (1 << (len(name) + 1)) - 1))
    out = "".join(c.upper() if bits >> i & 1 else c for i, c in enumerate(name))
    return out + "." if bits >> len(name) & 1 else out


def prop_covers_iff_label_suffix(data: st.DataObject) -> None:
    pres, dom = data.draw(small_name), data.draw(small_name)
    expected = pres == dom or pres.endswith("." + dom)
    assert name_covers_domain(disguise(data.draw, pres), disguise(data.draw, dom)) is expected


def prop_wildcard_matches_exactly_one_label(data: st.DataObject) -> None:
    base = data.draw(st.lists(small_label, min_size=1, max_size=3))
    extra = data.draw(st.lists(small_label, min_size=0, max_size=3))
    ref = ".".join(extra + base)
    ok = name_matches("*." + ".".join(base), disguise(data.draw, ref))
    assert ok is (len(extra) == 1 and len(base) >= 2)
    # And a wildcard covers a domain only if its base is at or under the domain.
    dom = data.draw(small_name)
    base_s = ".".join(base)
    assert name_covers_domain("*." + base_s, dom) is (
        len(base) >= 2 and (base_s == dom or base_s.endswith("." + dom)))


def prop_non_leftmost_wildcard_never_matches(data: st.DataObject) -> None:
    labels = data.draw(st.lists(small_label, min_size=1, max_size=4))
    idx = data.draw(st.integers(0, len(labels) - 1))
    pos = data.draw(st.integers(0, len(labels[idx])))
    star = labels[idx][:pos] + "*" + labels[idx][pos:]
    # (labels are never empty, so ``star`` is never the one legal form, a whole-label "*")
    presented = ".".join(labels[:idx] + [star] + labels[idx + 1:])
    # Any reference: the labels themselves, or with the star's label replaced by anything.
    filler = data.draw(small_label)
    reference = data.draw(st.sampled_from([
        ".".join(labels), ".".join(labels[:idx] + [filler] + labels[idx + 1:]),
        ".".join(labels[idx + 1:]) or "a",
    ]))
    assert not name_matches(presented, reference)
    assert not name_covers_domain(presented, reference)
    assert normalize_dns_name(presented) is None


def prop_case_and_trailing_dot_invariance(data: st.DataObject) -> None:
    a, b = data.draw(ldh_name), data.draw(ldh_name)
    wild = data.draw(st.booleans())
    pres = ("*." + b.split(".", 1)[-1]) if wild and "." in b else a
    base = name_matches(pres, b)
    assert name_matches(disguise(data.draw, pres) if not pres.startswith("*")
                        else "*." + disguise(data.draw, pres[2:]), disguise(data.draw, b)) is base
    assert name_matches(a, disguise(data.draw, a))
    assert normalize_dns_name(disguise(data.draw, a)) == a


def prop_idna_u_and_a_labels_equal(data: st.DataObject) -> None:
    ulabel = data.draw(unicode_label)
    uname = ulabel + ".example"
    aname = normalize_dns_name(uname)
    if aname is None:  # e.g. nameprep-prohibited characters: then it matches nothing
        assert not name_matches(uname, uname)
        return
    assert aname.isascii() and aname == aname.lower()
    assert normalize_dns_name(aname) == aname
    assert name_matches(uname, aname) and name_matches(aname, uname)
    assert name_covers_domain("mx." + uname, "example")
    assert not name_matches("*.example", aname) or not aname.startswith("xn--")


def prop_arbitrary_text_never_raises(data: st.DataObject) -> None:
    a, b = data.draw(st.text(max_size=40)), data.draw(st.text(max_size=40))
    n = normalize_dns_name(a)
    if n is not None:
        assert len(n) <= 253 and n == n.lower() and n.isascii() and normalize_dns_name(n) == n
        assert all(0 < len(label) <= 63 for label in n.split("."))
    assert isinstance(name_matches(a, b), bool)
    assert isinstance(name_covers_domain(a, b), bool)
    assert domain_listed(a, [b, "." + b]) in (None, normalize_dns_name(b), "." + str(normalize_dns_name(b)))
    d = address_domain(a)
    assert d is None or normalize_dns_name(d) == d
    if name_matches(a, b):
        assert not a.strip("*").count("*")  # a match never involves a stray '*'


def prop_domain_listed_semantics(data: st.DataObject) -> None:
    dom, entry = data.draw(small_name), data.draw(small_name)
    assert (domain_listed(disguise(data.draw, dom), [disguise(data.draw, entry)]) is not None) is (dom == entry)
    dotted = domain_listed(dom, ["." + disguise(data.draw, entry)])
    assert (dotted is not None) is dom.endswith("." + entry)


def prop_address_domain_roundtrip(data: st.DataObject) -> None:
    dom = data.draw(ldh_name)
    local = data.draw(st.one_of(
        st.from_regex(r"[A-Za-z0-9.+_-]{1,12}", fullmatch=True),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'),
                min_size=0, max_size=12).map(lambda s: '"%s"' % s),
    ))
    addr = "%s@%s" % (local, disguise(data.draw, dom))
    if data.draw(st.booleans()):
        addr = "<" + addr + ">"
    assert address_domain(addr) == dom


PROPERTIES: list[Callable[[st.DataObject], None]] = [
    prop_covers_iff_label_suffix,
    prop_wildcard_matches_exactly_one_label,
    prop_non_leftmost_wildcard_never_matches,
    prop_case_and_trailing_dot_invariance,
    prop_idna_u_and_a_labels_equal,
    prop_arbitrary_text_never_raises,
    prop_domain_listed_semantics,
    prop_address_domain_roundtrip,
]


def run_property(prop: Callable[[st.DataObject], None], examples: int) -> int:
    """Run one property for ``examples`` examples; returns how many were actually executed."""
    calls = [0]

    @settings(max_examples=examples, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(st.data())
    def inner(data: st.DataObject) -> None:
        calls[0] += 1
        prop(data)

    inner()
    return calls[0]


@pytest.mark.parametrize("prop", PROPERTIES, ids=lambda p: p.__name__)
def test_property(prop: Callable[[st.DataObject], None]) -> None:
    assert run_property(prop, EXAMPLES) >= 1


@pytest.mark.slow
def test_fuzz_budget_10k() -> None:
    """≥ 10,000 examples across all name properties, within 30 seconds."""
    per = math.ceil(10_000 / len(PROPERTIES))
    start = time.monotonic()
    total = sum(run_property(p, per) for p in PROPERTIES)
    elapsed = time.monotonic() - start
    assert total >= 10_000, total
    assert elapsed < 30, "fuzzing took %.1f s" % elapsed


def test_deviation_characters_name_nothing():
    # IDNA 2003 reads straße as strasse, IDNA 2008 as xn--strae-oqa: a certificate name with two
    # readings must match neither partner.
    assert not name_covers_domain("mail.straße.test", "strasse.test")
    assert not name_covers_domain("mail.strasse.test", "straße.test")
    assert not name_matches("straße.test", "strasse.test")
    assert normalize_dns_name("straße.test") is None and normalize_dns_name("xn--zca.de") == "xn--zca.de"
