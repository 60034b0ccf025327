"""What every ``milterd cert`` command shares: the error type, reading certificates (PEM or DER)
and input files, fingerprints and names, and writing key material safely (files created 0600
through ``os.open``, never overwritten; new directories 0700)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID


class CertError(Exception):
    """A user-facing failure: one line of text and an exit code (2 = input, 1 = refused)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def iso_time(t: _dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def read_input(path: str, what: str) -> bytes:
    """Read a file or raise CertError naming it (why: no tracebacks for a missing file)."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise CertError("cannot read %s %s: %s" % (what, path, exc.strerror or exc)) from None


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """All certificates in PEM data (or one DER certificate); ValueError if there are none."""
    if b"-----BEGIN" in data:
        return list(x509.load_pem_x509_certificates(data))
    return [x509.load_der_x509_certificate(data)]


def load_cert_file(path: str, what: str = "certificate file") -> list[x509.Certificate]:
    data = read_input(path, what)
    try:
        return load_certificates(data)
    except ValueError:
        raise CertError("%s %s holds no readable certificate" % (what, path)) from None


def sha1_thumbprint(cert: x509.Certificate) -> str:
    """Upper-case hex SHA-1 of the DER certificate, no colons: what Exchange calls Thumbprint."""
    return cert.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S324 - identifier, not security


def sha256_fingerprint(cert: x509.Certificate) -> str:
    """Upper-case hex SHA-256 with colons: the form Postfix's ccert_fingerprint and pins use."""
    return ":".join("%02X" % b for b in cert.fingerprint(hashes.SHA256()))


def pubkey_sha256_fingerprint(cert: x509.Certificate) -> str:
    """Upper-case hex SHA-256 with colons of the DER SubjectPublicKeyInfo: Postfix's
    ``ccert_pubkey_fingerprint`` (sha256 digest) and milterd's ``key-sha256:`` pins.  It stays the
    same when a certificate is re-issued for the same key."""
    return ":".join("%02X" % b for b in hashlib.sha256(public_key_der(cert)).digest())


def dns_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.DNSName))


def common_names(cert: x509.Certificate) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def public_key_der(key_or_cert: Any) -> bytes:
    pub = key_or_cert.public_key()
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` atomically at creation (O_EXCL, no symlink following).

    Why: a key must never exist with wider permissions, not even between write and chmod, and an
    existing file (possibly someone's live key) is never overwritten.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise CertError("%s already exists; refusing to overwrite it" % path) from None
    except OSError as exc:
        raise CertError("cannot create %s: %s" % (path, exc.strerror or exc)) from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def write_key_pair(key_path: str, key_data: bytes, public_path: str, public_data: bytes) -> None:
    """Write a key (0600) and its public companion (0644); never leave a key without it."""
    _write_new(key_path, key_data, 0o600)
    try:
        _write_new(public_path, public_data, 0o644)
    except CertError:
        os.unlink(key_path)
        raise


def ensure_private_dir(path: str) -> None:
    """Make ``path`` and every missing parent with mode 0700 (existing directories are left alone).

    Why: ``os.makedirs(mode=...)`` applies the mode to the last directory only (and through the
    umask), so ``--out /new/a/b`` would leave ``/new`` and ``/new/a`` world-readable on the way to
    key material.
    """
    missing: list[str] = []
    cur = os.path.abspath(path)
    while not os.path.lexists(cur):
        missing.append(cur)
        parent = os.path.dirname(cur)
        if parent == cur:
            break
        cur = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours to chmod
        except OSError as exc:
            raise CertError("cannot create directory %s: %s" % (directory, exc.strerror or exc)) from None
        os.chmod(directory, 0o700)  # mkdir's mode went through the umask
    if not os.path.isdir(path):
        raise CertError("%s is not a directory" % path)


# --------------------------------------------------------------------------- key material


def private_key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )

