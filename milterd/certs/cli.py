"""``milterd cert request|import|list|check``: the sub-commands on the main CLI's parser."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from milterd.certs.check import PURPOSES, cmd_check
from milterd.certs.common import CertError
from milterd.certs.importing import cmd_import
from milterd.certs.listing import DEFAULT_STORE, cmd_list
from milterd.certs.request import cmd_request


def _runner(func: Callable[[argparse.Namespace], int], label: str) -> Callable[[argparse.Namespace], int]:
    """Turn CertError into a one-line message and its exit code (no tracebacks for user errors)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CertError as exc:
            print("milterd cert %s: %s" % (label, exc), file=sys.stderr)
            return exc.code

    run.__name__ = func.__name__
    run.__doc__ = func.__doc__
    return run


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``cert request|import|list|check`` to the main CLI's sub-command parsers."""
    cert = subparsers.add_parser(
        "cert", help="certificate tooling",
        description="Certificate tooling for Domain Security: request, import, list, check.")
    sub = cert.add_subparsers(dest="cert_command", metavar="{request,import,list,check}")
    sub.required = True

    p = sub.add_parser("request", help="make a private key and a PKCS#10 certificate request")
    p.add_argument("--subject", required=True, help='RFC 4514, e.g. "CN=mail1.contoso.com,O=Contoso,DC=contoso,DC=com"')
    p.add_argument("--san", action="append", default=[], metavar="DNSNAME", help="subject alternative name (repeat)")
    p.add_argument("--key", default="rsa:3072", help="rsa:2048|rsa:3072|rsa:4096|ec:p256|ec:p384|ec:p521 (default rsa:3072)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for NAME.key (0600) and NAME.csr")
    p.set_defaults(func=_runner(cmd_request, "request"))

    p = sub.add_parser("import", help="install a PKCS#12 (.pfx) key and chain into the store")
    p.add_argument("file", metavar="FILE.pfx")
    p.add_argument("--password-file", metavar="F", help="file whose first line is the PKCS#12 password")
    p.add_argument("--store", required=True, metavar="DIR")
    p.set_defaults(func=_runner(cmd_import, "import"))

    p = sub.add_parser("list", help="show installed certificates, fingerprints and expiry")
    p.add_argument("--store", metavar="DIR", help="default $MILTERD_CERT_STORE or %s" % DEFAULT_STORE)
    p.add_argument("-c", "--config", metavar="CONFIG", help="TOML config: report which keys use each file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_runner(cmd_list, "list"))

    p = sub.add_parser("check", help="verify a certificate the way a TLS peer's OpenSSL does")
    p.add_argument("cert", metavar="CERT", help="PEM file: the certificate, optionally followed by intermediates")
    p.add_argument("--ca", metavar="FILE", help="trusted CA certificates (default: the system bundle)")
    p.add_argument("--crl", metavar="FILE", help="CRL(s), PEM or DER")
    p.add_argument("--name", metavar="HOST", help="host name the certificate must match")
    p.add_argument("--purpose", choices=sorted(PURPOSES), default="both",
                   help="the TLS role(s) the certificate must be usable for (default both: an MTA"
                        " certificate serves inbound TLS and is the client certificate outbound)")
    p.add_argument("--pins", action="store_true",
                   help='also print the certificate\'s "cert-sha256:…" and "key-sha256:…" pins, to paste'
                        ' into pins = [...] of a [partners."domain"] table (whatever the verdict)')
    p.set_defaults(func=_runner(cmd_check, "check"))
