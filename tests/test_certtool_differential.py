"""Differential test: ``milterd cert check`` against the real ``openssl verify`` on odd PKIs.

Each shape below is a small PKI built in memory (``certtool_helpers.make_cert``/``make_crl``)
with what OpenSSL 3 is expected to say for a TLS server (``-purpose sslserver``) and a TLS
client (``-purpose sslclient``).  For every shape the test

1. runs the ``openssl`` binary itself, with the plain command line of the trust model ``cert
   check`` documents (``-CAfile`` = ``--ca``, ``-untrusted`` = the rest of the checked file,
   ``-crl_check_all -CRLfile`` = ``--crl``), and asserts that the shape really is what its name
   says (OpenSSL accepts it exactly for the roles marked OK);
2. runs ``cert check --purpose server|client|both`` and asserts it says OK exactly when OpenSSL
   accepted every role asked for, and otherwise refuses with exit 1 and one ``keyword: detail``
   line per failure, with exactly the keywords listed for the refused roles.

Disagreements are allowed only where a shape carries ``stricter=``: a deliberate, documented
choice to refuse where OpenSSL accepts (delta CRLs, whose revocations OpenSSL ignores).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import re
import subprocess
from pathlib import Path
from typing import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID as EKU, NameOID

from certtool_helpers import (
    DAY, NOW, OPENSSL, Issued, idp, key_usage, make_cert, make_crl, ns_cert_type, pem, unknown_extension, write,
)
from milterd.certs.check import KEYWORDS
from milterd.certs.cli import register

SERVER, CLIENT = EKU.SERVER_AUTH, EKU.CLIENT_AUTH
LEAF = "mx.contoso.test"


@dataclasses.dataclass
class Case:
    leaf: Issued
    chain: list[Issued]
    anchors: list[Issued]
    crls: list[x509.CertificateRevocationList] | None = None


@dataclasses.dataclass
class Shape:
    id: str
    build: Callable[[Issued], Case]
    server: set[str]  # keywords for --purpose server; empty = OpenSSL accepts as TLS server
    client: set[str]  # the same for a TLS client
    stricter: set[str] = dataclasses.field(default_factory=set)  # refused although OpenSSL accepts
    lines: int | None = None  # number of failure lines when not one per keyword


def ca(issuer: Issued | None, cn: str, **kw) -> Issued:
    kw.setdefault("ca", True)
    return make_cert(issuer, cn, **kw)


def leaf(issuer: Issued, cn: str = LEAF, **kw) -> Issued:
    return make_cert(issuer, cn, org="Contoso", **kw)


def via(root: Issued, **leaf_kw) -> Case:
    """root -> intermediate -> leaf (leaf bent by ``leaf_kw``)."""
    inter = ca(root, "Issuing CA")
    return Case(leaf(inter, **leaf_kw), [inter], [root])


def chain_of(root: Issued, *inters_kw: dict, anchors: list[Issued] | None = None, **leaf_kw) -> Case:
    """root -> CA 1 -> ... -> CA n -> leaf, each CA made with the given keyword arguments."""
    parent, inters = root, []
    for i, kw in enumerate(inters_kw, 1):
        parent = ca(parent, "CA %d" % i, **kw)
        inters.append(parent)
    return Case(leaf(parent, **leaf_kw), list(reversed(inters)), anchors or [root])


def with_crls(root: Issued, *, leaf_kw: dict | None = None, inter_crl: dict | None = None,
              root_crl: dict | None = None, revoke_leaf: bool = False, revoke_inter: bool = False,
              inter_kw: dict | None = None) -> Case:
    """root -> intermediate -> leaf with a CRL from each CA (bent by ``*_crl`` make_crl arguments)."""
    inter = ca(root, "Issuing CA", **(inter_kw or {}))
    lf = leaf(inter, **(leaf_kw or {}))
    crls = [make_crl(root, [inter.cert.serial_number] if revoke_inter else [], **(root_crl or {})),
            make_crl(inter, [lf.cert.serial_number] if revoke_leaf else [], **(inter_crl or {}))]
    return Case(lf, [inter], [root], crls)


def self_signed(in_ca: bool) -> Callable[[Issued], Case]:
    def build(root: Issued) -> Case:
        me = make_cert(None, LEAF, org="Contoso")
        return Case(me, [], [me] if in_ca else [root])
    return build


def forged(root: Issued) -> Case:
    """A leaf 'from' the trusted root's name, signed by another key."""
    return Case(leaf(root, signer=ec.generate_private_key(ec.SECP256R1())), [], [root])


