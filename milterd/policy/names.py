"""DNS name matching for Domain Security (RFC 9525 / RFC 6125), pure functions, no I/O.

Why this module exists: every Domain Security decision ends in "is this certificate name
good for this partner domain?".  Getting that wrong in the permissive direction lets a
stranger's certificate vouch for a partner, so every function here fails *closed*: anything
that is not clearly a valid DNS name never matches anything.

Rules implemented
-----------------
* Comparison is on the lower-case A-label form; one trailing dot is ignored.
* U-labels (Unicode) are converted with the standard library's ``encodings.idna``
  (IDNA 2003 ToASCII with nameprep).  A-labels (``xn--``) are kept as they are after a
  punycode round-trip check, so IDNA 2008 A-labels found in certificates (which carry
  A-labels, dNSName being an IA5String) compare exactly.  A *U-label* with an IDNA 2003/2008
  deviation character (``ß``, ``ẞ``, ``ς``) is refused: IDNA 2003 maps ``straße`` to ``strasse``,
  IDNA 2008 to ``xn--strae-oqa``, and a name with two readings names nothing (a certificate for
  one must never match the other; :mod:`milterd.policy.coverage` takes both readings of an address).
  Invisible characters (soft hyphen, zero-width joiners), controls and spaces are refused, never
  mapped away.
* Labels must be LDH (letters, digits, hyphen; no leading/trailing hyphen), 1..63 octets,
  the whole name at most 253 octets, and the last label must not be all-numeric (so an IPv4
  literal is never taken for a DNS name).
* A wildcard is accepted only as the complete left-most label of a presented identifier
  (``*.example.com``), matches exactly one label, never matches an A-label
  (RFC 6125 §6.4.3), and its base must have at least two labels (``*.com``, ``*.test`` never
  match).  There is no public-suffix list: ``*.co.uk`` *would* match ``x.co.uk``; a CA must
  not issue that, and Domain Security additionally requires the base to be under the
  partner domain.

Receive/send list semantics (``domain_listed``): a plain entry covers exactly that domain;
an entry with a leading dot (``.contoso.test``) covers every subdomain *but not*
``contoso.test`` itself (Exchange semantics); list both to cover both.

Tests: ``tests/test_names.py`` checks these rules with hypothesis properties; set
``MILTERD_FUZZ_EXAMPLES`` (default 150 per property) to fuzz deeper.
"""

from __future__ import annotations

import encodings.idna as _stdlib_idna
import functools
import re
import unicodedata
from typing import Iterable

__all__ = [
    "normalize_dns_name",
    "name_matches",
    "name_covers_domain",
    "domain_listed",
    "address_domain",
]

_MAX_NAME = 253
_MAX_LABEL = 63
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
# The label separators IDNA recognises (full stop, ideographic / full-width / half-width stops).
_DOTS = re.compile("[.\u3002\uff0e\uff61]")
_DEVIATIONS = frozenset("\u00df\u1e9e\u03c2")  # ß ẞ ς: IDNA 2003 and 2008 disagree


def _valid_a_label(label: str) -> bool:
    """An ``xn--`` label is valid if its punycode decodes to non-ASCII text and round-trips.

    Why: a bogus A-label (``xn--abc-``) must not be compared as if it named something.
    """
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
        if decoded.isascii() or not decoded:
            return False
        if any(unicodedata.category(c)[0] in "CZ" for c in decoded):
            return False  # controls, format characters, unassigned, spaces: not a name
        return decoded.encode("punycode").decode("ascii").lower() == label[4:]
    except (UnicodeError, ValueError):
        return False


def _to_a_label(label: str) -> str | None:
    """One label to its lower-case A-label form, or None if it is not a valid LDH label."""
    if not label:
        return None
    if not label.isascii():
        # Controls, invisible format characters (soft hyphen, zero-width joiners), spaces and
        # unassigned code points are refused rather than IDNA-mapped to nothing: an invisible
        # character must never make two different-looking names compare equal.
        if any(unicodedata.category(c)[0] in "CZ" or c in _DEVIATIONS for c in label):
            return None
        try:
            label = _stdlib_idna.ToASCII(label).decode("ascii")
        except (UnicodeError, ValueError):
            return None
    label = label.lower()
    if len(label) > _MAX_LABEL or not _LDH_LABEL.match(label):
        return None
    if label.startswith("xn--") and not _valid_a_label(label):
        return None
    return label


def _labels(name: str) -> list[str] | None:
    """Split and normalise a name (no wildcards) into A-labels, or None if invalid."""
    if not isinstance(name, str) or not name:
        return None
    parts = _DOTS.split(name)
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # exactly one trailing dot is allowed
    out: list[str] = []
    for part in parts:
        label = _to_a_label(part)
        if label is None:
            return None
        out.append(label)
    if not out or len(".".join(out)) > _MAX_NAME or out[-1].isdigit():
        return None
    return out


@functools.lru_cache(maxsize=8192)  # pure; on the per-message path (bounded cache)
def normalize_dns_name(name: str) -> str | None:
    """Lower-case A-label form of ``name`` without its trailing dot, or None if not a DNS name."""
    labels = _labels(name)
    return ".".join(labels) if labels is not None else None


def _wildcard_base(presented: str) -> list[str] | None:
    """Labels of the base of a ``*.base`` identifier, or None if it is not a usable wildcard."""
    if not isinstance(presented, str) or not presented.startswith("*."):
        return None
    base = _labels(presented[2:])
    if base is None or len(base) < 2:
        return None
    return base


