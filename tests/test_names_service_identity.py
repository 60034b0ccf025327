"""certificate_names decisions checked against the real thing: service_identity.

milterd decides "does this certificate name satisfy a partner's ``certificate_names`` entry?" with
:func:`milterd.policy.names.reference_matches`.  The oracle here is service_identity
(``service_identity.cryptography.verify_certificate_hostname``) on a real X.509 certificate, built
with cryptography, whose only dNSName is the presented identifier.  Presented identifiers and
reference names are generated (hypothesis): LDH labels in mixed case, trailing dots, wildcards in
every position (``*.x.test``, ``f*.x.test``, ``*.*.test``, ``*.test``, ``**``), A-labels (valid and
bogus ``xn--``), U-labels (IDN, deviation characters, invisible characters, full-width forms) and
junk (underscores, hyphens at label ends, over-long labels, numeric last labels, whitespace).

Properties
----------
* Safety — for a plain reference accepted by :func:`milterd.core.partners.reference_identity`:
  whenever milterd accepts, service_identity accepts too.  milterd never accepts a name the
  reference implementation refuses.
* Agreement — where they differ (service_identity accepts, milterd refuses), the difference is
  one of milterd's documented, deliberate refusals (:func:`deliberate_refusal`, one comment per
  item); any other difference fails.  Every listed refusal is checked to be a real milterd
  refusal as well (a listed reason with a milterd acceptance fails).
* Leading-dot references — ``reference_matches(p, ".parent")`` is True exactly when
  service_identity accepts ``p`` for some host strictly under ``parent`` (up to the same list of
  deliberate refusals).  The hosts tried are generated hosts under ``parent`` plus the one host
  ``p`` can name there (``p`` itself, or ``w0.<base>`` for a wildcard ``*.<base>``: a dNSName
  matches its own name or, as a wildcard, any one non-``xn--`` label on its base, so this witness
  decides the "some host" question).  ``parent`` itself never matches.

How the oracle is fed (the only adaptations, each deliberate)
--------------------------------------------------------------
* A dNSName is an IA5String: no certificate carries a U-label (cryptography refuses to build one).
  A presented U-label name goes into the certificate as the A-labels a CA would write, converted
  with the standard library's ``idna`` codec (IDNA 2003; service_identity's own converter, the
  ``idna`` package, is not installed here and service_identity refuses non-ASCII host names
  without it).  ASCII names go in as written (case, junk and all).  As milterd converts U-labels
  with the same IDNA 2003 rules, this file checks matching, not that conversion (that milterd
  refuses what the two IDNA versions read differently is item one of the refusal list).
* The reference host name is given to service_identity as configured (ASCII, any case) or, for a
  U-label reference, as the A-label form ``reference_identity`` stores.
* One trailing dot is removed from the dNSName and from the host name before service_identity
  sees them.  RFC 1034 makes ``mx.example.`` and ``mx.example`` the same name and milterd ignores
  one trailing dot (milterd/policy/names.py); service_identity compares bytes, so it refuses
  dNSName ``mx.example.`` for host ``mx.example`` — the one case where milterd accepts and
  service_identity refuses (pinned in ``test_trailing_dot_is_the_one_oracle_adaptation``).

Example counts: ``MILTERD_FUZZ_EXAMPLES`` per property (default 3000 here, a few seconds each);
CI (``CI`` set) replays the same examples every run (derandomize).  Run with
``--hypothesis-show-statistics`` to see which kinds of names were generated and which refusal
reasons fired.
"""

from __future__ import annotations

import datetime
import encodings.idna as stdlib_idna
import functools
import os
import re
import unicodedata

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, assume, event, given, settings, strategies as st
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname

from milterd.core.partners import reference_identity
from milterd.policy.names import normalize_dns_name, reference_matches

EXAMPLES = int(os.environ.get("MILTERD_FUZZ_EXAMPLES", "3000"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    derandomize=bool(os.environ.get("CI")),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


# -- the oracle: service_identity on a real certificate ------------------------------------------

_KEY = ec.generate_private_key(ec.SECP256R1())  # one key for every certificate: only names matter
_SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "milterd name oracle")])


def _without_root_dot(name: str) -> str:
    """Drop one trailing dot (RFC 1034: ``a.example.`` and ``a.example`` are the same name)."""
    return name[:-1] if name.endswith(".") else name


