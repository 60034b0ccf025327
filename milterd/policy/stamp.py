"""The trace header's grammar, as a pure function (interface.md "Trace header").

``tls=TLSv1.3; cipher=…; bits=256; verify=ok; subject="…"; issuer="…"; domain-secure=pass;
domain=woodgrovebank.test`` (plus ``reason=…`` when domain-secure=fail, e.g. in report mode, and for
covered mail ``partner=<entry>`` — whose terms applied — and, on a pass, ``match=domain|
certificate_name|cert_pin|key_pin``)

Values that come from the peer (certificate names) are attacker-chosen: a CN can hold quotes,
semicolons, CR/LF or non-ASCII.  Every such value is written as a quoted-string in which only
printable ASCII other than ``"``, ``\\`` and ``%`` stands for itself; ``"`` and ``\\`` are
backslash-escaped and everything else (controls, CR/LF, non-ASCII, ``%``) is percent-encoded as
UTF-8 bytes.  So a value can never end the quoted-string, add a pair or start another header, and
the original is recoverable with :func:`parse_stamp`.
"""

from __future__ import annotations

import re

from milterd.session import CertVerify, TlsFacts

MAX_VALUE_CHARS = 256  # encoded length of one value: the whole header stays below 998 octets

_TOKEN = re.compile(r"[A-Za-z0-9_.+/-]{1,64}")  # fullmatch: "$" would let a trailing LF through


def quote(value: str) -> str:
    """A quoted-string of at most MAX_VALUE_CHARS encoded characters (never a cut escape)."""
    out: list[str] = []
    size = 0
    for ch in value:
        o = ord(ch)
        if ch in '"\\':
            piece = "\\" + ch
        elif 0x20 <= o < 0x7F and ch != "%":
            piece = ch
        else:
            piece = "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogateescape"))
        if size + len(piece) > MAX_VALUE_CHARS:
            break
        out.append(piece)
        size += len(piece)
    return '"' + "".join(out) + '"'


def _token_or_quoted(value: str) -> str:
    return value if _TOKEN.fullmatch(value) else quote(value)


def stamp_value(tls: TlsFacts, ds_status: str, ds_domain: str | None,
                ds_reason: str | None = None, *, partner: str | None = None,
                match: str | None = None) -> str:
    verify = {CertVerify.OK: "ok", CertVerify.FAIL: "fail"}.get(tls.verify, "none")
    parts = [f"tls={_token_or_quoted(tls.version) if tls.version else 'none'}"]
    if tls.encrypted:
        if tls.cipher:
            parts.append(f"cipher={_token_or_quoted(tls.cipher)}")
        if tls.bits is not None:
            parts.append(f"bits={tls.bits}")
    parts.append(f"verify={verify}")
    subject = tls.subject_dn or tls.subject_cn
    if subject:
        parts.append(f"subject={quote(subject)}")
    if tls.issuer:
        parts.append(f"issuer={quote(tls.issuer)}")
    parts.append(f"domain-secure={ds_status}")
    if ds_domain:
        parts.append(f"domain={ds_domain}")
    if ds_reason:  # report mode delivers failures: say why (a closed set, see milterd.policy.reasons)
        parts.append(f"reason={ds_reason}")
    if partner:  # whose terms applied: the partner entry (".x.test" for a subdomain entry)
        parts.append(f"partner={_token_or_quoted(partner)}")
    if match:    # how the certificate passed: domain | certificate_name | cert_pin | key_pin
        parts.append(f"match={_token_or_quoted(match)}")
    return "; ".join(parts)


_PAIR = re.compile(r'\s*([a-z-]+)=("(?:[^"\\]|\\.)*"|[^;"\s]*)\s*(?:;|$)')


def parse_stamp(value: str) -> dict[str, str]:
    """Inverse of :func:`stamp_value` (for tests and tools). Raises ValueError on bad syntax."""
    value = re.sub(r"\r?\n(?=[ \t])", "", value).strip()  # RFC 5322 unfolding: drop CRLF before WSP
    pos, out = 0, {}
    while pos < len(value):
        m = _PAIR.match(value, pos)
        if not m or m.end() == pos:
            raise ValueError(f"bad trace header at {pos}: {value[pos:pos + 40]!r}")
        key, raw = m.group(1), m.group(2)
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            raw = re.sub(r"(%[0-9A-F]{2})+",
                         lambda mm: bytes.fromhex(mm.group(0).replace("%", "")).decode(
                             "utf-8", "replace"), raw)
        out[key] = raw
        pos = m.end()
    return out
