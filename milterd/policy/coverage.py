"""Coverage: does a message claim to come from a partner?  Every plausible reading, fail closed.

A message is *covered* when any plausible reading of its envelope sender or of any ``From:`` field
names a domain on ``receive_domains``.  milterd's own reading must never be the one that decides:
the MTA stores its own form of the envelope sender (Postfix's tok822 rewriting, Sendmail's
rulesets), mail clients show their own reading of ``From:``, and the interpreter's
``email.utils.getaddresses`` is strict on some Pythons (CVE-2023-27043 backports, Debian) and
lenient on others.  So no parser is used at all: a value is *scanned* for every domain-shaped token
in a routing position, under several spellings of the value, and the union is checked against the
list.  A reading that finds more than any parser can only cover more (doubt means covered).

Routing positions (what any reader or MTA may take as "the domain"):

* the token after any ``@`` (the last ``@`` is Postfix's and RFC 5321's domain, an earlier one is a
  quoted local part or a source route, a display name holding an address is what a reader sees);
* the token after any ``%`` (percent hack: ``user%partner@relay``, ``user%partner``);
* the token before any ``!`` (bang path: ``partner!user``, Postfix's ``swap_bangpath``).

Spellings scanned (each only when it can differ from the raw text):

1. the value as given;
2. the MTA's stored form: RFC 5322 comments removed (nested; an unclosed comment runs to the
   end), quotes and backslashes removed, no whitespace around ``.`` and ``@`` (obs-domain allows
   CFWS between labels and around ``@``);
3. what a reader is shown: RFC 2047 encoded words decoded;
4. what a reader cannot see: Unicode format (Cf), control (Cc) and other default-ignorable
   characters removed, compatibility forms folded (NFKC).

A token yields its DNS name (IDNA 2003, :func:`milterd.policy.names.normalize_dns_name`), the same with a
trailing junk character cut off, and for internationalised names the IDNA 2008 reading too, so
``ß`` matches a list entry written either way.

Pure functions; memoised for short values (the per-message hot path, see ``bench/``).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from email.header import decode_header

from milterd.policy.names import domain_listed, normalize_dns_name

__all__ = ["value_domains", "envelope_covered", "from_covered", "covered_entries",
           "is_from_field"]

# Characters that end a token: structure in addresses and headers, whitespace.
_DELIMS = r"\s@%!<>()\[\]\",;:\\"
_AFTER = re.compile(rf"[@%][\s\[]*([^{_DELIMS}]+)")
_BEFORE = re.compile(rf"([^{_DELIMS}]+)!")
# A token's leading run of name characters: "woodgrovebank.test'" still names the partner.
_NAME_HEAD = re.compile(r"[\w.\-\u3002\uff0e\uff61]+")
_WS_AROUND = re.compile(r"\s+(?=[.@%!\u3002\uff0e\uff61])|(?<=[.@%!\u3002\uff0e\uff61])\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SHORT = 1024  # values up to this length are memoised (nearly all); longer ones are not kept


_COMMENT_SPECIALS = re.compile(r'[\\"()]')


def _strip_comments(text: str, replacement: str = "", nested: bool = True) -> str:
    """Remove RFC 5322 comments (quoted-pairs honoured; nested unless ``nested`` is false); an
    unclosed comment runs to the end.  Parentheses inside a quoted-string are not comments; an
    unclosed quote runs to the end too.  Only the special characters are visited (hot path)."""
    if "(" not in text:
        return text
    out: list[str] = []
    depth = 0
    quoted = False
    pos = 0        # start of the text not yet copied (outside comments)
    skip_to = 0    # a quoted-pair's escaped character is not special
    for m in _COMMENT_SPECIALS.finditer(text):
        i = m.start()
        if i < skip_to:
            continue
        c = text[i]
        if c == "\\":
            skip_to = i + 2
            continue
        if depth:
            if c == "(" and nested:
                depth += 1
            elif c == ")":
                depth -= 1
                if not depth:
                    pos = i + 1
            continue
        if c == '"':
            quoted = not quoted
        elif c == "(" and not quoted:
            out.append(text[pos:i])
            out.append(replacement)
            depth = 1
    if not depth:
        out.append(text[pos:])
    return "".join(out)


def _decode_encoded_words(text: str) -> str:
    """What a mail client shows for RFC 2047 encoded words; never raises."""
    try:
        parts = decode_header(text)
    except Exception:  # malformed encoded words: the raw spellings still get scanned
        return text
    out = []
    for chunk, charset in parts:
        if isinstance(chunk, bytes):
            try:
                chunk = chunk.decode(charset or "ascii", "replace")
            except (LookupError, UnicodeError):
                chunk = chunk.decode("latin-1")
        out.append(chunk)
    return " ".join(out)


# Default-ignorable code points that are not Cf/Cc (they render as nothing, too).
_IGNORABLE_EXTRA = [(0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F),
                    (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xE0100, 0xE01EF)]
# Fixed by the standard: surrogates and private use.
_FIXED_INVISIBLE = [(0xD800, 0xDFFF), (0xE000, 0xF8FF), (0xF0000, 0x10FFFF)]


@functools.cache
def _invisible_re() -> re.Pattern[str]:
    """Every format (Cf) and non-space control (Cc) character of this interpreter's Unicode
    database (Cf lives below U+30000 and in plane 14), plus the ranges above; built once."""
    ranges = list(_IGNORABLE_EXTRA) + list(_FIXED_INVISIBLE)
    for cp in [*range(0x30000), *range(0xE0000, 0xE1000)]:
        c = chr(cp)
        if unicodedata.category(c) in ("Cf", "Cc") and not c.isspace():
            ranges.append((cp, cp))
    cls = "".join(f"\\U{a:08x}-\\U{b:08x}" if a != b else f"\\U{a:08x}" for a, b in ranges)
    return re.compile(f"[{cls}]+")


def _visible_form(text: str) -> str:
    """Text as a reader sees it: invisible characters removed, compatibility forms folded.
    Whitespace controls (CR, LF, TAB, …) still separate words for a reader: kept."""
    return unicodedata.normalize("NFKC", _invisible_re().sub("", text))


# A comment inside a word joins its halves, one between words separates them; RFC 5322 comments
# nest, some readers' do not.
_COMMENT_READINGS = (("", True), (" ", True), ("", False), (" ", False))


def _stored_forms(text: str) -> list[str]:
    """The MTA's reading: comments gone (a comment between two words separates them, one inside
    a name does not: both), quotes and backslashes gone, no whitespace around ``.``/``@``.
    Comments are found honouring quoted-strings and quoted-pairs and, for a reader that does not,
    ignoring them."""
    out = []
    if _COMMENT_SPECIALS.search(text):
        # Comment and quote punctuation as mere separators (comments kept as text): whatever a
        # reader's idea of nesting, quoting and escaping, a domain after "@" and punctuation is seen.
        separated = _COMMENT_SPECIALS.sub(" ", text)
        out.append(separated)
        out.append(_WS_AROUND.sub("", separated))
    plain = text.replace('"', "").replace("\\", "")
    for base in ((text, plain) if plain != text else (text,)):
        for replacement, nested in (_COMMENT_READINGS if "(" in base else (("", True),)):
            t = _strip_comments(base, replacement, nested).replace('"', "").replace("\\", "")
            out.append(t)
            out.append(_WS_AROUND.sub("", t))
    return out


def _spellings(value: str) -> set[str]:
    bases = [value]
    if "=?" in value:
        bases.append(_decode_encoded_words(value))
    for base in list(bases):
        if not base.isascii() or _CONTROL.search(base):
            bases.append(_visible_form(base))
    out: set[str] = set()
    for base in bases:
        out.add(base)
        out.update(_stored_forms(base))
    return out


def _idna2008_form(name: str) -> str | None:
    """IDNA 2008 / UTS 46 non-transitional A-labels (``ß`` stays ``ß``: ``xn--strae-oqa``)."""
    labels = []
    for label in re.split("[.\u3002\uff0e\uff61]", unicodedata.normalize("NFC", name.lower())):
        if label.isascii():
            labels.append(label)
            continue
        try:
            labels.append("xn--" + label.encode("punycode").decode("ascii"))
        except UnicodeError:
            return None
    return normalize_dns_name(".".join(labels))


def _u_label(label: str) -> str:
    if label.startswith("xn--"):
        try:
            return label[4:].encode("ascii").decode("punycode")
        except UnicodeError:
            pass
    return label


def _token_names(token: str) -> set[str]:
    candidates = {token.strip(".")}
    head = _NAME_HEAD.match(token)
    if head:
        candidates.add(head.group(0).strip("."))
    for c in list(candidates):
        if "xn--" in c.lower():  # an A-label a reader sees decoded
            candidates.add(".".join(map(_u_label, c.lower().split("."))))
    for c in list(candidates):
        if not c.isascii():  # the IDNA 2003 reading of deviation characters (names.py refuses them)
            candidates.add(c.replace("\u00df", "ss").replace("\u1e9e", "ss").replace("\u03c2", "\u03c3"))
    out: set[str] = set()
    for c in candidates:
        if not c:
            continue
        name = normalize_dns_name(c)
        if name:
            out.add(name)
        if not c.isascii():
            alt = _idna2008_form(c)
            if alt:
                out.add(alt)
    return out


def _scan(text: str) -> set[str]:
    out: set[str] = set()
    if "@" in text or "%" in text:
        for token in _AFTER.findall(text):
            out |= _token_names(token)
    if "!" in text:
        for token in _BEFORE.findall(text):
            out |= _token_names(token)
    return out


@functools.lru_cache(maxsize=8192)
def _value_domains_cached(value: str) -> frozenset[str]:
    return _value_domains(value)


def _value_domains(value: str) -> frozenset[str]:
    out: set[str] = set()
    for s in _spellings(value):
        out |= _scan(s)
    return frozenset(out)


def value_domains(value: str) -> frozenset[str]:
    """Every DNS domain any plausible reading of an address or header value names."""
    if not isinstance(value, str) or not value:
        return frozenset()
    if len(value) <= _SHORT:
        return _value_domains_cached(value)
    return _value_domains(value)


def covered_entries(domains, receive_domains: tuple[str, ...], *,
                    keep_dot: bool = False) -> tuple[str, ...]:
    """The receive-list entries covering any of ``domains``: without the leading dot (the
    covered domain), or as configured with ``keep_dot`` (the partner entry, for its terms)."""
    out: list[str] = []
    for d in sorted(domains):
        entry = domain_listed(d, receive_domains)
        if entry is not None:
            e = entry if keep_dot else entry.lstrip(".")
            if e not in out:
                out.append(e)
    return tuple(out)


def envelope_covered(sender: str, receive_domains: tuple[str, ...], *,
                     keep_dot: bool = False) -> tuple[str, ...]:
    """Covered domains (list entries without the leading dot) named by the envelope sender."""
    if not receive_domains or not sender:
        return ()
    return covered_entries(value_domains(sender), receive_domains, keep_dot=keep_dot)


def from_covered(values: list[str], receive_domains: tuple[str, ...], *,
                 keep_dot: bool = False) -> tuple[str, ...]:
    """Covered domains named by any of the ``From:`` field values (each read on its own)."""
    if not receive_domains:
        return ()
    domains: set[str] = set()
    for v in values:
        domains |= value_domains(v)
    return covered_entries(domains, receive_domains, keep_dot=keep_dot)


def is_from_field(name: str) -> bool:
    """``From``, any case, with the obsolete whitespace before the colon some MTAs pass on."""
    return name.strip().lower() == "from"