def certificate_name(presented: str) -> str | None:
    """The dNSName a certificate carries for ``presented``: ASCII as written; a name with U-labels
    as IDNA 2003 A-labels (stdlib codec); None if no certificate can carry it."""
    if presented.isascii():
        return presented
    try:
        return presented.encode("idna").decode("ascii")
    except UnicodeError:
        return None


@functools.lru_cache(maxsize=1 << 14)  # about 0.1 ms per certificate; names repeat a lot
def _certificate(dns_name: str) -> x509.Certificate | None:
    """Self-signed certificate whose only subjectAltName is ``dns_name`` (None: cannot be built)."""
    try:
        san = x509.SubjectAlternativeName([x509.DNSName(dns_name)])
        return (x509.CertificateBuilder()
                .subject_name(_SUBJECT).issuer_name(_SUBJECT).public_key(_KEY.public_key())
                .serial_number(1)
                .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc))
                .not_valid_after(datetime.datetime(2040, 1, 1, tzinfo=datetime.timezone.utc))
                .add_extension(san, critical=False)
                .sign(_KEY, hashes.SHA256()))
    except ValueError:
        return None


@functools.lru_cache(maxsize=1 << 16)
def si_accepts(presented: str, hostname: str) -> bool:
    """Does service_identity accept a certificate whose only dNSName is ``presented`` for
    ``hostname`` (ASCII)?  Invalid certificate content or host name: refused."""
    dns_name = certificate_name(presented)
    if dns_name is None:
        return False
    cert = _certificate(_without_root_dot(dns_name))
    if cert is None:
        return False
    try:
        verify_certificate_hostname(cert, _without_root_dot(hostname))
    except (VerificationError, CertificateError, ValueError):
        return False
    return True


# -- milterd's documented, deliberate refusals ---------------------------------------------------

_DEVIATIONS = "\u00df\u1e9e\u03c2"  # ß ẞ ς
_LDH_OR_STAR = re.compile(r"[A-Za-z0-9.*-]*\Z")


def _valid_a_label(label: str) -> bool:
    """``xn--`` + punycode of non-ASCII text without controls/spaces, and round-tripping."""
    try:
        text = label[4:].encode("ascii").decode("punycode")
        return (bool(text) and not text.isascii()
                and not any(unicodedata.category(c)[0] in "CZ" for c in text)
                and text.encode("punycode").decode("ascii") == label[4:])
    except (UnicodeError, ValueError):
        return False


def deliberate_refusal(presented: str) -> str | None:
    """Why milterd refuses a presented identifier that service_identity may accept, or None.

    Each item is a rule milterd documents (milterd/policy/names.py) that service_identity does not
    apply.  Checked on the presented identifier as written and on the dNSName a certificate
    carries for it (the oracle's view).  Not listed because service_identity refuses them itself
    (verified by the properties and pinned in ``test_service_identity_refuses_these_too``):
    wildcard bases with fewer than two labels (``*.test``: "too few host components"), a
    wildcard into an A-label (``*.x.test`` for ``xn--…x.test``), partial-label and non-left-most
    wildcards (``f*.x.test``, ``a.*.x.test``), two wildcards (``*.*.x.test``), empty labels in a
    wildcard pattern.
    """
    # IDNA 2003/2008 deviation characters: IDNA 2003 (the certificate's conversion here) reads
    # straße as strasse, IDNA 2008 as xn--strae-oqa; a name with two readings names nothing.
    if any(c in _DEVIATIONS for c in presented):
        return "deviation character (ß ẞ ς)"
    # Invisible characters (soft hyphen, zero-width joiners, ideographic space, controls): IDNA
    # 2003 maps them away or to a space; milterd refuses rather than letting an invisible
    # character make two different-looking names equal.
    if any(not c.isascii() and unicodedata.category(c)[0] in "CZ" for c in presented):
        return "invisible/space/control character in a U-label"
    dns_name = certificate_name(presented)
    if dns_name is None:
        return None  # no certificate can carry it: service_identity cannot accept it either
    # A wildcard spelled with a compatibility character (＊ U+FF0A, ﹡ U+FE61) that IDNA maps to
    # '*': only an ASCII '*' written as the whole left-most label is a wildcard for milterd.
    if "*" in dns_name and "*" not in presented:
        return "wildcard only after IDNA mapping"
    name = _without_root_dot(dns_name)
    # Surrounding whitespace: service_identity strips it (bytes.strip) from the dNSName; a name
    # with a space or tab in it names nothing for milterd.
    if name.encode("ascii").strip() != name.encode("ascii"):
        return "surrounding whitespace"
    labels = name.split(".")
    # Characters outside LDH (underscore, '/', '@', controls, ...): service_identity does not
    # check a dNSName's characters, milterd requires letters, digits and hyphens.
    if not _LDH_OR_STAR.match(name):
        return "non-LDH character"
    # An empty label (a..b.test, .b.test): not a DNS name; service_identity checks for empty
    # labels only in wildcard patterns and compares other dNSNames and host names as bytes.
    if "" in labels:
        return "empty label"
    # A label starting or ending with a hyphen: not LDH (RFC 952/1123); service_identity does
    # not check label syntax.
    if any(label.startswith("-") or label.endswith("-") for label in labels):
        return "hyphen at a label end"
    # Over-long: a label over 63 or a name over 253 octets is not a DNS name; service_identity
    # has no length limits.
    if any(len(label) > 63 for label in labels) or len(name) > 253:
        return "label or name too long"
    # All-numeric last label (so an IPv4 literal such as 10.0.0.1 is never a DNS name);
    # service_identity refuses only names that parse as an IP address as a whole.
    if labels[-1].isdigit():
        return "all-numeric last label"
    # A bogus A-label (xn--abc-, xn--a, xn--): milterd requires a valid punycode round trip to
    # non-ASCII text; service_identity compares the bytes.
    if any(label.lower().startswith("xn--") and not _valid_a_label(label.lower())
           for label in labels):
        return "bogus A-label"
    return None


