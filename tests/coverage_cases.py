"""Inputs and plumbing for the coverage end-to-end tests (issue 13; not a test module).

* :func:`generate_senders` — a seeded mix of envelope-sender spellings (quoted local parts,
  comments, bang paths, percent hack, source routes, several ``@``, trailing dots, case, 8-bit and
  invisible Unicode) around the partner domain, its subdomains and lookalikes;
* :class:`RawSMTP` — an SMTP client that sends the command bytes exactly as given (smtplib
  re-quotes ``MAIL FROM`` through ``email.utils`` and only speaks ASCII);
* :func:`send_batch` / :func:`stored_return_paths` — send one message per sender and read what the
  MTA stored (the delivered ``Return-Path``), correlated by a unique ``Subject``;
* :func:`stored_domain`, :func:`in_partner_domain` — the domain of a stored address, literally and
  as a reader is shown it (format/control characters removed, compatibility forms folded, IDNA);
* :func:`many_headers_message`, :func:`long_from_message` — the header-limit messages.
"""

from __future__ import annotations

import contextlib
import random
import socket
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from milterd.lab.wait import wait_until

PARTNER = "woodgrovebank.test"
RECEIVE_DOMAINS = (PARTNER, "." + PARTNER)   # the receive list of these tests
RCPT = "user@contoso.test"
UNCOVERED_SENDER = "bob@fabrikam.test"


# ------------------------------------------------------------------------------------ senders
@dataclass(frozen=True)
class Sender:
    text: str                 # what goes between the angle brackets of MAIL FROM:<...>
    smtputf8: bool = False    # add the SMTPUTF8 parameter
    form: str = ""            # which generator shape made it (for failure messages)

    def mail_from(self) -> bytes:
        return (b"MAIL FROM:<" + self.text.encode("utf-8", "surrogateescape") + b">" +
                (b" SMTPUTF8" if self.smtputf8 else b""))


# Invisible code points: Unicode format (Cf) characters and a few controls (Cc).
_INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u180e", "\u061c",
              "\u200e", "\u200f", "\u202a", "\u202e", "\u2066", "\u2069", "\U000e0001",
              "\U000e0041", "\ufff9", "\u034f",  # U+034F is Mn but default-ignorable
              "\x01", "\x1f", "\x7f", "\x85", "\x9f"]
_DOTS = ["\u3002", "\uff0e", "\uff61"]                 # IDNA (UTS 46) maps these to "."


def _fullwidth(ch: str) -> str:
    return chr(ord(ch) - 0x21 + 0xFF01) if "!" <= ch <= "~" else ch


def _math_bold(ch: str) -> str:
    if "a" <= ch <= "z":
        return chr(0x1D41A + ord(ch) - ord("a"))
    return ch


def _unicode_variant(rng: random.Random, domain: str) -> str:
    """The partner domain as a reader would still read it (invisible chars, compatibility forms)."""
    kind = rng.choice(["invisible", "invisible2", "fullwidth", "mathbold", "dot", "circled"])
    chars = list(domain)
    if kind in ("invisible", "invisible2"):
        for _ in range(1 if kind == "invisible" else 2):
            chars.insert(rng.randrange(0, len(chars) + 1), rng.choice(_INVISIBLE))
    elif kind == "fullwidth":
        chars = [_fullwidth(c) if c.isalpha() and rng.random() < 0.5 else c for c in chars]
    elif kind == "mathbold":
        chars = [_math_bold(c) if rng.random() < 0.4 else c for c in chars]
    elif kind == "dot":
        chars = [rng.choice(_DOTS) if c == "." else c for c in chars]
    else:  # circled letters fold (NFKC) to ASCII
        chars = [chr(0x24D0 + ord(c) - ord("a")) if "a" <= c <= "z" and rng.random() < 0.3 else c
                 for c in chars]
    return "".join(chars)


def _mangle_case(rng: random.Random, s: str) -> str:
    r = rng.random()
    if r < 0.6:
        return s
    if r < 0.8:
        return s.upper()
    return "".join(c.upper() if rng.random() < 0.5 else c for c in s)


