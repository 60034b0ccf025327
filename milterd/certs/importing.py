"""``milterd cert import``: install a PKCS#12 (.pfx) key and its chain into the store.

Stores ``<SHA1>.key`` (0600) and ``<SHA1>.pem`` (leaf first, then its chain) in ``--store``,
named by the SHA-1 thumbprint Exchange shows; new directories are made 0700.  Unusable material
(an expired leaf, a key that matches no certificate) is refused with exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from milterd.certs.common import (
    CertError, ensure_private_dir, iso_time, private_key_pem, public_key_der, read_input, sha1_thumbprint,
    sha256_fingerprint, utc_now, write_key_pair,
)

_MAX_CHAIN = 8


def _order_chain(leaf: x509.Certificate, others: Sequence[x509.Certificate]) -> tuple[list[x509.Certificate], int]:
    """Leaf first, then each issuer in turn; returns (chain, number of unrelated certs dropped)."""
    chain = [leaf]
    pool = [c for c in others if c != leaf]
    while pool and len(chain) <= _MAX_CHAIN:
        cur = chain[-1]
        if cur.issuer == cur.subject:
            break
        nxt = next((c for c in pool if c.subject == cur.issuer), None)
        if nxt is None:
            break
        chain.append(nxt)
        pool.remove(nxt)
    return chain, len(pool)


def _read_password(path: str | None) -> bytes | None:
    """First line of the password file (what ``openssl … -passout file:`` writes and reads)."""
    if path is None:
        return None
    data = read_input(path, "password file")
    return data.split(b"\n", 1)[0].rstrip(b"\r")


def cmd_import(args: argparse.Namespace) -> int:
    """Install a PKCS#12 (.pfx) key + chain into the store, refusing unusable material."""
    data = read_input(args.file, "PKCS#12 file")
    password = _read_password(args.password_file)
    attempts = [password] if password is not None else [None, b""]
    loaded = None
    for pw in attempts:
        try:
            loaded = pkcs12.load_key_and_certificates(data, pw)
            break
        except (ValueError, TypeError):
            continue
        except UnsupportedAlgorithm:
            raise CertError("cannot read %s: it uses an unsupported (legacy) encryption; re-export it"
                            " with AES (openssl pkcs12 -export without -legacy)" % args.file) from None
    if loaded is None:
        hint = "wrong password" if password is not None else "a password is needed (--password-file)"
        raise CertError("cannot read %s: %s, or not a PKCS#12 file" % (args.file, hint))
    key, cert, extra = loaded
    everything = ([cert] if cert is not None else []) + list(extra or [])
    if not everything:
        raise CertError("%s holds no certificate" % args.file)
    if key is None:
        raise CertError("%s holds no private key" % args.file)
    # The key's certificate is normally flagged in the bag attributes; when it is not (or the
    # flag is wrong), the certificate whose public key matches the private key is the leaf.
    key_spki = public_key_der(key)
    cert = next((c for c in everything if public_key_der(c) == key_spki), None)
    if cert is None:
        raise CertError("refusing %s: the private key does not match any certificate in it" % args.file, 1)
    extra = [c for c in everything if c is not cert]
    now = utc_now()
    if cert.not_valid_after_utc < now:
        raise CertError(
            "refusing %s: certificate %s expired on %s"
            % (args.file, cert.subject.rfc4514_string(), iso_time(cert.not_valid_after_utc)), 1)
    chain, dropped = _order_chain(cert, list(extra or []))
    if cert.not_valid_before_utc > now:
        print("warning: certificate is not valid before %s" % iso_time(cert.not_valid_before_utc), file=sys.stderr)
    for ca in chain[1:]:
        if ca.not_valid_after_utc < now:
            print("warning: chain certificate %s expired on %s"
                  % (ca.subject.rfc4514_string(), iso_time(ca.not_valid_after_utc)), file=sys.stderr)
    if dropped:
        print("warning: ignored %d certificate(s) not in the leaf's chain" % dropped, file=sys.stderr)
    thumb = sha1_thumbprint(cert)
    ensure_private_dir(args.store)
    key_path = os.path.join(args.store, thumb + ".key")
    pem_path = os.path.join(args.store, thumb + ".pem")
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    key_pem = private_key_pem(key)
    if os.path.lexists(key_path) or os.path.lexists(pem_path):
        try:
            same = read_input(pem_path, "stored chain") == chain_pem and read_input(key_path, "stored key") == key_pem
        except CertError:
            same = False
        if not same:
            raise CertError("%s or %s already exists with other content; refusing to overwrite" % (key_path, pem_path), 1)
        print("already in the store")
    else:
        write_key_pair(key_path, key_pem, pem_path, chain_pem)
    print("SHA-1 thumbprint: %s" % thumb)
    print("SHA-256:          %s" % sha256_fingerprint(cert))
    print("subject:          %s" % cert.subject.rfc4514_string())
    print("not after:        %s" % iso_time(cert.not_valid_after_utc))
    print("chain:            %s (%d certificate%s)" % (pem_path, len(chain), "" if len(chain) == 1 else "s"))
    for ca in chain[1:]:
        print("  issuer SHA-1 %s  %s" % (sha1_thumbprint(ca), ca.subject.rfc4514_string()))
    print("private key:      %s (mode 0600)" % key_path)
    return 0