def permit(*dns: str) -> x509.NameConstraints:
    return x509.NameConstraints(permitted_subtrees=[x509.DNSName(d) for d in dns], excluded_subtrees=None)


def exclude(*dns: str) -> x509.NameConstraints:
    return x509.NameConstraints(permitted_subtrees=None, excluded_subtrees=[x509.DNSName(d) for d in dns])


def permit_dir(org: str) -> x509.NameConstraints:
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)])
    return x509.NameConstraints(permitted_subtrees=[x509.DirectoryName(name)], excluded_subtrees=None)


def permit_ip(net: str) -> x509.NameConstraints:
    return x509.NameConstraints(permitted_subtrees=[x509.IPAddress(ipaddress.ip_network(net))],
                                excluded_subtrees=None)


P = {"purpose"}
OK: set[str] = set()
KEY_COMPROMISE = frozenset([x509.ReasonFlags.key_compromise])
DELTA = [(x509.DeltaCRLIndicator(1), True), (x509.CRLNumber(2), False)]
PAST, FUTURE = NOW - 30 * DAY, NOW + 30 * DAY

SHAPES: list[Shape] = [
    # --- trust
    Shape("root-leaf", lambda r: Case(leaf(r), [], [r]), OK, OK),
    Shape("root-intermediate-leaf", via, OK, OK),
    Shape("untrusted-root", lambda r: Case(leaf(ca(None, "Other Root")), [], [r]), {"untrusted"}, {"untrusted"}),
    Shape("intermediate-missing", lambda r: dataclasses.replace(via(r), chain=[]), {"untrusted"}, {"untrusted"}),
    Shape("self-signed-leaf-in-ca", self_signed(True), OK, OK),
    Shape("self-signed-leaf-not-in-ca", self_signed(False), {"untrusted"}, {"untrusted"}),
    Shape("forged-signature", forged, {"untrusted"}, {"untrusted"}),
    # An intermediate in --ca is no anchor (Postfix does not set -partial_chain); with its root it is fine.
    Shape("intermediate-alone-in-ca", lambda r: (lambda c: Case(c.leaf, [], c.chain))(via(r)),
          {"untrusted"}, {"untrusted"}),
    Shape("intermediate-and-root-in-ca", lambda r: (lambda c: Case(c.leaf, [], c.chain + c.anchors))(via(r)),
          OK, OK),
    # --- path length
    Shape("pathlen0-one-ca-below", lambda r: chain_of(r, {"path_length": 0}), OK, OK),
    Shape("pathlen0-two-cas-below", lambda r: chain_of(r, {"path_length": 0}, {}),
          {"path_length"}, {"path_length"}),
    Shape("root-pathlen0-exceeded", lambda r: chain_of(ca(None, "Tight Root", path_length=0), {},
                                                       anchors=None),
          {"path_length"}, {"path_length"}),
    Shape("root-pathlen1-one-ca-below", lambda r: (lambda t: chain_of(t, {}, anchors=[t]))(
        ca(None, "Root pathlen 1", path_length=1)), OK, OK),
    Shape("root-pathlen1-two-cas-below", lambda r: (lambda t: chain_of(t, {}, {}, anchors=[t]))(
        ca(None, "Root pathlen 1", path_length=1)), {"path_length"}, {"path_length"}),
    # --- name constraints
    Shape("nc-inside", lambda r: chain_of(r, {"name_constraints": permit("contoso.test")}), OK, OK),
    Shape("nc-permitted-violation", lambda r: chain_of(r, {"name_constraints": permit("fabrikam.test")}),
          {"name_constraints"}, {"name_constraints"}),
    Shape("nc-excluded", lambda r: chain_of(r, {"name_constraints": exclude("contoso.test")}),
          {"name_constraints"}, {"name_constraints"}),
    Shape("nc-cn-only-leaf-outside", lambda r: chain_of(r, {"name_constraints": permit("fabrikam.test")}, sans=[]),
          {"name_constraints"}, {"name_constraints"}),
    Shape("nc-second-san-outside",
          lambda r: chain_of(r, {"name_constraints": permit("contoso.test")}, sans=[LEAF, "mx.fabrikam.test"]),
          {"name_constraints"}, {"name_constraints"}),
    Shape("nc-directory-name-outside", lambda r: chain_of(r, {"name_constraints": permit_dir("Fabrikam")}),
          {"name_constraints"}, {"name_constraints"}),
    Shape("nc-ip-outside", lambda r: chain_of(r, {"name_constraints": permit_ip("10.0.0.0/8")}, ips=["192.0.2.1"]),
          {"name_constraints"}, {"name_constraints"}),
    Shape("nc-on-root", lambda r: (lambda t: chain_of(t, {}, anchors=[t]))(
        ca(None, "Constrained Root", name_constraints=permit("fabrikam.test"))),
          {"name_constraints"}, {"name_constraints"}),
    # --- key usage / extended key usage for the role
    Shape("eku-server-only", lambda r: via(r, eku=[SERVER]), OK, P),
    Shape("eku-client-only", lambda r: via(r, eku=[CLIENT]), P, OK),
    Shape("eku-email-only", lambda r: via(r, eku=[EKU.EMAIL_PROTECTION]), P, P),
    Shape("eku-any-only", lambda r: via(r, eku=[EKU.ANY_EXTENDED_KEY_USAGE]), P, P),
    Shape("no-ku-no-eku", lambda r: via(r, eku=None), OK, OK),
    Shape("ku-digital-signature", lambda r: via(r, ku=key_usage("digital_signature")), OK, OK),
    Shape("ku-key-encipherment-only", lambda r: via(r, ku=key_usage("key_encipherment")), OK, P),
    Shape("ku-data-encipherment-only", lambda r: via(r, ku=key_usage("data_encipherment")), P, P),
    Shape("ku-key-agreement-only", lambda r: via(r, ku=key_usage("key_agreement")), OK, OK),
    Shape("ns-cert-type-client-only", lambda r: via(r, eku=None, extensions=[(ns_cert_type(0x80), False)]), P, OK),
    Shape("intermediate-eku-code-signing", lambda r: chain_of(r, {"eku": [EKU.CODE_SIGNING]}), P, P),
    Shape("intermediate-eku-server-only", lambda r: chain_of(r, {"eku": [SERVER]}), OK, P),
    Shape("email-leaf-under-code-signing-ca",  # two certificates, two failures
          lambda r: chain_of(r, {"eku": [EKU.CODE_SIGNING]}, eku=[EKU.EMAIL_PROTECTION]), P, P, lines=2),
    Shape("intermediate-not-ca", lambda r: chain_of(r, {"ca": False}), {"invalid_ca"}, {"invalid_ca"}),
    Shape("intermediate-no-basic-constraints", lambda r: chain_of(r, {"basic_constraints": False}),
          {"invalid_ca"}, {"invalid_ca"}),
    Shape("intermediate-ku-without-keycertsign",
          lambda r: chain_of(r, {"ku": key_usage("digital_signature", "crl_sign")}),
          {"invalid_ca"}, {"invalid_ca"}),
    # --- critical extensions
    Shape("leaf-unknown-critical", lambda r: via(r, extensions=[(unknown_extension(), True)]),
          {"critical_extension"}, {"critical_extension"}),
    Shape("leaf-unknown-non-critical", lambda r: via(r, extensions=[(unknown_extension(), False)]), OK, OK),
    Shape("intermediate-unknown-critical", lambda r: chain_of(r, {"extensions": [(unknown_extension(), True)]}),
          {"critical_extension"}, {"critical_extension"}),
    Shape("leaf-critical-policies", lambda r: via(r, extensions=[(x509.CertificatePolicies(
        [x509.PolicyInformation(x509.ObjectIdentifier("2.23.140.1.2.2"), None)]), True)]), OK, OK),
    # --- dates at each level
    Shape("leaf-expired", lambda r: via(r, not_before=PAST, not_after=NOW - DAY), {"expired"}, {"expired"}),
    Shape("leaf-not-yet-valid", lambda r: via(r, not_before=NOW + DAY, not_after=FUTURE),
          {"not_yet_valid"}, {"not_yet_valid"}),
    Shape("intermediate-expired", lambda r: chain_of(r, {"not_before": PAST, "not_after": NOW - DAY}),
          {"expired"}, {"expired"}),
    Shape("intermediate-not-yet-valid", lambda r: chain_of(r, {"not_before": NOW + DAY, "not_after": FUTURE}),
          {"not_yet_valid"}, {"not_yet_valid"}),
    Shape("root-expired", lambda r: (lambda t: chain_of(t, {}, anchors=[t]))(
        ca(None, "Old Root", not_before=PAST, not_after=NOW - DAY)), {"expired"}, {"expired"}),
    Shape("root-not-yet-valid", lambda r: (lambda t: chain_of(t, {}, anchors=[t]))(
        ca(None, "Future Root", not_before=NOW + DAY, not_after=FUTURE)), {"not_yet_valid"}, {"not_yet_valid"}),
    Shape("not-yet-valid-ca-and-name-constraints",  # OpenSSL stops at the date; cert check reports both
          lambda r: chain_of(r, {"not_before": NOW + DAY, "not_after": FUTURE, "name_constraints": permit("x.test")}),
          {"not_yet_valid", "name_constraints"}, {"not_yet_valid", "name_constraints"}),
    # --- CRLs (every level has one, OpenSSL -crl_check_all)
    Shape("crl-complete", with_crls, OK, OK),
    Shape("crl-with-root-and-intermediate-in-ca", lambda r: (lambda c: dataclasses.replace(
        c, chain=[], anchors=c.anchors + c.chain))(with_crls(r)), OK, OK),
    Shape("crl-leaf-revoked", lambda r: with_crls(r, revoke_leaf=True), {"revoked"}, {"revoked"}),
    Shape("crl-intermediate-revoked", lambda r: with_crls(r, revoke_inter=True), {"revoked"}, {"revoked"}),
    Shape("crl-scope-ca-certs-only", lambda r: with_crls(r, inter_crl={"extensions": [
        (idp(only_contains_ca_certs=True), True)]}), {"crl_scope"}, {"crl_scope"}),
    Shape("crl-scope-user-certs-only-for-leaf", lambda r: with_crls(r, inter_crl={"extensions": [
        (idp(only_contains_user_certs=True), True)]}), OK, OK),
    Shape("crl-scope-user-certs-only-for-ca", lambda r: with_crls(r, root_crl={"extensions": [
        (idp(only_contains_user_certs=True), True)]}), {"crl_scope"}, {"crl_scope"}),
    Shape("crl-scope-some-reasons", lambda r: with_crls(r, inter_crl={"extensions": [
        (idp(only_some_reasons=KEY_COMPROMISE), True)]}), {"crl_scope"}, {"crl_scope"}),
    Shape("crl-missing-for-intermediate", lambda r: (lambda c: dataclasses.replace(c, crls=c.crls[1:]))(with_crls(r)),
          {"crl_invalid"}, {"crl_invalid"}),
    Shape("crl-expired", lambda r: with_crls(r, inter_crl={"last_update": PAST, "next_update": NOW - DAY}),
          {"crl_expired"}, {"crl_expired"}),
    Shape("crl-not-yet-valid", lambda r: with_crls(r, inter_crl={"last_update": NOW + DAY, "next_update": FUTURE}),
          {"crl_not_yet_valid"}, {"crl_not_yet_valid"}),
    Shape("crl-bad-signature", lambda r: with_crls(r, inter_crl={"signer": ec.generate_private_key(ec.SECP256R1())}),
          {"crl_invalid"}, {"crl_invalid"}),
    Shape("crl-unknown-critical-extension", lambda r: with_crls(r, inter_crl={"extensions": [
        (unknown_extension(), True)]}), {"crl_unsupported"}, {"crl_unsupported"}),
    Shape("crl-issuer-without-crlsign", lambda r: with_crls(r, inter_kw={"ku": key_usage("key_cert_sign")}),
          {"crl_invalid"}, {"crl_invalid"}),
    Shape("crl-indirect", lambda r: with_crls(r, inter_crl={"extensions": [(idp(indirect_crl=True), True)]}),
          {"crl_unsupported"}, {"crl_unsupported"}),
    Shape("crl-delta-only", lambda r: with_crls(r, inter_crl={"extensions": DELTA}), OK, OK,
          stricter={"crl_unsupported"}),
    Shape("crl-base-and-delta-revoking-leaf", lambda r: (lambda c: dataclasses.replace(c, crls=c.crls + [
        make_crl(c.chain[0], [c.leaf.cert.serial_number], extensions=DELTA)]))(with_crls(r)), OK, OK,
          stricter={"crl_unsupported"}),
    Shape("crl-expired-leaf-also-revoked", lambda r: with_crls(r, revoke_leaf=True, leaf_kw={
        "not_before": PAST, "not_after": NOW - DAY}), {"expired", "revoked"}, {"expired", "revoked"}),
]