_LOOKALIKES = ["woodgrovebank.test.evil.example", "evilwoodgrovebank.test", "woodgrovebank.testing",
               "woodgrove-bank.test", "woodgrovebank.test-evil.example", "w00dgrovebank.test",
               "w\u043eodgrovebank.test",            # Cyrillic o: a homoglyph, not a folding
               "woodgrovebank.tset", "woodgrovebank", "test.woodgrovebank"]
_OTHERS = ["fabrikam.test", "evil.example", "contoso.test", "mx.contoso.test", "localhost",
           "[127.0.0.1]", "relay.evil.example"]
_LOCALS = ["ceo", "CEO", "a.b", 'a."b"', '"a b"', '"ceo"', '"a\\"b"', "ceo(comment)", "(c)ceo",
           "ceo%x", '"ceo@evil.example"', "ceo.", ".ceo", "c\u00ebo", "ceo+tag", "o'brien",
           "x!ceo", '"x!ceo"', "postmaster", "a..b"]


def _partnerish(rng: random.Random) -> tuple[str, str]:
    """(domain, kind): the partner, a subdomain, a lookalike, a Unicode variant or another
    domain."""
    r = rng.random()
    if r < 0.35:
        d = PARTNER
        kind = "partner"
    elif r < 0.5:
        d = rng.choice(["mail.", "a.b.", "x-y.", "sub."]) + PARTNER
        kind = "subdomain"
    elif r < 0.68:
        d = _unicode_variant(rng, rng.choice([PARTNER, "mail." + PARTNER]))
        kind = "unicode"
    elif r < 0.85:
        d = rng.choice(_LOOKALIKES)
        kind = "lookalike"
    else:
        d = rng.choice(_OTHERS)
        kind = "other"
    if not d.startswith("["):
        d = _mangle_case(rng, d)
        if rng.random() < 0.15:
            d += "."
    return d, kind


def _shape(rng: random.Random, local: str, d: str, o: str) -> tuple[str, str]:
    relay = rng.choice(["mx.contoso.test", "localhost", "[127.0.0.1]", o])
    shapes = [
        ("plain", f"{local}@{d}"),
        ("comment-after-at", f"{local}@(c){d}"),
        ("comment-end", f"{local}@{d}(x)"),
        ("comment-unclosed", f"{local}@{d}("),
        ("comment-with-at", f"{local}(x@{o})@{d}"),
        ("comment-hides-partner", f"{local}@{o}(@{d})"),
        ("spaces", f"{local} @ {d}"),
        ("bang", f"{d}!{local}"),
        ("bang-via", f"{o}!{d}!{local}"),
        ("bang-then", f"{d}!{o}!{local}"),
        ("bang-at", f"{d}!{local}@{o}"),
        ("percent", f"{local}%{d}"),
        ("percent-at", f"{local}%{d}@{relay}"),
        ("percent-chain", f"{local}%{d}%{o}"),
        ("percent-chain2", f"{local}%{o}%{d}"),
        ("route", f"@{o},@relay2.example:{local}@{d}"),
        ("route-partner-hop", f"@{d}:{local}@{o}"),
        ("two-at", f"{local}@{o}@{d}"),
        ("two-at-partner-first", f"{local}@{d}@{o}"),
        ("two-at-comment", f"{local}@{o}(x)@{d}"),
        ("quoted-whole", f'"{local}@{d}"@{o}'),
        ("escaped-at", f"{local}\\@{o}@{d}"),
        ("quoted-domain", f'{local}@"{d}"'),
        ("brackets", f"<{local}@{d}>"),
        ("route-colon", f"{local}@{d}:x@{o}"),
    ]
    return rng.choice(shapes)


def generate_senders(seed: int = 1313, n: int = 400) -> list[Sender]:
    """``n`` distinct generated senders (plus nothing else), reproducible for a given seed."""
    rng = random.Random(seed)
    out: dict[str, Sender] = {}
    guard = 0
    while len(out) < n and guard < n * 20:
        guard += 1
        local = rng.choice(_LOCALS)
        d, _kind = _partnerish(rng)
        o = rng.choice(_OTHERS[:3] + ["relay.evil.example"])
        form, text = _shape(rng, local, d, o)
        if any(c in text for c in "\r\n\x00"):
            continue
        utf8 = not text.isascii() and rng.random() < 0.85
        out.setdefault(text, Sender(text, utf8, form))
    return list(out.values())


