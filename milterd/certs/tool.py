"""The former single-module certificate tool, kept as an import path; the code lives in
``milterd.certs.*`` (see the package docstring).

``milterd/cli.py`` loads ``register`` from here by name and the daemon imports
``certificate_expiry``; the public names of the old module stay importable from here.
"""

from __future__ import annotations

from milterd.certs.check import KEYWORDS, PURPOSES, Failure, check_certificate, cmd_check
from milterd.certs.cli import register
from milterd.certs.common import (
    CertError, dns_sans, load_certificates, sha1_thumbprint, sha256_fingerprint,
)
from milterd.certs.expiry import certificate_expiry
from milterd.certs.explain import usage_summary
from milterd.certs.importing import cmd_import
from milterd.certs.listing import CERT_SUFFIXES, DEFAULT_STORE, CertInfo, cmd_list, config_cert_paths
from milterd.certs.openssl import VerifyError, VerifyRun, parse_verify_output
from milterd.certs.request import cmd_request, parse_subject

__all__ = ["register", "certificate_expiry", "CertError"]

# Re-exported, not used here: the rest of the old module's public names.
_REEXPORTED = (
    KEYWORDS, PURPOSES, Failure, check_certificate, cmd_check, dns_sans, load_certificates, sha1_thumbprint,
    sha256_fingerprint, usage_summary, cmd_import, CERT_SUFFIXES, DEFAULT_STORE, CertInfo, cmd_list,
    config_cert_paths, VerifyError, VerifyRun, parse_verify_output, cmd_request, parse_subject,
)
