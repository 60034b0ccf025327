"""Certificate subject/issuer strings as MTAs hand them to a milter (pure, never raises).

Sendmail sends ``{cert_subject}``/``{cert_issuer}`` as OpenSSL *one-line* DNs
(``/C=US/O=Lab/CN=mail.woodgrovebank.test``), xtext-encoded (RFC 3461: ``+20`` is a space).
Other sources (logs, ``cryptography``'s ``rfc4514_string()``, configs) use RFC 4514
(``CN=mail.contoso.com,O=Contoso,DC=contoso,DC=com``).

Why ``subject_cn`` is paranoid: the one-line form does not escape ``/`` inside values, so a
CN value ``evil.test/CN=good.partner.test`` prints exactly like two CNs, and the certificate
holder chooses that value.  Any DN with more than one CN, or that did not parse cleanly, has
*no* name.  Two further holes remain in the one-line form and are closed as follows:

* Another attribute can smuggle a fake CN into a certificate that has no real CN
  (``O=Evil/CN=good.partner.test`` with no CN is byte-identical to O=Evil + CN=good...).
  Pass Sendmail's ``{cn_subject}`` macro as ``cn_macro``: Sendmail fills it from the real CN
  attribute, so the two must agree.
* Sendmail formats the one-line DN into a 256-byte buffer; a longer subject may be
  truncated in the middle of the CN.  A one-line DN of 255 characters or more yields no CN.

OpenSSL's ``\\xHH`` escapes in one-line values are *not* decoded: the certificate holder can
write the same characters literally, so decoding would let ``good\\x2Epartner.test`` read as
``good.partner.test``.  Non-ASCII CNs therefore never match (fail closed).

``parse_dn`` returns pairs in textual order (RFC 4514 text is most-specific-first; the
one-line form is in certificate order) with attribute types upper-cased.
"""

from __future__ import annotations

import re
from typing import Iterable

__all__ = ["xtext_decode", "parse_dn", "subject_cn", "format_dn"]

_HEX = "0123456789ABCDEFabcdef"
# Start of a new attribute in the one-line form: "/" followed by a type and "=".
_ONELINE_SPLIT = re.compile(r"/(?=(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+)=)")
_TYPE = re.compile(r"(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+)\Z")
_EMBEDDED_CN = re.compile(r"[/,+]\s*(?:CN|2\.5\.4\.3)\s*=", re.IGNORECASE)
# Sendmail's buffer for X509_NAME_oneline is MAXNAME (256) bytes including the NUL.
_ONELINE_TRUNCATION = 255


def xtext_decode(s: str) -> str:
    """Decode RFC 3461 xtext (``+XX`` = one octet); malformed ``+`` sequences stay literal.

    Octets are reassembled as UTF-8 (invalid sequences become U+FFFD), so a multi-byte
    character encoded as ``+C3+A9`` comes back as one character.
    """
    if not isinstance(s, str):
        return ""
    out = bytearray()
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "+" and i + 2 < n and s[i + 1] in _HEX and s[i + 2] in _HEX:
            out.append(int(s[i + 1:i + 3], 16))
            i += 3
            continue
        out += c.encode("utf-8", "surrogatepass")
        i += 1
    return out.decode("utf-8", "replace")


def _parse_oneline(s: str) -> tuple[list[tuple[str, str]], bool]:
    """Parse ``/T=v/T=v``; a ``/`` not followed by ``TYPE=`` belongs to the previous value."""
    parts = _ONELINE_SPLIT.split(s)
    clean = parts[0] == ""
    pairs: list[tuple[str, str]] = []
    for part in parts[1:]:
        typ, _, value = part.partition("=")
        pairs.append((typ.upper(), value))
    return pairs, clean and bool(pairs)


def _hexpair(s: str, i: int) -> bool:
    return i + 1 < len(s) and s[i] in _HEX and s[i + 1] in _HEX


