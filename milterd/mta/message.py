"""The message as the reference MTA builds it: header fields and body, split, rendered, and
edited by a milter's header modifications (SMFIR_ADDHEADER / INSHEADER / CHGHEADER), the way
Postfix's cleanup applies them.  Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import milter_codec as mc

__all__ = ["HeaderField", "split_message", "render_message", "apply_header_modifications"]


@dataclass
class HeaderField:
    """One header of a message being built. ``hidden`` headers (our own
    Received) count for SMFIR_INSHEADER positions but are never shown to, nor
    changed by, the milter — as with Postfix."""

    name: str
    value: str  # raw text after the colon, including leading whitespace and folding
    hidden: bool = False

    def render(self) -> bytes:
        return ("%s:%s\r\n" % (self.name, self.value.replace("\r\n", "\n").replace("\n", "\r\n"))
                ).encode("utf-8", "surrogateescape")


def apply_header_modifications(headers: list[HeaderField], mods: tuple[mc.Modification, ...],
                               *, leading_space: bool) -> list[HeaderField]:
    """Apply ADDHEADER / INSHEADER / CHGHEADER in order; returns a new list.

    Without SMFIP_HDR_LEADSPC the milter's value gets one space after the
    colon (what the milter stripped on the way in); with it, the value is
    used verbatim. CHGHEADER with an empty value deletes; with an index past
    the last occurrence it adds the header (Sendmail/Postfix behaviour).
    """
    out = [HeaderField(h.name, h.value, h.hidden) for h in headers]

    def norm(v: str) -> str:
        v = v.replace("\r\n", "\n").replace("\n", "\r\n")
        return v if leading_space else " " + v

    for mod in mods:
        if isinstance(mod, mc.AppendHeader):
            out.append(HeaderField(mod.name, norm(mod.value)))
        elif isinstance(mod, mc.InsertHeader):
            out.insert(min(mod.index, len(out)), HeaderField(mod.name, norm(mod.value)))
        elif isinstance(mod, mc.ChangeHeader):
            seen = 0
            target = None
            for pos, h in enumerate(out):
                if not h.hidden and h.name.lower() == mod.name.lower():
                    seen += 1
                    if seen == max(mod.index, 1):
                        target = pos
                        break
            if target is None:
                if mod.value:
                    out.append(HeaderField(mod.name, norm(mod.value)))
            elif mod.value:
                out[target] = HeaderField(out[target].name, norm(mod.value))
            else:
                del out[target]
    return out


def split_message(raw: bytes) -> tuple[list[HeaderField], bytes]:
    """Split into header fields (raw values, folding kept) and body (CRLF)."""
    text = raw.replace(b"\r\n", b"\n")
    head, sep, body = text.partition(b"\n\n")
    if not sep:
        if head.startswith(b" ") or b":" not in head.split(b"\n", 1)[0]:
            head, body = b"", text  # no header block at all
        else:
            body = b""
    headers: list[HeaderField] = []
    for line in head.split(b"\n") if head else []:
        s = line.decode("utf-8", "surrogateescape")
        if s[:1] in (" ", "\t") and headers:
            headers[-1].value += "\n" + s
        elif ":" in s:
            name, _, value = s.partition(":")
            headers.append(HeaderField(name, value))
        # a malformed line is dropped, as Postfix's cleanup would reject it
    return headers, body.replace(b"\n", b"\r\n")


def render_message(headers: list[HeaderField], body: bytes) -> bytes:
    return b"".join(h.render() for h in headers) + b"\r\n" + body
