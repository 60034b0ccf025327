"""What Postfix's policy delegation told us about a session, for the milter to join.

Postfix gives a milter only the CN of a *trusted* client certificate and never a fingerprint, but
its ``check_policy_service`` requests carry ``ccert_fingerprint`` for any certificate.  The key that
exists at every stage in both views is the client's address and source port (the queue ID is
still empty at the first RCPT), so views are stored under ``(client_address, client_port)``.
Postfix answers the policy request for a RCPT before it calls the milter for the same RCPT, so a
view is present when the milter's RCPT and end-of-message callbacks look.

Bounded: at most ``max_entries`` views, each forgotten after ``ttl`` seconds.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class PolicyView:
    client_address: str
    client_port: int
    fingerprint: str | None        # ccert_fingerprint (digest per smtpd_tls_fingerprint_digest)
    pubkey_fingerprint: str | None
    subject: str | None            # ccert_subject: only for a trusted certificate
    issuer: str | None
    protocol: str | None           # encryption_protocol
    cipher: str | None
    keysize: int | None
    queue_id: str | None
    sender: str | None
    received_at: float


class PolicyViews:
    def __init__(self, max_entries: int = 10000, ttl: float = 600.0):
        self._views: OrderedDict[tuple[str, int], PolicyView] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self.ttl = ttl

    def put(self, view: PolicyView) -> None:
        key = (view.client_address, view.client_port)
        with self._lock:
            self._views[key] = view
            self._views.move_to_end(key)
            while len(self._views) > self.max_entries:
                self._views.popitem(last=False)

    def get(self, client_address: str | None, client_port: int | None) -> PolicyView | None:
        if client_address is None or client_port is None:
            return None
        with self._lock:
            view = self._views.get((client_address, client_port))
            if view is None:
                return None
            if time.monotonic() - view.received_at > self.ttl:
                del self._views[(client_address, client_port)]
                return None
            return view

    def forget(self, client_address: str | None, client_port: int | None) -> None:
        if client_address is None or client_port is None:
            return
        with self._lock:
            self._views.pop((client_address, client_port), None)

    def __len__(self) -> int:
        return len(self._views)