# -- generated names -----------------------------------------------------------------------------

LDH_LABELS = ["a", "b", "ab", "mx", "Mx1", "a-b", "0", "9z", "ab--cd", "hoster", "test", "strasse", "ss",
              "x" * 63]
A_LABELS = ["xn--bcher-kva", "XN--Bcher-KVA", "xn--mnchen-3ya", "xn--zca", "xn--strae-oqa",
            "xn--n3h", "xn--cfa", "xn--i-9bb"]
U_LABELS = ["bücher", "BÜCHER", "münchen", "☃", "ı", "İ", "ｍｘ", "ｘｎ－－ｂｃｈｅｒ－ｋｖａ", "σίσυφοσ"]
DEVIANT_LABELS = ["straße", "STRAẞE", "σίσυφος", "ß"]
ODD_LABELS = ["a_b", "-a", "a-", "123", "x" * 64, "xn--abc-", "xn--a", "xn--", "ex\u00adample",
              "bü\u200dcher", "a\u3000b", "＊", "﹡", "*", "**", "f*", "*f", "f*o", "", " a", "a\t",
              "a/b", "a@b"]
_LDH = "abcdefghijklmnopqrstuvwxyz0123456789-"

ldh_label = st.text(_LDH, min_size=1, max_size=8).map(
    lambda s: "x" + s.replace("-", "") + "y" if s[0] == "-" or s[-1] == "-" or s[2:4] == "--" else s)
unicode_label = st.text(st.characters(min_codepoint=0xC0, max_codepoint=0x24F, categories=("Ll", "Lu")),
                        min_size=1, max_size=5)
clean_label = st.one_of(st.sampled_from(LDH_LABELS), st.sampled_from(A_LABELS),
                        st.sampled_from(U_LABELS), ldh_label, unicode_label)
any_label = st.one_of(clean_label, st.sampled_from(DEVIANT_LABELS), st.sampled_from(ODD_LABELS))
# Hosts under a parent: labels that make a valid host name.
host_label = st.one_of(st.sampled_from(LDH_LABELS[:-1]), st.sampled_from(A_LABELS), ldh_label)


def disguise(draw: st.DrawFn, name: str) -> str:
    """Same name to milterd: random case (one bit per character) and an optional trailing dot."""
    bits = draw(st.integers(0, (1 << (len(name) + 1)) - 1))
    out = "".join(c.upper() if bits >> i & 1 and c.isascii() else c for i, c in enumerate(name))
    return out + "." if bits >> len(name) & 1 else out


