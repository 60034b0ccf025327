"""Running ``openssl verify`` the way a TLS peer's OpenSSL verifies, and reading its errors.

The command is what Postfix's OpenSSL does with ``smtpd_tls_CAfile``: trust only in ``--ca``
(``-no-CApath -no-CAstore``), ``-purpose sslserver|sslclient``, the rest of the checked file as
untrusted intermediates, with ``--crl`` ``-crl_check_all``.  ``$MILTERD_OPENSSL`` names another
``openssl`` binary (3.0 or later).
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from milterd.certs.common import CertError

_OPENSSL_PURPOSE = {"server": "sslserver", "client": "sslclient"}
_ERROR_LINE = re.compile(r"^(\[CRL path\] )?error (\d+) at (-?\d+) depth lookup: ?(.*)$")


@functools.lru_cache(maxsize=4)
def _openssl_for(configured: str | None) -> str:
    """The ``openssl`` binary to verify with: ``$MILTERD_OPENSSL`` or the one on PATH (>= 3.0)."""
    path = configured or shutil.which("openssl") or "/usr/bin/openssl"
    try:
        proc = subprocess.run([path, "version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CertError("cert check needs the openssl command (Debian package openssl): %s" % exc) from None
    m = re.match(r"OpenSSL (\d+)\.", proc.stdout)
    if proc.returncode != 0 or not m or int(m.group(1)) < 3:
        raise CertError("cert check needs OpenSSL 3.0 or later; %s says %r"
                        % (path, (proc.stdout or proc.stderr).strip()[:80]))
    return path


def _openssl() -> str:
    return _openssl_for(os.environ.get("MILTERD_OPENSSL"))


@dataclass(frozen=True)
class VerifyError:
    """One error line of ``openssl verify``: code, depth in the path, printed subject, text."""

    code: int
    depth: int
    subject: str | None
    message: str
    crl_path: bool = False


@dataclass
class VerifyRun:
    ok: bool
    errors: list[VerifyError]
    output: str


def parse_verify_output(text: str) -> list[VerifyError]:
    """The ``error N at D depth lookup: ...`` lines, each with the subject line printed before it."""
    errors: list[VerifyError] = []
    previous: str | None = None
    for line in text.splitlines():
        m = _ERROR_LINE.match(line.strip())
        if m:
            errors.append(VerifyError(int(m.group(2)), int(m.group(3)), previous, m.group(4).strip(), bool(m.group(1))))
            previous = None
        else:
            previous = line.strip() or None
    return errors


class Verifier:
    """Runs ``openssl verify`` on files written once into a private temporary directory.

    The command is what a TLS peer's OpenSSL does: ``-purpose sslserver|sslclient``, trust only in
    ``--ca`` (``-no-CApath -no-CAstore``; anchored at a self-signed certificate, as without
    ``-partial_chain`` in Postfix), the rest of the checked file as untrusted intermediates, and
    with ``--crl`` the CRLs of every certificate in the path (``-crl_check_all``).
    """

    def __init__(self, tmp: str, leaf: x509.Certificate, extra: Sequence[x509.Certificate],
                 anchors: Sequence[x509.Certificate], crls: Sequence[x509.CertificateRevocationList] | None,
                 now: _dt.datetime | None) -> None:
        self.openssl = _openssl()

        def put(name: str, objs: Sequence[Any]) -> str:
            path = os.path.join(tmp, name)
            with open(path, "wb") as fh:
                fh.write(b"".join(o.public_bytes(serialization.Encoding.PEM) for o in objs))
            return path

        self.leaf = put("leaf.pem", [leaf])
        self.base = [self.openssl, "verify", "-no-CApath", "-no-CAstore", "-CAfile", put("anchors.pem", anchors),
                     "-nameopt", "RFC2253,-esc_msb"]
        if extra:
            self.base += ["-untrusted", put("untrusted.pem", extra)]
        if now is not None:
            self.base += ["-attime", str(int(now.timestamp()))]
        self.crl_args = ["-crl_check_all", "-CRLfile", put("crls.pem", crls)] if crls else []

    def run(self, role: str, *, with_crls: bool = False, check_time: bool = True) -> VerifyRun:
        cmd = self.base + ["-purpose", _OPENSSL_PURPOSE[role]]
        if with_crls:
            cmd += self.crl_args
        if not check_time:
            cmd.append("-no_check_time")
        try:
            proc = subprocess.run(cmd + [self.leaf], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, errors="replace", timeout=60, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise CertError("cannot run %s verify: %s" % (self.openssl, exc)) from None
        return VerifyRun(proc.returncode == 0, parse_verify_output(proc.stdout), proc.stdout)