def _parse_rfc4514(s: str) -> tuple[list[tuple[str, str]], bool]:
    """RFC 4514 parser returning (pairs, clean); on a syntax error it stops and says unclean."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(s)
    if not s.strip():
        return pairs, False
    while i < n:
        eq = s.find("=", i)
        if eq < 0:
            return pairs, False
        typ = s[i:eq].strip()
        if not _TYPE.match(typ):
            return pairs, False
        i = eq + 1
        raw = bytearray()
        while i < n and s[i] == " ":  # leading unescaped spaces are not part of the value
            i += 1
        if i < n and s[i] == '"':  # RFC 2253 legacy quoted value
            i += 1
            while i < n and s[i] != '"':
                if s[i] == "\\" and i + 1 < n:
                    i += 1
                raw += s[i].encode("utf-8", "surrogatepass")
                i += 1
            if i >= n:
                return pairs, False
            i += 1
            while i < n and s[i] == " ":
                i += 1
            value = raw.decode("utf-8", "replace")
        else:
            trailing = 0  # count of unescaped trailing spaces to strip
            while i < n and s[i] not in ",+":
                c = s[i]
                if c == "\\":
                    if _hexpair(s, i + 1):
                        raw.append(int(s[i + 1:i + 3], 16))
                        i += 3
                    elif i + 1 < n:
                        raw += s[i + 1].encode("utf-8", "surrogatepass")
                        i += 2
                    else:
                        return pairs, False
                    trailing = 0
                    continue
                if c == '"':
                    return pairs, False  # unescaped quote inside a value
                raw += c.encode("utf-8", "surrogatepass")
                trailing = trailing + 1 if c == " " else 0
                i += 1
            if trailing:
                del raw[-trailing:]
            value = raw.decode("utf-8", "replace")
        pairs.append((typ.upper(), value))
        if i < n:
            if s[i] not in ",+":
                return pairs, False
            i += 1
            if i >= n:
                return pairs, False  # dangling separator
    return pairs, True


def _parse(s: str) -> tuple[list[tuple[str, str]], bool, bool]:
    """(pairs, clean, oneline) for a DN in either accepted form."""
    if not isinstance(s, str):
        return [], False, False
    if s.startswith("/"):
        pairs, clean = _parse_oneline(s)
        return pairs, clean, True
    pairs, clean = _parse_rfc4514(s)
    return pairs, clean, False


def parse_dn(s: str) -> tuple[tuple[str, str], ...]:
    """Attribute (TYPE, value) pairs of a one-line or RFC 4514 DN; best effort, never raises.

    A DN that does not parse cleanly returns the pairs read before the error (possibly ()).
    """
    pairs, _clean, _oneline = _parse(s)
    return tuple(pairs)


def subject_cn(s: str, *, cn_macro: str | None = None) -> str | None:
    """The one CN of a subject DN, or None when absent, repeated, truncated or unparseable.

    ``cn_macro``: Sendmail's ``{cn_subject}`` (xtext-decoded) when available; the result is
    then returned only if it equals that value (see module docstring for why).
    """
    pairs, clean, oneline = _parse(s)
    if not clean:
        return None
    if oneline and len(s) >= _ONELINE_TRUNCATION:
        return None
    cns = [value for typ, value in pairs if typ in ("CN", "2.5.4.3")]
    if len(cns) != 1 or not cns[0]:
        return None
    if _EMBEDDED_CN.search(cns[0]):
        return None  # a value that looks like it carries another CN is never a name
    if cn_macro is not None and cn_macro != cns[0]:
        return None
    return cns[0]


def _escape_value(value: str) -> str:
    """RFC 4514 §2.4 escaping, plus control characters as ``\\XX`` so a log line stays one line."""
    out = []
    for idx, c in enumerate(value):
        if c in ',+"\\<>;=':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append("\\%02X" % ord(c))
        elif (c == " " and (idx == 0 or idx == len(value) - 1)) or (c == "#" and idx == 0):
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def format_dn(pairs: Iterable[tuple[str, str]]) -> str:
    """RFC 4514-style display string (``CN=a,O=b``) in the order given; for logs and headers."""
    return ",".join("%s=%s" % (typ, _escape_value(value)) for typ, value in pairs)