def _other_form(label: str) -> str:
    """The label's U-label form if it is an A-label, its A-label form if a U-label (else itself)."""
    try:
        if label.isascii():
            return stdlib_idna.ToUnicode(label) if label.lower().startswith("xn--") else label
        return stdlib_idna.ToASCII(label).decode("ascii")
    except (UnicodeError, ValueError):
        return label


_INVISIBLE = ["\u00ad", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"]  # IDNA 2003 maps to nothing


def _idna_spelling(draw: st.DrawFn, label: str) -> str:
    """Another spelling IDNA 2003 maps to the same A-label (or, for ß/ς, reads differently from
    IDNA 2008): full-width letters, an invisible character, a deviation character."""
    how = draw(st.sampled_from(["full-width", "invisible", "deviation"]))
    if how == "full-width":
        return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in label)
    if how == "invisible":
        i = draw(st.integers(0, len(label)))
        return label[:i] + draw(st.sampled_from(_INVISIBLE)) + label[i:]
    if "ss" in label:
        return label.replace("ss", draw(st.sampled_from(["\u00df", "\u1e9e"])), 1)
    if label.endswith("\u03c3"):
        return label[:-1] + "\u03c2"
    return label + "\u00df"


def _star_into(draw: st.DrawFn, label: str) -> str:
    i = draw(st.integers(0, len(label)))
    j = draw(st.integers(i, len(label)))
    return label[:i] + "*" + label[j:]


@st.composite
def presented_from(draw: st.DrawFn, labels: list[str]) -> str:
    """A presented identifier derived from a name's labels: the same name in another spelling,
    wildcards in every position, a label more or less, a changed label, junk, or something else."""
    kind = draw(st.sampled_from([
        "same", "same", "same", "wildcard", "wildcard", "wildcard-up", "wildcard-down",
        "partial-wildcard", "inner-wildcard", "two-wildcards", "other-label", "extra-label",
        "drop-label", "unrelated", "idna-spelling", "noise"]))
    event(f"presented: {kind}")
    out = [(_other_form(lb) if draw(st.booleans()) else lb) for lb in labels]
    if kind == "wildcard":
        out = ["*"] + out[1:]
    elif kind == "wildcard-up":            # one label too many covered: "*.test" from "mx.test"
        out = ["*"] + out[2:]
    elif kind == "wildcard-down":          # wildcard one level below the name
        out = ["*"] + out
    elif kind == "partial-wildcard":       # f*.x.test, *f.x.test, f*o.x.test, also "*" itself
        out = [_star_into(draw, out[0])] + out[1:]
    elif kind == "inner-wildcard":         # a.*.x.test, a.f*.test, ...
        k = draw(st.integers(0, len(out) - 1))
        out[k] = draw(st.sampled_from(["*", _star_into(draw, out[k])]))
    elif kind == "two-wildcards":          # *.*.test, **.x.test, *.f*.test
        out = draw(st.sampled_from([["*", "*"] + out[2:], ["**"] + out[1:],
                                    ["*", _star_into(draw, out[-1])] if len(out) > 1 else ["*", "*"]]))
    elif kind == "other-label":
        k = draw(st.integers(0, len(out) - 1))
        out[k] = draw(any_label)
    elif kind == "extra-label":
        out = [draw(any_label)] + out
    elif kind == "drop-label":
        out = out[1:] or out
    elif kind == "unrelated":
        out = draw(st.lists(any_label, min_size=1, max_size=4))
    elif kind == "idna-spelling":          # ｍｘ, ex\u00adample, straße for strasse, ...
        k = draw(st.integers(0, len(out) - 1))
        out[k] = _idna_spelling(draw, out[k])
    name = disguise(draw, ".".join(out))
    if kind == "noise":
        name = draw(st.sampled_from([
            " " + name, name + " ", "\t" + name, name + "..", name.replace(".", "..", 1),
            "＊." + name, "﹡." + name, name.replace(".", "。", 1), name + "\x00", "*" + name]))
    return name


@st.composite
def plain_case(draw: st.DrawFn) -> tuple[str, str, str]:
    """(presented, reference as configured, reference as stored by reference_identity)."""
    labels = draw(st.lists(clean_label, min_size=2, max_size=4))
    raw = disguise(draw, ".".join(labels))
    stored = reference_identity(raw)
    assume(stored is not None)
    return draw(presented_from(labels)), raw, stored


