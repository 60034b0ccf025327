"""The closed set of Domain Security failure reasons, shared by replies, logs, headers and metrics.

Keeping the set closed keeps metric label sets bounded and lets dashboards rely on the names.
"""

NO_TLS = "no_tls"                      # the session was not encrypted
TLS_VERSION = "tls_version"            # below [tls] min_version
CIPHER_BITS = "cipher_bits"            # below [tls] min_cipher_bits
NO_TRUSTED_CERT = "no_trusted_cert"    # no client certificate, or one whose chain did not verify
NAME_MISMATCH = "name_mismatch"        # trusted certificate, but it does not name the domain
ISSUER_NOT_ALLOWED = "issuer_not_allowed"  # trusted certificate from an issuer off the allow-list
PIN_MISMATCH = "pin_mismatch"          # pins exist for the domain; the certificate matches none
                                       # and is not otherwise acceptable

ALL = (NO_TLS, TLS_VERSION, CIPHER_BITS, NO_TRUSTED_CERT, NAME_MISMATCH, ISSUER_NOT_ALLOWED,
       PIN_MISMATCH)

DESCRIPTIONS = {
    NO_TLS: "message was not sent over TLS",
    TLS_VERSION: "TLS version below the required minimum",
    CIPHER_BITS: "cipher strength below the required minimum",
    NO_TRUSTED_CERT: "no trusted client certificate",
    NAME_MISMATCH: "client certificate does not name the domain",
    ISSUER_NOT_ALLOWED: "client certificate issuer is not allowed",
    PIN_MISMATCH: "client certificate does not match the pinned fingerprint",
}
