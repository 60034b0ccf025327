"""The session model handed to plugins: connection state kept apart from message state.

As in aiosmtpd, a :class:`Connection` (client, HELO, TLS facts) lives for the SMTP connection and a
:class:`Message` (queue ID, envelope, headers) for one transaction; a new ``Message`` starts at each
MAIL FROM.  Plugins keep their per-connection or per-message state under typed :class:`StashKey`
keys instead of ad-hoc attributes (pytest's stash pattern), so two plugins cannot collide.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class StashKey(Generic[T]):
    """A typed key for :class:`Stash`; create one per kind of value, at module level."""

    __slots__ = ("name",)

    def __init__(self, name: str = ""):
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


class Stash:
    """A small typed mapping from :class:`StashKey` to values."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], Any] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return self._data[key]

    def get(self, key: StashKey[T], default: T | None = None) -> T | None:
        return self._data.get(key, default)

    def __contains__(self, key: StashKey[Any]) -> bool:
        return key in self._data


class CertVerify(enum.Enum):
    """Whether the MTA verified the client certificate's chain."""

    OK = "ok"            # a certificate was presented and its chain verified
    FAIL = "fail"        # a certificate was presented and did not verify
    NONE = "none"        # no certificate was presented (or no TLS)
    UNKNOWN = "unknown"  # the MTA does not tell (Postfix: no cert ≡ untrusted cert to a milter)


@dataclass(frozen=True)
class TlsFacts:
    """TLS facts of a session, normalised from whichever MTA's macro dialect delivered them."""

    version: str | None = None          # "TLSv1.3"; None = the session is not encrypted
    cipher: str | None = None
    bits: int | None = None
    verify: CertVerify = CertVerify.NONE
    subject_cn: str | None = None       # the certificate's single CN, None if none/ambiguous
    subject_dn: str | None = None       # full subject DN where the MTA gives one (Sendmail)
    issuer: str | None = None           # issuer CN (Postfix) or DN (Sendmail)
    fingerprint_sha256: str | None = None  # "AB:CD:…", any presented certificate
    pubkey_sha256: str | None = None       # "AB:CD:…" of its SubjectPublicKeyInfo (key pins)
    fingerprint_other: str | None = None   # e.g. Sendmail's {cert_md5}: shown, never trusted
    dialect: str = "none"               # "postfix" | "sendmail" | "none"

    @property
    def encrypted(self) -> bool:
        return self.version is not None

    @property
    def cert_presented(self) -> bool | None:
        """True/False when known; None when the MTA cannot tell."""
        if self.verify in (CertVerify.OK, CertVerify.FAIL):
            return True
        if self.verify is CertVerify.NONE:
            return False
        return True if (self.fingerprint_sha256 or self.pubkey_sha256) else None


#: The facts of an unencrypted session (and of one whose TLS macros are absent or unusable):
#: nothing known, nothing verified.  Not to be confused with the failure *reason*
#: :data:`milterd.policy.reasons.NO_TLS`, a string.
PLAINTEXT = TlsFacts()


@dataclass
class Connection:
    """One SMTP connection as the MTA reported it."""

    id: str
    client_address: str | None = None
    client_port: int | None = None
    client_name: str | None = None
    helo: str | None = None
    tls: TlsFacts = PLAINTEXT
    mta: str = "unknown"                # "postfix" | "sendmail" | "unknown"
    stash: Stash = field(default_factory=Stash)


@dataclass
class Message:
    """One mail transaction (MAIL FROM … end of message)."""

    sender: str                           # envelope sender as given, "<>" for bounces
    queue_id: str | None = None
    recipients: list[str] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)  # in arrival order
    stash: Stash = field(default_factory=Stash)

    def header_values(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]