@st.composite
def dotted_case(draw: st.DrawFn) -> tuple[str, str, str, list[str]]:
    """(presented, ".parent" as configured, parent as stored, generated hosts under parent)."""
    parent = draw(st.lists(clean_label, min_size=2, max_size=3))
    raw = "." + disguise(draw, ".".join(parent))
    stored = reference_identity(raw)
    assume(stored is not None)
    prefix = draw(st.lists(host_label, min_size=0, max_size=2))
    presented = draw(presented_from(prefix + parent))
    hosts = [".".join(draw(st.lists(host_label, min_size=1, max_size=2))) + stored
             for _ in range(draw(st.integers(1, 3)))]
    return presented, raw, stored[1:], hosts


def _si_hostname(raw: str, stored: str) -> str:
    """The host name service_identity is asked about: as configured if ASCII, else stored form."""
    return raw if raw.isascii() else stored


def _witness(presented: str) -> str | None:
    """The host a certificate for ``presented`` names (``w0.<base>`` for ``*.<base>``)."""
    dns_name = certificate_name(presented)
    if dns_name is None:
        return None
    host = _without_root_dot(dns_name).strip().lower()
    return "w0" + host[1:] if host.startswith("*.") else host


# -- properties ----------------------------------------------------------------------------------


@SETTINGS
@given(plain_case())
def test_plain_reference_safety(case: tuple[str, str, str]) -> None:
    """milterd accepts ⇒ service_identity accepts (never the other way round)."""
    presented, raw, stored = case
    milterd = reference_matches(presented, raw)
    assert milterd is reference_matches(presented, stored)  # configured and stored forms agree
    event(f"milterd accepts: {milterd}")
    if milterd:
        assert si_accepts(presented, _si_hostname(raw, stored)), (
            f"milterd accepts {presented!r} for {raw!r} (stored {stored!r}); service_identity refuses "
            f"dNSName {certificate_name(presented)!r}")


@SETTINGS
@given(plain_case())
def test_plain_reference_agreement(case: tuple[str, str, str]) -> None:
    """service_identity accepts, milterd refuses ⇒ a documented deliberate refusal; and every
    documented refusal is one (milterd never accepts a name the list says it refuses)."""
    presented, raw, stored = case
    milterd = reference_matches(presented, raw)
    oracle = si_accepts(presented, _si_hostname(raw, stored))
    reason = deliberate_refusal(presented)
    if reason is not None:
        event(f"deliberate refusal: {reason}")
        assert not milterd, f"{presented!r} listed as refused ({reason}) but accepted for {raw!r}"
    if oracle and not milterd:
        event(f"difference: {reason}")
        assert reason is not None, (
            f"service_identity accepts dNSName {certificate_name(presented)!r} for {raw!r}, "
            f"milterd refuses presented {presented!r} for no documented reason")


@SETTINGS
@given(dotted_case())
def test_leading_dot_reference(case: tuple[str, str, str, list[str]]) -> None:
    """``.parent``: milterd accepts ⇔ service_identity accepts for some host strictly under
    parent (differences only as documented); parent itself never matches."""
    presented, raw, parent, hosts = case
    milterd = reference_matches(presented, raw)
    assert milterd is reference_matches(presented, "." + parent)
    event(f"milterd accepts: {milterd}")
    witness = _witness(presented)
    if witness is not None and witness.endswith("." + parent):
        hosts = hosts + [witness]
    assert all(h.endswith("." + parent) and h != parent for h in hosts)
    accepted_for = [h for h in hosts if si_accepts(presented, h)]
    if milterd:
        assert accepted_for, (
            f"milterd accepts {presented!r} for {raw!r}; service_identity accepts dNSName "
            f"{certificate_name(presented)!r} for no host under {parent!r} (tried {hosts})")
    reason = deliberate_refusal(presented)
    if reason is not None:
        event(f"deliberate refusal: {reason}")
        assert not milterd, f"{presented!r} listed as refused ({reason}) but accepted for {raw!r}"
    if accepted_for and not milterd:
        event(f"difference: {reason}")
        assert reason is not None, (
            f"service_identity accepts dNSName {certificate_name(presented)!r} for "
            f"{accepted_for[0]!r} under {parent!r}, milterd refuses {presented!r} for {raw!r}")
    # The parent itself is never "strictly under" the parent, however it is spelled.
    if normalize_dns_name(presented) == parent:
        assert not milterd
    for spelling in (parent, parent.upper() + ".", _other_form_name(parent), raw[1:]):
        assert not reference_matches(spelling, raw), spelling