def _P(text: str, utf8: bool = False, form: str = "hand-picked") -> Sender:
    return Sender(text, utf8 or not text.isascii(), form)


D = PARTNER
# Spellings seen in the field notes and the issue; each is stored by Postfix 3.7 (defaults) in the
# partner domain (see test_coverage_postfix.py), yet none is a plain ``local@partner``.
NASTIEST = [
    _P(f'a."b"@{D}'),                         # stored a.b@woodgrovebank.test
    _P(f"{D}!ceo"),                            # swap_bangpath
    _P(f"{D}!x!ceo"),                          # stored x!ceo@woodgrovebank.test
    _P(f"ceo%{D}"),                            # allow_percent_hack
    _P(f"@evil.example,@relay.example:ceo@{D}"),   # source route
    _P(f"ceo@evil.example(x)@{D}"),            # stored "ceo@evil.example"@woodgrovebank.test
    _P(f"ceo(x@evil.example)@{D}"),            # comment hiding an @
    _P(f'"ceo"@"{D}"'),                        # quoted domain
    _P(f"CEO@WOODGROVEBANK.TEST."),            # case, trailing dot
    _P(f"ceo@{D}("),                           # unclosed comment
    _P(f"ceo@mail.{D}"),                       # subdomain (".woodgrovebank.test")
    _P("ceo@woodgrove\u200bbank.test"),        # zero-width space: displays as the partner
    _P("ceo@\uff37oodgrovebank.test"),         # fullwidth W
]

HAND_PICKED = NASTIEST + [
    _P(f'"a b"@{D}'), _P(f"ceo(comment)@{D}"), _P(f"ceo@(c){D}"), _P(f"ceo@{D}(c)"),
    _P(f"x!{D}!ceo"), _P(f"ceo%{D}@[127.0.0.1]"), _P(f"ceo%{D}@mx.contoso.test"),
    _P(f"ceo%x@{D}"), _P(f"ceo@{D}."), _P(f"<ceo@{D}>"), _P(f"ceo @ {D}"), _P(f"ceo@ {D}"),
    _P(f"ceo\\@x@{D}"), _P(f'"ceo@{D}"@evil.example'), _P(f"ceo@{D}@evil.example"),
    _P(f"ceo@{D}.evil.example"), _P(f"ceo@sub.{D}"), _P(f'"ce\\o"@{D}'), _P(f"ceo.@{D}"),
    _P(f".ceo@{D}"), _P(f"@{D}:ceo@evil.example"), _P(f"ceo@{D}:x@evil.example"),
    _P(f"c\u00ebo@{D}", utf8=False, form="8bit-local-no-smtputf8"),
    _P("ceo@woodgrove\u00adbank.test"), _P("ceo@woodgrovebank.test\u200b"),
    _P("ceo@woodgrovebank\u3002test"), _P("ceo@woodgrove\u2060bank.test"),
    _P("ceo@\uff57\uff4f\uff4f\uff44grovebank.test"), _P("ceo@woodgrovebank.test\t"),
    _P("ceo@woodgrovebank.test\x7f"), _P(f"{D}!ceo@localhost"), _P(f"{D}!ceo@evil.example"),
]

# Plainly outside the partner domain, in every reading: must NOT be covered (guards against a
# rule that covers everything).
CONTROLS = [UNCOVERED_SENDER, f"ceo@{D}.evil.example", f"ceo@evil{D}", "ceo@woodgrovebank.testing",
            "postmaster@contoso.test"]


# ------------------------------------------------------------------------ what was stored
def split_address(addr: str) -> tuple[str, str | None]:
    """(local, domain) of a stored address: the last ``@`` outside a quoted string."""
    addr = addr.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    at = None
    quoted = escaped = False
    for i, c in enumerate(addr):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == "@" and not quoted:
            at = i
    if at is None:
        return addr, None
    return addr[:at], addr[at + 1:]


def stored_domain(return_path: str) -> str | None:
    return split_address(return_path)[1]