ROLE_PURPOSE = {"server": "sslserver", "client": "sslclient"}
PURPOSE_ROLES = {"server": ("server",), "client": ("client",), "both": ("server", "client")}
LINE = re.compile(r"^([a-z_]+): (\S.*)$")


def openssl_verify(files: dict[str, str | None], role: str) -> subprocess.CompletedProcess[str]:
    """The reference: the openssl binary with the plain command line of ``cert check``'s trust model."""
    cmd = [OPENSSL, "verify", "-CAfile", files["ca"], "-purpose", ROLE_PURPOSE[role]]
    if files["chain"]:
        cmd += ["-untrusted", files["chain"]]
    if files["crl"]:
        cmd += ["-crl_check_all", "-CRLfile", files["crl"]]
    return subprocess.run(cmd + [files["leaf"]], capture_output=True, text=True, timeout=60)


def cert_check(capsys: pytest.CaptureFixture[str], files: dict[str, str | None], purpose: str) -> tuple[int, list[str]]:
    parser = argparse.ArgumentParser(prog="milterd")
    register(parser.add_subparsers(dest="command", required=True))
    argv = ["cert", "check", files["cert"], "--ca", files["ca"], "--purpose", purpose]
    if files["crl"]:
        argv += ["--crl", files["crl"]]
    args = parser.parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    assert err == "", err
    return code, out.splitlines()