def name_matches(presented: str, reference: str) -> bool:
    """Does a presented identifier (from a certificate) match a reference host name?

    Why the restrictions: RFC 9525 §6.3 — wildcard only as the whole left-most label and
    for exactly one label; RFC 6125 §6.4.3 — no wildcard match into an A-label.
    """
    ref = _labels(reference)
    if ref is None:
        return False
    if isinstance(presented, str) and presented.startswith("*"):
        base = _wildcard_base(presented)
        if base is None or len(ref) != len(base) + 1:
            return False
        return ref[1:] == base and not ref[0].startswith("xn--")
    pres = _labels(presented)
    return pres is not None and pres == ref


def _under(labels: list[str], domain: list[str]) -> bool:
    """True if ``labels`` equals ``domain`` or is a name below it (label-wise suffix)."""
    return len(labels) >= len(domain) and labels[len(labels) - len(domain):] == domain


@functools.lru_cache(maxsize=4096)  # pure; the same certificate name per connection (bounded)
def name_covers_domain(presented: str, domain: str) -> bool:
    """Domain Security: is the presented name the partner ``domain`` or a host under it?

    Label-wise comparison, so ``evilwoodgrovebank.test`` never covers ``woodgrovebank.test``.
    A wildcard covers the domain only if its base is the domain or under it (``*.test``
    never covers ``woodgrovebank.test``: the certificate holder was not vetted for it).
    """
    dom = _labels(domain)
    if dom is None:
        return False
    if isinstance(presented, str) and presented.startswith("*"):
        base = _wildcard_base(presented)
        return base is not None and _under(base, dom)
    pres = _labels(presented)
    return pres is not None and _under(pres, dom)


@functools.lru_cache(maxsize=4096)  # pure; the same certificate name per connection (bounded)
def reference_matches(presented: str, reference: str) -> bool:
    """A partner's configured ``certificate_names`` entry: ``mx.hoster.test`` is matched by the
    presented identifier per RFC 9525 (:func:`name_matches`: exact, or a ``*.hoster.test``
    wildcard); ``.hoster.test`` by any name strictly under ``hoster.test`` (a wildcard whose
    base is ``hoster.test`` or under it), never by ``hoster.test`` itself — the list semantics."""
    if not isinstance(reference, str):
        return False
    if not reference.startswith("."):
        return name_matches(presented, reference)
    parent = _labels(reference[1:])
    if parent is None:
        return False
    if isinstance(presented, str) and presented.startswith("*"):
        base = _wildcard_base(presented)
        return base is not None and _under(base, parent)
    pres = _labels(presented)
    return pres is not None and len(pres) > len(parent) and _under(pres, parent)


def domain_listed(domain: str, entries: Iterable[str]) -> str | None:
    """The receive/send list entry (normalised) covering ``domain``, or None.

    A plain entry matches exactly; ``.parent`` matches strict subdomains only (not the parent
    itself).  An exact entry wins over dot entries; among dot entries the most specific wins,
    so the answer does not depend on list order.  Invalid entries are ignored.
    """
    if isinstance(domain, str) and isinstance(entries, tuple):
        return _domain_listed_cached(domain, entries)  # config lists are tuples
    return _domain_listed(domain, entries)


@functools.lru_cache(maxsize=8192)  # pure; per message and per recipient domain (bounded)
def _domain_listed_cached(domain: str, entries: tuple) -> str | None:
    return _domain_listed(domain, entries)


def _domain_listed(domain: str, entries: Iterable[str]) -> str | None:
    dom = _labels(domain)
    if dom is None:
        return None
    best: list[str] | None = None
    for entry in entries:
        if not isinstance(entry, str):
            continue
        if entry.startswith("."):
            base = _labels(entry[1:])
            if base is None or len(dom) <= len(base) or not _under(dom, base):
                continue
            if best is None or len(base) > len(best):
                best = base
        elif _labels(entry) == dom:
            return ".".join(dom)
    return "." + ".".join(best) if best is not None else None


def _split_local(addr: str) -> str | None:
    """Return the part after the local-part's ``@``, honouring a quoted local part."""
    if addr.startswith('"'):
        i = 1
        while i < len(addr):
            c = addr[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                rest = addr[i + 1:]
                return rest[1:] if rest.startswith("@") else None
            i += 1
        return None  # unterminated quote
    if addr.count("@") != 1 or '"' in addr:
        return None
    local, _, dom = addr.partition("@")
    return dom if local else None


@functools.lru_cache(maxsize=8192)  # pure; on the per-message path (bounded cache)
def address_domain(addr: str) -> str | None:
    """Normalised domain of an SMTP envelope address, or None (null sender, no domain, literal).

    Handles ``<…>``, an RFC 5321 source route (``<@relay:user@dom>``), quoted local parts that
    contain ``@`` and a trailing dot.  Address literals (``[192.0.2.1]``) are not DNS domains.
    """
    if not isinstance(addr, str):
        return None
    a = addr.strip()
    if a.startswith("<"):
        if not a.endswith(">"):
            return None
        a = a[1:-1].strip()
    if a.startswith("@"):  # source route: @a,@b:user@domain
        colon = a.find(":")
        if colon < 0:
            return None
        a = a[colon + 1:]
    if not a:
        return None
    dom = _split_local(a)
    if not dom or dom.startswith("["):
        return None
    return normalize_dns_name(dom)
