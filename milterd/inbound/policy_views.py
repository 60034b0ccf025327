"""What Postfix's policy delegation told us about a session, for the milter to join.

Postfix gives a milter only the CN of a *trusted* client certificate and never a fingerprint, but
its ``check_policy_service`` requests carry ``ccert_fingerprint`` for any certificate.  The key that
exists at every stage in both views is the client's address and source port (the queue ID is
still empty at the first RCPT), so views are stored under ``(client_address, client_port)``.
Postfix answers the policy request for a RCPT before it calls the milter for the same RCPT, so a
view is present when the milter's RCPT and end-of-message callbacks look.

The two views spell one address differently: the milter's ``{client_addr}`` may be ``IPv6:::1``
(or ``::1``, ``::ffff:192.0.2.1`` for an IPv4 client on a dual-stack socket) where the policy
request says ``client_address=::1`` / ``192.0.2.1``.  :func:`normalize_address` gives both the
same key, inside :meth:`PolicyViews.put` / :meth:`PolicyViews.get` / :meth:`PolicyViews.forget`,
so callers pass whatever they were given.  An address that is not an IP address (``unknown``, a
unix-domain client) has no key: such a view is never stored and never found.

The address and port bind a view to a *live* TCP connection, not to the program that sent it: a
policy request is only as trustworthy as the socket it came over (see ``[policy] listen``).
:meth:`PolicyView.agrees_with` additionally checks the view's TLS attributes against the milter's
own TLS facts of the session, so a view describing another session (or a guessed one) is not used.

Bounded: at most ``max_entries`` views (the least recently used goes first), each forgotten
``ttl`` seconds after it was received (:class:`milterd.core.cache.TtlLruCache`).
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from milterd.core.cache import TtlLruCache

if TYPE_CHECKING:
    from milterd.session import TlsFacts

_MAX_ADDRESS = 64  # the longest IPv6 text form with a scope is well below this


def normalize_address(address: str | None) -> str | None:
    """The canonical text of an IP address as either view spells it; None if it is not one.

    ``IPv6:::1``, ``[::1]``, ``::1``, ``0:0::1`` → ``::1``; ``::ffff:192.0.2.1`` and
    ``IPv6:::ffff:192.0.2.1`` → ``192.0.2.1``; ``192.0.2.1`` stays.  Never raises.
    """
    if not isinstance(address, str) or not address or len(address) > _MAX_ADDRESS:
        return None
    text = address.strip()
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text.isascii():
        return None  # ipaddress accepts non-ASCII digits ("١٢٧.0.0.1"); Postfix never sends them
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        if ip.scope_id:
            return None  # link-local with a zone: the two views need not name the zone alike
    return str(ip)


def normalize_port(port: int | str | None) -> int | None:
    """A TCP port as an int (1…65535), or None.  Accepts ``"25"``; never raises."""
    if isinstance(port, bool):
        return None
    if isinstance(port, int):
        return port if 0 < port < 65536 else None
    if isinstance(port, str) and 0 < len(port) <= 5 and port.isascii() and port.isdigit():
        value = int(port)
        return value if 0 < value < 65536 else None
    return None


def _key(client_address: str | None, client_port: int | str | None) -> tuple[str, int] | None:
    address, port = normalize_address(client_address), normalize_port(client_port)
    if address is None or port is None:
        return None
    return address, port


@dataclass(frozen=True)
class PolicyView:
    client_address: str
    client_port: int
    fingerprint: str | None        # ccert_fingerprint (digest per smtpd_tls_fingerprint_digest)
    pubkey_fingerprint: str | None
    subject: str | None            # ccert_subject: only for a trusted certificate
    issuer: str | None
    protocol: str | None           # encryption_protocol; None = the session is not encrypted
    cipher: str | None
    keysize: int | None
    queue_id: str | None
    sender: str | None
    received_at: float

    def agrees_with(self, tls: "TlsFacts") -> bool:
        """Whether this view can describe the session whose milter-side TLS facts are ``tls``.

        False when one side says the session is encrypted and the other says it is not, or when
        the view's protocol, cipher or key size is present and differs from the milter's
        ``{tls_version}``, ``{cipher}`` or ``{cipher_bits}``.  (Both come from the same
        OpenSSL session inside Postfix, so a real view always agrees.)  An attribute absent on
        either side is not compared.  A view that agrees is not thereby authentic: anyone who
        can post to the policy server can also guess a common protocol and cipher.
        """
        view_encrypted = bool(self.protocol)
        if view_encrypted != bool(tls.version):
            return False
        if not view_encrypted:
            return True
        if self.protocol != tls.version:
            return False
        if self.cipher is not None and tls.cipher is not None and self.cipher != tls.cipher:
            return False
        if self.keysize is not None and tls.bits is not None and self.keysize != tls.bits:
            return False
        return True


class PolicyViews:
    """The views by client address and port.

    :param clock: the clock ``received_at`` was read from (``time.monotonic``; tests inject one).
    """

    def __init__(self, max_entries: int = 10000, ttl: float = 600.0, *,
                 clock: Callable[[], float] = time.monotonic):
        self._views: TtlLruCache[tuple[str, int], PolicyView] = TtlLruCache(
            max_entries, ttl, clock=clock)

    @property
    def max_entries(self) -> int:
        return self._views.max_entries

    @property
    def ttl(self) -> float:
        return self._views.ttl

    def put(self, view: PolicyView) -> bool:
        """Store ``view`` (replacing any older one for the same client); False if it has no key."""
        key = _key(view.client_address, view.client_port)
        if key is None:
            return False
        self._views.put(key, view, since=view.received_at)
        return True

    def get(self, client_address: str | None, client_port: int | str | None) -> PolicyView | None:
        key = _key(client_address, client_port)
        if key is None:
            return None
        return self._views.get(key)

    def forget(self, client_address: str | None, client_port: int | str | None) -> None:
        key = _key(client_address, client_port)
        if key is None:
            return
        self._views.pop(key)

    def __len__(self) -> int:
        return len(self._views)