def _other_form_name(name: str) -> str:
    return ".".join(_other_form(label) for label in name.split("."))


# -- the oracle's behaviour the properties rely on, pinned ---------------------------------------


def test_trailing_dot_is_the_one_oracle_adaptation() -> None:
    # service_identity compares bytes: dNSName "mx.hoster.test." does not match host
    # "mx.hoster.test" (nor the reverse); milterd ignores one trailing dot (RFC 1034: same name).
    # The properties remove one trailing dot before asking service_identity.
    assert _certificate("mx.hoster.test.") is not None
    with pytest.raises(VerificationError):
        verify_certificate_hostname(_certificate("mx.hoster.test."), "mx.hoster.test")
    with pytest.raises(VerificationError):
        verify_certificate_hostname(_certificate("mx.hoster.test"), "mx.hoster.test.")
    assert reference_matches("mx.hoster.test.", "mx.hoster.test")
    assert si_accepts("mx.hoster.test.", "mx.hoster.test")  # the adapted oracle


def test_no_certificate_carries_a_u_label() -> None:
    with pytest.raises(ValueError):
        x509.DNSName("bücher.example")
    assert certificate_name("mx.bücher.example") == "mx.xn--bcher-kva.example"
    assert si_accepts("mx.bücher.example", "mx.xn--bcher-kva.example")
    assert reference_matches("mx.bücher.example", "mx.xn--bcher-kva.example")


@pytest.mark.parametrize("presented, hostname", [
    ("*.test", "hoster.test"),                   # too few host components for a wildcard
    ("*.hoster.test", "xn--bcher-kva.hoster.test"),  # no wildcard into an A-label
    ("f*.hoster.test", "fo.hoster.test"),         # partial-label wildcards match nothing
    ("*f.hoster.test", "xf.hoster.test"),
    ("mx.*.test", "mx.hoster.test"),              # wildcard outside the left-most label
    ("*.*.test", "mx.hoster.test"),               # too many wildcards
    ("*..hoster.test", "mx.hoster.test"),         # empty label
    ("*.hoster.test", "a.mx.hoster.test"),        # one label only
    ("*.hoster.test", "hoster.test"),
])
def test_service_identity_refuses_these_too(presented: str, hostname: str) -> None:
    assert not si_accepts(presented, hostname)
    assert not reference_matches(presented, hostname)


@pytest.mark.parametrize("presented, hostname, reason", [
    ("straße.test", "strasse.test", "deviation character (ß ẞ ς)"),
    ("mx.σίσυφος.test", "mx.xn--kxa6akbbkh.test", "deviation character (ß ẞ ς)"),
    ("ex\u00adample.test", "example.test", "invisible/space/control character in a U-label"),
    ("bü\u200dcher.test", "xn--bcher-kva.test", "invisible/space/control character in a U-label"),
    ("＊.hoster.test", "mx.hoster.test", "wildcard only after IDNA mapping"),
    (" mx.hoster.test", "mx.hoster.test", "surrounding whitespace"),
    ("mx.hoster.test\t", "mx.hoster.test", "surrounding whitespace"),
    ("a_b.hoster.test", "a_b.hoster.test", "non-LDH character"),
    ("*.a_b.test", "mx.a_b.test", "non-LDH character"),
    ("-mx.hoster.test", "-mx.hoster.test", "hyphen at a label end"),
    ("x" * 64 + ".test", "x" * 64 + ".test", "label or name too long"),
    ("mx.hoster.123", "mx.hoster.123", "all-numeric last label"),
    ("xn--a.hoster.test", "xn--a.hoster.test", "bogus A-label"),
    ("XN--ABCD.hoster.test", "xn--abcd.hoster.test", "bogus A-label"),
    ("mx..hoster.test", "mx..hoster.test", "empty label"),
])
def test_each_deliberate_refusal_is_real(presented: str, hostname: str, reason: str) -> None:
    """Every item on the list: service_identity accepts, milterd refuses, the list names why."""
    assert si_accepts(presented, hostname)
    assert not reference_matches(presented, hostname)
    assert not reference_matches(presented, "." + hostname.split(".", 1)[1])
    assert deliberate_refusal(presented) == reason
