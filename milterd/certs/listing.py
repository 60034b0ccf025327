"""``milterd cert list``: the installed certificates, their fingerprints, expiry and users.

Reads every ``*.pem``/``*.crt``/``*.cert`` file in the store (default ``$MILTERD_CERT_STORE`` or
``/etc/milterd/certs``) and every such path named in the TOML config given with ``-c``: any
string value anywhere in the config that ends in ``.pem``/``.crt``/``.cert`` counts, and is
reported under its dotted key (``tls.cert_file``; list items as ``key[0]``).  Relative paths are
taken relative to the config file.  Each file is shown by its first certificate (the leaf);
``chain`` counts the certificates in the file.  Under every row come the leaf's two partner pins,
quoted, ready to paste into ``pins = [...]`` of a ``[partners."domain"]`` table (JSON:
``cert_pin``/``key_pin``): ``cert-sha256:…`` (SHA-256 of the DER certificate, what ``openssl x509
-fingerprint -sha256`` prints) and ``key-sha256:…`` (SHA-256 of the DER SubjectPublicKeyInfo; the
same after a re-issue for the same key).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tomllib
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from milterd.certs.common import (
    CertError, dns_sans, iso_time, load_cert_file, pubkey_sha256_fingerprint, read_input, sha1_thumbprint,
    sha256_fingerprint, utc_now,
)
from milterd.core.partners import CERT_PIN_PREFIX, KEY_PIN_PREFIX

DEFAULT_STORE = "/etc/milterd/certs"
CERT_SUFFIXES = (".pem", ".crt", ".cert")


def config_cert_paths(config_path: str) -> list[tuple[str, str]]:
    """(dotted key, absolute path) for every string in a TOML config ending in a cert suffix."""
    data = read_input(config_path, "config")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CertError("cannot parse config %s: %s" % (config_path, exc)) from None
    base = os.path.dirname(os.path.abspath(config_path))
    found: list[tuple[str, str]] = []

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, "%s.%s" % (key, k) if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, "%s[%d]" % (key, i))
        elif isinstance(node, str) and node.lower().endswith(CERT_SUFFIXES):
            found.append((key, os.path.normpath(os.path.join(base, node))))

    walk(doc, "")
    return found


def cert_pin(cert: x509.Certificate) -> str:
    """``cert-sha256:AB:CD:…``: the pin of exactly this certificate."""
    return CERT_PIN_PREFIX + sha256_fingerprint(cert)


def key_pin(cert: x509.Certificate) -> str:
    """``key-sha256:AB:CD:…``: the pin of the certificate's public key (survives a re-issue)."""
    return KEY_PIN_PREFIX + pubkey_sha256_fingerprint(cert)


def format_pins(cert_value: str, key_value: str, indent: str = "  ") -> list[str]:
    """The two lines ``cert list``/``cert check --pins`` print: TOML strings to paste into a
    ``[partners."domain"]`` table's ``pins = [...]``."""
    return ['%spin (certificate): "%s"' % (indent, cert_value),
            '%spin (public key):  "%s"' % (indent, key_value)]


def pin_lines(cert: x509.Certificate, indent: str = "  ") -> list[str]:
    return format_pins(cert_pin(cert), key_pin(cert), indent)


@dataclass
class CertInfo:
    """One row of ``cert list`` (also its JSON object)."""

    path: str
    sha1: str
    sha256: str
    subject: str
    sans: list[str]
    issuer: str
    not_after: str
    days_left: int
    chain: int
    used_by: list[str]
    cert_pin: str
    key_pin: str


def _describe(path: str, certs: list[x509.Certificate], used_by: list[str], now: _dt.datetime) -> CertInfo:
    leaf = certs[0]
    left = leaf.not_valid_after_utc - now
    return CertInfo(
        path=path, sha1=sha1_thumbprint(leaf), sha256=sha256_fingerprint(leaf),
        subject=leaf.subject.rfc4514_string(), sans=dns_sans(leaf), issuer=leaf.issuer.rfc4514_string(),
        not_after=iso_time(leaf.not_valid_after_utc), days_left=left.days, chain=len(certs), used_by=used_by,
        cert_pin=cert_pin(leaf), key_pin=key_pin(leaf),
    )


def _table(rows: list[CertInfo]) -> str:
    header = ["SHA1 THUMBPRINT", "SHA256", "SUBJECT", "SANS", "ISSUER", "NOT AFTER", "DAYS", "USED BY", "FILE"]
    body = [
        [r.sha1, r.sha256, r.subject, ",".join(r.sans) or "-", r.issuer, r.not_after, str(r.days_left),
         ",".join(r.used_by) or "-", r.path]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    for r, line in zip(rows, body):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
        out.extend(format_pins(r.cert_pin, r.key_pin))
    return "\n".join(out)


def cmd_list(args: argparse.Namespace) -> int:
    """Show the installed certificates, their fingerprints, expiry and which config key uses them."""
    store = args.store or os.environ.get("MILTERD_CERT_STORE") or DEFAULT_STORE
    files: list[str] = []
    if os.path.isdir(store):
        for name in sorted(os.listdir(store)):
            if name.lower().endswith(CERT_SUFFIXES):
                files.append(os.path.normpath(os.path.join(os.path.abspath(store), name)))
    elif args.store:
        raise CertError("store %s is not a directory" % store)
    used: dict[str, list[str]] = {}
    if args.config:
        for key, path in config_cert_paths(args.config):
            real = os.path.realpath(path)
            used.setdefault(real, []).append(key)
            if all(os.path.realpath(f) != real for f in files):
                files.append(path)
    now = utc_now()
    rows: list[CertInfo] = []
    for path in files:
        try:
            certs = load_cert_file(path)
        except CertError as exc:
            print("warning: skipping %s" % exc, file=sys.stderr)
            continue
        rows.append(_describe(path, certs, used.get(os.path.realpath(path), []), now))
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
    elif rows:
        print(_table(rows))
    else:
        print("no certificates found (store %s)" % store)
    return 0
