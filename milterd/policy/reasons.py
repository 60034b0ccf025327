"""The closed sets of Domain Security failure reasons, one per direction, each defined only here.

* **Inbound** (a message from a receive-list domain failed Domain Security): shared by SMTP
  replies, logs, the trace header and ``milterd_domain_security_failures_total{domain,reason}``.
* **Outbound** (a TLS session to a send-list domain failed): shared by the maillog parser
  (:mod:`milterd.outbound.maillog_parser`), TLS-RPT session records, the reference MTA's delivery
  (:mod:`milterd.mta.delivery`) and ``milterd_domain_secured_outbound_session_failures_total
  {domain,reason}``.

Keeping the sets closed keeps metric label sets bounded and lets dashboards rely on the names:
the values are public and never change.
"""

from typing import Literal

# -- Inbound: why a message from a receive-list domain failed -----------------------------------

NO_TLS = "no_tls"                      # the session was not encrypted
TLS_VERSION = "tls_version"            # below the partner's min_version
CIPHER_BITS = "cipher_bits"            # below the partner's min_cipher_bits
NO_TRUSTED_CERT = "no_trusted_cert"    # no client certificate, or one whose chain did not verify
NAME_MISMATCH = "name_mismatch"        # trusted certificate, but it does not name the domain
ISSUER_NOT_ALLOWED = "issuer_not_allowed"  # trusted certificate from an issuer off the allow-list
PIN_MISMATCH = "pin_mismatch"          # pins exist for the domain; the certificate matches none
                                       # and is not otherwise acceptable
CLIENT_NETWORK = "client_network"      # the partner's client_networks do not contain the client

ALL = (NO_TLS, TLS_VERSION, CIPHER_BITS, NO_TRUSTED_CERT, NAME_MISMATCH, ISSUER_NOT_ALLOWED,
       PIN_MISMATCH, CLIENT_NETWORK)   # every inbound reason

DESCRIPTIONS = {
    NO_TLS: "message was not sent over TLS",
    TLS_VERSION: "TLS version below the required minimum",
    CIPHER_BITS: "cipher strength below the required minimum",
    NO_TRUSTED_CERT: "no trusted client certificate",
    NAME_MISMATCH: "client certificate does not name the domain",
    ISSUER_NOT_ALLOWED: "client certificate issuer is not allowed",
    PIN_MISMATCH: "client certificate does not match the pinned fingerprint",
    CLIENT_NETWORK: "client address is outside the partner's networks",
}

# -- Outbound: why a delivery attempt to a send-list domain failed ------------------------------

OUTBOUND_STARTTLS_NOT_OFFERED = "starttls_not_offered"  # TLS required; the server did not offer
                                                        # STARTTLS (or refused to start TLS)
OUTBOUND_UNTRUSTED_CERT = "untrusted_cert"    # the server's chain did not verify
OUTBOUND_NAME_MISMATCH = "name_mismatch"      # trusted chain, but no name covers the domain
OUTBOUND_HANDSHAKE_FAILED = "handshake_failed"  # the TLS handshake itself failed
OUTBOUND_OTHER = "other"                      # not a TLS failure (connection refused, 4xx/5xx
                                              # reply, full mailbox …): never counted

#: The TLS failures: the ``reason`` label values of the outbound failure counter.
OUTBOUND_TLS_FAILURES = (OUTBOUND_STARTTLS_NOT_OFFERED, OUTBOUND_UNTRUSTED_CERT,
                         OUTBOUND_NAME_MISMATCH, OUTBOUND_HANDSHAKE_FAILED)
OUTBOUND_ALL = OUTBOUND_TLS_FAILURES + (OUTBOUND_OTHER,)

#: The same set for type checkers (tests check it equals :data:`OUTBOUND_ALL`).
OutboundReason = Literal["starttls_not_offered", "untrusted_cert", "name_mismatch",
                         "handshake_failed", "other"]

OUTBOUND_DESCRIPTIONS = {
    OUTBOUND_STARTTLS_NOT_OFFERED: "the server did not offer STARTTLS",
    OUTBOUND_UNTRUSTED_CERT: "server certificate not trusted",
    OUTBOUND_NAME_MISMATCH: "server certificate does not name the domain",
    OUTBOUND_HANDSHAKE_FAILED: "TLS handshake failed",
    OUTBOUND_OTHER: "delivery failed for a reason other than TLS",
}