def reader_view(domain: str) -> str:
    """What a reader is shown: format (Cf) and control (Cc) characters and default-ignorables
    dropped, compatibility forms folded (NFKC), case folded, IDNA dots and A-labels decoded."""
    s = "".join(c for c in domain
                if unicodedata.category(c) not in ("Cf", "Cc") and c != "\u034f")
    s = unicodedata.normalize("NFKC", s).casefold()
    for dot in _DOTS:
        s = s.replace(dot, ".")
    labels = []
    for label in s.split("."):
        if label.startswith("xn--"):
            try:
                label = label.encode("ascii").decode("idna")
            except (UnicodeError, ValueError):
                pass
        labels.append(label)
    return ".".join(labels)


def _in(domain: str) -> bool:
    d = domain.rstrip(".")
    return d == PARTNER or d.endswith("." + PARTNER)


def in_partner_domain(domain: str | None, *, reader: bool = False) -> bool:
    """The stored domain is the partner or under it (literally, case-insensitively; or, with
    ``reader``, as a reader is shown it)."""
    if not domain:
        return False
    if domain.isascii() and _in(domain.lower()):
        return True
    return reader and _in(reader_view(domain))


# ------------------------------------------------------------------------------ SMTP client
class RawSMTP:
    """Line-exact SMTP over TCP (IPv4 or IPv6 loopback); replies as (code, text); no TLS."""

    def __init__(self, host: str, port: int, timeout: float = 60):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.greeting = self.reply()

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self) -> tuple[int, str]:
        lines = []
        for _ in range(1000):
            line = self._line()
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                break
        try:
            code = int(lines[-1][:3])
        except ValueError:
            code = 0
        return code, "\n".join(x[4:].decode(errors="replace") for x in lines)

    def cmd(self, line: bytes | str) -> tuple[int, str]:
        if isinstance(line, str):
            line = line.encode()
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def data(self, payload: bytes) -> tuple[int, str]:
        code, text = self.cmd(b"DATA")
        if code != 354:
            return code, text
        lines = payload.replace(b"\r\n", b"\n").split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        body = b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)
        self.sock.sendall(body + b".\r\n")
        return self.reply()

    def close(self) -> None:
        try:
            self.cmd(b"QUIT")
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> "RawSMTP":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class Outcome:
    sender: Sender
    subject: str
    stage: str          # done | mail | rcpt | data | disconnected
    code: int
    text: str

    @property
    def accepted(self) -> bool:
        return self.stage == "done" and self.code == 250


def simple_message(subject: str, from_header: str = UNCOVERED_SENDER) -> bytes:
    return (f"Subject: {subject}\r\nMessage-ID: <{subject}@coverage.test>\r\n"
            f"From: {from_header}\r\nTo: {RCPT}\r\n\r\nhello\r\n").encode()


def send_one(smtp: RawSMTP, sender: Sender, subject: str, payload: bytes | None = None,
             rcpt: str = RCPT) -> Outcome:
    """One transaction on an open session (RSET after a refusal, so the session is reusable)."""
    code, text = smtp.cmd(sender.mail_from())
    if code != 250:
        smtp.cmd(b"RSET")
        return Outcome(sender, subject, "mail", code, text)
    code, text = smtp.cmd(f"RCPT TO:<{rcpt}>")
    if code not in (250, 251):
        smtp.cmd(b"RSET")
        return Outcome(sender, subject, "rcpt", code, text)
    code, text = smtp.data(payload if payload is not None else simple_message(subject))
    return Outcome(sender, subject, "done" if code == 250 else "data", code, text)


def send_batch(host: str, port: int, senders: list[Sender], tag: str,
               payload_for=None) -> list[Outcome]:
    """One message per sender (Subject ``{tag}-{i}``), reusing sessions; reconnects (bounded)
    when the server drops one."""
    out: list[Outcome] = []
    smtp: RawSMTP | None = None
    reconnects = 0
    try:
        for i, s in enumerate(senders):
            subject = f"{tag}-{i:04d}"
            if smtp is None:
                smtp = RawSMTP(host, port)
                smtp.cmd(b"EHLO client.example.test")
            try:
                out.append(send_one(smtp, s, subject,
                                    payload_for(subject) if payload_for else None))
            except (ConnectionError, OSError) as e:
                out.append(Outcome(s, subject, "disconnected", 0, str(e)))
                try:
                    smtp.sock.close()
                except OSError:
                    pass
                smtp = None
                reconnects += 1
                if reconnects > 50:
                    raise RuntimeError(f"server keeps dropping the session: {e}") from e
    finally:
        if smtp is not None:
            smtp.close()
    return out