@pytest.fixture(scope="module")
def root() -> Issued:
    return ca(None, "Differential Root CA")


def test_at_least_30_distinct_shapes() -> None:
    assert len(SHAPES) >= 30 and len({s.id for s in SHAPES}) == len(SHAPES)
    kinds = {k for s in SHAPES for k in s.server | s.client | s.stricter}
    assert {"path_length", "name_constraints", "purpose", "critical_extension", "crl_scope", "expired",
            "not_yet_valid", "revoked", "crl_unsupported", "invalid_ca"} <= kinds


@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_cert_check_agrees_with_openssl_verify(shape: Shape, root: Issued, tmp_path: Path, capsys) -> None:
    case = shape.build(root)
    files: dict[str, str | None] = {
        "leaf": write(tmp_path / "leaf.pem", pem(case.leaf.cert)),
        "cert": write(tmp_path / "cert.pem", pem(case.leaf.cert, *(c.cert for c in case.chain))),
        "chain": write(tmp_path / "chain.pem", pem(*(c.cert for c in case.chain))) if case.chain else None,
        "ca": write(tmp_path / "ca.pem", pem(*(a.cert for a in case.anchors))),
        "crl": write(tmp_path / "crl.pem", pem(*case.crls)) if case.crls is not None else None,
    }
    expected = {"server": shape.server, "client": shape.client}
    openssl_ok = {}
    for role in ("server", "client"):
        proc = openssl_verify(files, role)
        openssl_ok[role] = proc.returncode == 0
        # The shape is what it says: OpenSSL accepts exactly the roles marked OK.
        assert openssl_ok[role] == (not expected[role]), (role, proc.stdout + proc.stderr)
    for purpose, roles in PURPOSE_ROLES.items():
        code, lines = cert_check(capsys, files, purpose)
        want = set().union(*(expected[r] for r in roles)) | shape.stricter
        if all(openssl_ok[r] for r in roles) and not shape.stricter:
            assert (code, lines) == (0, ["OK"]), (purpose, lines)
            continue
        # Refused (openssl refused, or a documented stricter choice): exit 1, one reason a line.
        assert code == 1, (purpose, lines)
        assert lines and len(lines) == len(set(lines)), lines
        parsed = [LINE.match(line) for line in lines]
        assert all(parsed), lines
        got = [m.group(1) for m in parsed if m]
        assert set(got) <= KEYWORDS, got
        assert set(got) == want, (purpose, lines)
        # One line per failure: OpenSSL errors about one thing (seen in several runs, or as
        # "invalid CA" + "no keyCertSign") are merged, so most shapes have one line per keyword.
        assert len(lines) == (shape.lines or len(want)), (purpose, lines)
        if shape.stricter:
            assert all(openssl_ok[r] for r in roles), "a stricter choice must be documented only where OpenSSL accepts"