def _raw_headers(data: bytes) -> list[tuple[str, str]]:
    """Header fields of a stored message (unfolded), decoded as UTF-8 with surrogateescape."""
    head = data.split(b"\n\n", 1)[0].replace(b"\r\n", b"\n")
    fields: list[tuple[str, str]] = []
    for line in head.split(b"\n"):
        text = line.decode("utf-8", "surrogateescape")
        if text[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + text.strip())
        elif ":" in text:
            name, _, value = text.partition(":")
            fields.append((name.strip(), value.strip()))
    return fields


def stored_headers(files: list[Path]) -> dict[str, list[tuple[str, str]]]:
    """Subject -> header fields of each stored message file."""
    out = {}
    for p in files:
        fields = _raw_headers(p.read_bytes())
        subject = next((v for n, v in fields if n.lower() == "subject"), None)
        if subject is not None:
            out[subject] = fields
    return out


def postfix_stored(maildir: Path) -> dict[str, list[tuple[str, str]]]:
    new = maildir / "inbox" / "new"
    return stored_headers(sorted(new.iterdir()) if new.is_dir() else [])


def wait_stored(read, subjects: set[str], timeout: float = 60.0) -> dict[str, list]:
    """Poll ``read()`` (bounded) until every subject is stored; returns what was found."""
    def all_stored() -> dict[str, list] | None:
        found = read()
        return found if subjects <= found.keys() else None
    with contextlib.suppress(AssertionError):   # the caller looks up what it needs
        return wait_until(all_stored, timeout, f"storage of {sorted(subjects)}")
    return read()


def header(fields: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in fields if n.lower() == name.lower()]


# --------------------------------------------------------------------- header-limit messages
FILLER_HEADERS = 2100
LONG_FROM_BYTES = 60 * 1024


def many_headers_message(subject: str, from_domain: str, n: int = FILLER_HEADERS) -> bytes:
    """``From: ceo@<from_domain>`` placed after ``n`` other header fields."""
    h = [f"Subject: {subject}", f"Message-ID: <{subject}@coverage.test>", f"To: {RCPT}"]
    h += [f"X-Filler-{i:04d}: filler value {i}" for i in range(n - 3)]
    h += [f"From: CEO <ceo@{from_domain}>"]
    assert len(h) == n + 1
    return ("\r\n".join(h) + "\r\n\r\nhello\r\n").encode()


def long_from_value(from_domain: str, size: int = LONG_FROM_BYTES, *,
                    partner_first: bool = False) -> str:
    """A folded list of mailboxes, at least ``size`` bytes long, with ``CEO <ceo@from_domain>``
    last (or first)."""
    boxes: list[str] = []
    named = f"CEO <ceo@{from_domain}>"
    i = 0
    total = len(named)
    while total < size:
        b = f"Employee {i:05d} <employee-{i:05d}@fabrikam.test>"
        boxes.append(b)
        total += len(b) + 4           # ",\r\n " folding
        i += 1
    boxes.insert(0, named) if partner_first else boxes.append(named)
    return ",\r\n ".join(boxes)


def long_from_message(subject: str, from_domain: str, size: int = LONG_FROM_BYTES, *,
                      partner_first: bool = False) -> bytes:
    h = [f"Subject: {subject}", f"Message-ID: <{subject}@coverage.test>", f"To: {RCPT}",
         "From: " + long_from_value(from_domain, size, partner_first=partner_first)]
    return ("\r\n".join(h) + "\r\n\r\nhello\r\n").encode()


@dataclass
class Tally:
    generated: int = 0
    accepted: int = 0
    rejected: int = 0
    stored: int = 0
    stored_partner: int = 0
    stored_partner_reader: int = 0
    rejected_by: dict = field(default_factory=dict)

    def line(self, label: str) -> str:
        return (f"{label}: generated={self.generated} accepted={self.accepted} "
                f"rejected={self.rejected} {self.rejected_by} stored={self.stored} "
                f"stored_in_partner={self.stored_partner} "
                f"stored_in_partner_as_read={self.stored_partner_reader}")
