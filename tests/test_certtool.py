"""``milterd cert request|import|list|check`` and ``certificate_expiry`` against a PKI made here."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import NoEncryption, pkcs12
from cryptography.x509.oid import NameOID

from milterd.certs.check import check_certificate
from milterd.certs.cli import register
from milterd.certs.common import CertError, load_cert_file, pubkey_sha256_fingerprint
from milterd.certs.expiry import certificate_expiry
from milterd.certs.openssl import VerifyError, parse_verify_output
from milterd.core.config import parse_config
from milterd.core.partners import parse_pin
from milterd.lab.pki import TestPKI
from certtool_helpers import (
    DAY, NOW, OPENSSL, Issued, key_pem, make_ca, make_crl, make_leaf, openssl_pkcs12, pem, write,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="milterd")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    return parser


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    args = build_parser().parse_args(["cert", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def key_body(key: object) -> str:
    """The base64 body of a PEM private key, to prove it never reaches stdout/stderr."""
    text = key_pem(key).decode()  # type: ignore[arg-type]
    return "".join(line for line in text.splitlines() if "-----" not in line)[:60]


@pytest.fixture(scope="module")
def pki() -> dict[str, Issued]:
    root = make_ca("Lab Root CA")
    inter = make_ca("Lab Issuing CA", parent=root)
    return {
        "root": root,
        "inter": inter,
        "other_root": make_ca("Other Root CA"),
        "good": make_leaf(root, "mail.woodgrovebank.test"),
        "via_inter": make_leaf(inter, "mx.contoso.test"),
    }


@pytest.fixture()
def umask0():
    """Run with umask 0 so a file's mode can only come from the code, never from the umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- wiring


def test_register_adds_cert_with_four_subcommands() -> None:
    parser = build_parser()
    for sub in ("request", "import", "list", "check"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["cert", sub, "--help"])
        assert exc.value.code == 0
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["cert"])
    assert exc.value.code == 2
    args = parser.parse_args(["cert", "check", "x.pem"])
    assert callable(args.func)


# --------------------------------------------------------------------------- request


def test_request_default_rsa3072_openssl_verifies(tmp_path: Path, capsys, umask0) -> None:
    out_dir = tmp_path / "req"
    code, out, err = run(capsys, "request", "--subject", "CN=mail1.contoso.com,O=Contoso,DC=contoso,DC=com",
                         "--san", "mail.contoso.com", "--out", str(out_dir))
    assert code == 0, err
    key_path, csr_path = out_dir / "mail1.contoso.com.key", out_dir / "mail1.contoso.com.csr"
    assert mode(key_path) == 0o600
    assert mode(out_dir) == 0o700
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 3072
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "CN=mail1.contoso.com,O=Contoso,DC=contoso,DC=com"
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # The CN was not among the --san values, so it was added (first) and the user was told.
    assert sans.get_values_for_type(x509.DNSName) == ["mail1.contoso.com", "mail.contoso.com"]
    assert "added the CN mail1.contoso.com" in err
    eku = csr.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {o.dotted_string for o in eku} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}
    proc = subprocess.run([OPENSSL, "req", "-verify", "-noout", "-in", str(csr_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "verify OK" in proc.stdout + proc.stderr
    assert "PRIVATE KEY" not in out + err and key_body(key) not in out + err


def test_request_ec_key_and_cn_already_a_san(tmp_path: Path, capsys, umask0) -> None:
    code, out, err = run(capsys, "request", "--subject", "CN=MX.Contoso.test", "--san", "mx.contoso.test",
                         "--san", "*.contoso.test", "--key", "ec:p256", "--out", str(tmp_path))
    assert code == 0, err
    assert "added the CN" not in err
    key = serialization.load_pem_private_key((tmp_path / "mx.contoso.test.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert mode(tmp_path / "mx.contoso.test.key") == 0o600
    csr = x509.load_pem_x509_csr((tmp_path / "mx.contoso.test.csr").read_bytes())
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["mx.contoso.test", "*.contoso.test"]
    proc = subprocess.run([OPENSSL, "req", "-verify", "-noout", "-in", str(tmp_path / "mx.contoso.test.csr")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_request_escaped_subject_round_trips(tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "request", "--subject", r"CN=mx.contoso.test,O=Contoso\, Ltd.,C=US",
                       "--key", "ec:p256", "--out", str(tmp_path))
    assert code == 0, err
    csr = x509.load_pem_x509_csr((tmp_path / "mx.contoso.test.csr").read_bytes())
    assert csr.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Contoso, Ltd."
    assert csr.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "US"


@pytest.mark.parametrize("subject, words", [
    ("CN=mx.contoso.test,FOO=bar", ["unknown attribute type", "FOO=bar"]),
    ("CN=mx.contoso.test,Contoso", ["'Contoso'", "not TYPE=value"]),
    ("CN=mx.contoso.test,,O=x", ["empty RDN"]),
    ("CN=mx.contoso.test,C=USA", ["C='USA'", "two-letter"]),
    ("CN=mx.contoso.test,O=", ["empty value", "O="]),
    ("CN=mx.contoso.test,DC=con toso", ["DC='con toso'"]),
    ("CN=a.test,CN=b.test", ["2 CNs"]),
    ("", ["empty"]),
    ("CN=" + "a" * 65, ["longer than 64"]),
])
def test_request_bad_subject_exit2_names_the_part(tmp_path: Path, capsys, subject: str, words: list[str]) -> None:
    code, out, err = run(capsys, "request", "--subject", subject, "--key", "ec:p256", "--out", str(tmp_path / "o"))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err
    assert not (tmp_path / "o").exists()  # nothing written on a refused request


def test_request_bad_san_and_key_and_no_name(tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "request", "--subject", "O=Contoso", "--san", "bad name.test", "--out", str(tmp_path))
    assert code == 2 and "'bad name.test'" in err
    code, _, err = run(capsys, "request", "--subject", "CN=a.test", "--key", "dsa:1024", "--out", str(tmp_path))
    assert code == 2 and "'dsa:1024'" in err
    code, _, err = run(capsys, "request", "--subject", "O=Contoso", "--out", str(tmp_path))
    assert code == 2 and "no host name" in err


def test_request_never_overwrites(tmp_path: Path, capsys) -> None:
    (tmp_path / "mx.contoso.test.key").write_text("precious")
    code, _, err = run(capsys, "request", "--subject", "CN=mx.contoso.test", "--key", "ec:p256", "--out", str(tmp_path))
    assert code == 2 and "already exists" in err
    assert (tmp_path / "mx.contoso.test.key").read_text() == "precious"
    assert not (tmp_path / "mx.contoso.test.csr").exists()


# --------------------------------------------------------------------------- import


def test_import_openssl_pfx_without_password(tmp_path: Path, capsys, pki, umask0) -> None:
    leaf = make_leaf(pki["inter"], "mail.woodgrovebank.test")
    pfx = openssl_pkcs12(tmp_path, leaf, [pki["inter"].cert, pki["root"].cert])
    store = tmp_path / "store"
    code, out, err = run(capsys, "import", str(pfx), "--store", str(store))
    assert code == 0, err
    thumb = leaf.cert.fingerprint(hashes.SHA1()).hex().upper()
    assert "SHA-1 thumbprint: %s" % thumb in out
    assert "issuer SHA-1 %s" % pki["inter"].cert.fingerprint(hashes.SHA1()).hex().upper() in out
    assert leaf.cert.fingerprint(hashes.SHA256()).hex().upper()[:8] in out.replace(":", "")
    assert mode(store / (thumb + ".key")) == 0o600
    assert mode(store) == 0o700
    stored_key = serialization.load_pem_private_key((store / (thumb + ".key")).read_bytes(), None)
    assert stored_key.public_key().public_numbers() == leaf.key.public_key().public_numbers()
    chain = x509.load_pem_x509_certificates((store / (thumb + ".pem")).read_bytes())
    assert chain == [leaf.cert, pki["inter"].cert, pki["root"].cert]  # leaf first, then issuers
    assert "PRIVATE KEY" not in out + err and key_body(leaf.key) not in out + err
    # Importing the same file again is harmless.
    code, out, _ = run(capsys, "import", str(pfx), "--store", str(store))
    assert code == 0 and "already in the store" in out


def test_import_password_file_and_wrong_password(tmp_path: Path, capsys, pki) -> None:
    secret = "S3cret-pfx-pass!"
    leaf = make_leaf(pki["root"], "mail.woodgrovebank.test")
    pfx = openssl_pkcs12(tmp_path, leaf, [pki["root"].cert], password=secret)
    pw_file = tmp_path / "pw"
    pw_file.write_text(secret + "\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password-xyz\n")
    code, out, err = run(capsys, "import", str(pfx), "--password-file", str(wrong), "--store", str(tmp_path / "s"))
    assert code == 2 and "wrong password" in err
    assert "not-the-password-xyz" not in out + err
    code, out, err = run(capsys, "import", str(pfx), "--store", str(tmp_path / "s"))
    assert code == 2 and "--password-file" in err
    code, out, err = run(capsys, "import", str(pfx), "--password-file", str(pw_file), "--store", str(tmp_path / "s"))
    assert code == 0, err
    assert secret not in out + err
    assert key_body(leaf.key) not in out + err
    thumb = leaf.cert.fingerprint(hashes.SHA1()).hex().upper()
    assert (tmp_path / "s" / (thumb + ".pem")).exists()


def test_import_legacy_encrypted_pfx(tmp_path: Path, capsys, pki) -> None:
    """Older Windows/Exchange exports use RC2/3DES (openssl -legacy); those import as well."""
    leaf = make_leaf(pki["root"], "legacy.woodgrovebank.test")
    try:
        pfx = openssl_pkcs12(tmp_path, leaf, [pki["root"].cert], password="old-pass", extra_args=["-legacy"])
    except subprocess.CalledProcessError:
        pytest.skip("this openssl has no legacy provider")
    code, out, err = run(capsys, "import", str(pfx), "--password-file", str(tmp_path / "bundle-password.txt"),
                         "--store", str(tmp_path / "s"))
    assert code == 0, err
    assert "old-pass" not in out + err
    assert leaf.cert.fingerprint(hashes.SHA1()).hex().upper() in out


def test_import_refuses_expired(tmp_path: Path, capsys, pki) -> None:
    leaf = make_leaf(pki["root"], "old.woodgrovebank.test", not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    pfx = openssl_pkcs12(tmp_path, leaf, [pki["root"].cert])
    code, out, err = run(capsys, "import", str(pfx), "--store", str(tmp_path / "s"))
    assert code == 1 and "expired" in err
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").iterdir())


def test_import_refuses_key_mismatch(tmp_path: Path, capsys, pki) -> None:
    leaf = make_leaf(pki["root"], "mail.woodgrovebank.test")
    stranger = ec.generate_private_key(ec.SECP256R1())
    # openssl itself refuses to bundle a mismatched key, so build the bag directly.
    data = pkcs12.serialize_key_and_certificates(b"x", stranger, None, [leaf.cert, pki["root"].cert], NoEncryption())
    pfx = tmp_path / "mismatch.pfx"
    pfx.write_bytes(data)
    code, out, err = run(capsys, "import", str(pfx), "--store", str(tmp_path / "s"))
    assert code == 1 and "does not match" in err
    assert key_body(stranger) not in out + err
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").iterdir())


def test_import_garbage_and_missing(tmp_path: Path, capsys) -> None:
    junk = tmp_path / "junk.pfx"
    junk.write_bytes(b"\x00not a pfx")
    code, _, err = run(capsys, "import", str(junk), "--store", str(tmp_path / "s"))
    assert code == 2 and "junk.pfx" in err and "Traceback" not in err
    code, _, err = run(capsys, "import", str(tmp_path / "missing.pfx"), "--store", str(tmp_path / "s"))
    assert code == 2 and "cannot read" in err


# --------------------------------------------------------------------------- list


def test_list_table_json_and_config_usage(tmp_path: Path, capsys, pki) -> None:
    store = tmp_path / "store"
    store.mkdir()
    good = make_leaf(pki["root"], "mail.woodgrovebank.test", ["mail.woodgrovebank.test", "mx.woodgrovebank.test"],
                     not_after=NOW + 30 * DAY + dt.timedelta(hours=1))
    write(store / "good.pem", pem(good.cert, pki["root"].cert))
    (store / "broken.crt").write_text("not a certificate")
    (store / "notes.txt").write_text("ignored")
    outside = make_leaf(pki["root"], "relay.contoso.test")
    (tmp_path / "tls").mkdir()
    write(tmp_path / "tls" / "relay.crt", pem(outside.cert))
    cfg = tmp_path / "milterd.toml"
    cfg.write_text('[tls]\ncert_file = "%s"\nextra = ["tls/relay.crt"]\n[milter]\nlisten = "unix:/x.sock"\n'
                   % (store / "good.pem"))

    code, out, err = run(capsys, "list", "--store", str(store), "-c", str(cfg), "--json")
    assert code == 0
    assert "broken.crt" in err  # unreadable files are reported, not fatal
    rows = {Path(r["path"]).name: r for r in json.loads(out)}
    assert set(rows) == {"good.pem", "relay.crt"}
    g = rows["good.pem"]
    assert g["sha1"] == good.cert.fingerprint(hashes.SHA1()).hex().upper()
    assert g["sha256"] == ":".join("%02X" % b for b in good.cert.fingerprint(hashes.SHA256()))
    assert g["subject"] == "CN=mail.woodgrovebank.test,O=Woodgrove Bank"
    assert g["issuer"] == "CN=Lab Root CA,O=Lab"
    assert g["sans"] == ["mail.woodgrovebank.test", "mx.woodgrovebank.test"]
    assert g["days_left"] == 30
    assert g["chain"] == 2
    assert g["used_by"] == ["tls.cert_file"]
    assert rows["relay.crt"]["used_by"] == ["tls.extra[0]"]  # relative to the config file

    code, out, _ = run(capsys, "list", "--store", str(store), "-c", str(cfg))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["SHA1", "THUMBPRINT"]
    good_line = next(line for line in lines if g["sha1"] in line)
    assert "tls.cert_file" in good_line and " 30 " in good_line and g["sha256"] in good_line


def test_list_missing_store_and_bad_config(tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "list", "--store", str(tmp_path / "nope"))
    assert code == 2 and "nope" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("[tls\n")
    code, _, err = run(capsys, "list", "--store", str(tmp_path), "-c", str(bad))
    assert code == 2 and "bad.toml" in err and "Traceback" not in err
    code, out, _ = run(capsys, "list", "--store", str(tmp_path))
    assert code == 0 and "no certificates found" in out


# --------------------------------------------------------------------------- check


def check(capsys, tmp_path: Path, leaf_pem: bytes, ca_pem: bytes | None, *extra: str) -> tuple[int, list[str]]:
    cert_file = write(tmp_path / "leaf.pem", leaf_pem)
    argv = ["check", cert_file]
    if ca_pem is not None:
        argv += ["--ca", write(tmp_path / "ca.pem", ca_pem)]
    code, out, err = run(capsys, *argv, *extra)
    assert "Traceback" not in err
    return code, out.splitlines()


def keywords(lines: list[str]) -> list[str]:
    return sorted(line.split(":", 1)[0] for line in lines)


def test_check_good_certificate_ok(tmp_path: Path, capsys, pki) -> None:
    crl = write(tmp_path / "crl.pem", pem(make_crl(pki["root"], revoked=[12345])))
    code, lines = check(capsys, tmp_path, pem(pki["good"].cert), pem(pki["root"].cert),
                        "--crl", crl, "--name", "MAIL.woodgrovebank.test.")
    assert (code, lines) == (0, ["OK"])


def test_check_revoked(tmp_path: Path, capsys, pki) -> None:
    leaf = make_leaf(pki["root"], "mail.woodgrovebank.test", serial=0x5EED)
    crl = write(tmp_path / "crl.pem", pem(make_crl(pki["root"], revoked=[1, 0x5EED])))
    code, lines = check(capsys, tmp_path, pem(leaf.cert), pem(pki["root"].cert), "--crl", crl)
    assert code == 1 and keywords(lines) == ["revoked"]
    # A DER CRL works the same way.
    der = write(tmp_path / "crl.der", make_crl(pki["root"], revoked=[0x5EED]).public_bytes(serialization.Encoding.DER))
    code, lines = check(capsys, tmp_path, pem(leaf.cert), pem(pki["root"].cert), "--crl", der)
    assert code == 1 and keywords(lines) == ["revoked"]


def test_check_expired(tmp_path: Path, capsys, pki) -> None:
    leaf = make_leaf(pki["root"], "mail.woodgrovebank.test", not_before=NOW - 100 * DAY, not_after=NOW - DAY)
    code, lines = check(capsys, tmp_path, pem(leaf.cert), pem(pki["root"].cert))
    assert code == 1 and keywords(lines) == ["expired"]


def test_check_not_yet_valid(tmp_path: Path, capsys, pki) -> None:
    leaf = make_leaf(pki["root"], "mail.woodgrovebank.test", not_before=NOW + DAY, not_after=NOW + 10 * DAY)
    code, lines = check(capsys, tmp_path, pem(leaf.cert), pem(pki["root"].cert))
    assert code == 1 and keywords(lines) == ["not_yet_valid"]


def test_check_wrong_name(tmp_path: Path, capsys, pki) -> None:
    code, lines = check(capsys, tmp_path, pem(pki["good"].cert), pem(pki["root"].cert),
                        "--name", "mail.contoso.test")
    assert code == 1 and keywords(lines) == ["name_mismatch"]
    assert "mail.woodgrovebank.test" in lines[0]


def test_check_lists_every_failure(tmp_path: Path, capsys, pki) -> None:
    leaf = make_leaf(pki["root"], "mail.woodgrovebank.test", not_before=NOW - 100 * DAY, not_after=NOW - DAY,
                     serial=777)
    crl = write(tmp_path / "crl.pem", pem(make_crl(pki["root"], revoked=[777])))
    code, lines = check(capsys, tmp_path, pem(leaf.cert), pem(pki["root"].cert),
                        "--crl", crl, "--name", "evil.test")
    assert code == 1
    assert keywords(lines) == ["expired", "name_mismatch", "revoked"]
    assert len(lines) == 3


def test_check_untrusted_with_unverifiable_crl(tmp_path: Path, capsys, pki) -> None:
    """Against the wrong CA the CRL's issuer certificate is unknown: the CRL cannot be believed."""
    leaf = make_leaf(pki["root"], "mail.woodgrovebank.test", serial=778)
    crl = write(tmp_path / "crl.pem", pem(make_crl(pki["root"], revoked=[778])))
    code, lines = check(capsys, tmp_path, pem(leaf.cert), pem(pki["other_root"].cert), "--crl", crl)
    assert code == 1 and keywords(lines) == ["crl_invalid", "untrusted"]


def test_check_untrusted_and_self_signed(tmp_path: Path, capsys, pki) -> None:
    code, lines = check(capsys, tmp_path, pem(pki["good"].cert), pem(pki["other_root"].cert))
    assert code == 1 and keywords(lines) == ["untrusted"]
    # A self-signed certificate carrying the partner's name and the trusted CA's *name*.
    fake_root = make_ca("Lab Root CA")  # same subject as the real root, different key
    forged = make_leaf(fake_root, "mail.woodgrovebank.test")
    code, lines = check(capsys, tmp_path, pem(forged.cert, fake_root.cert), pem(pki["root"].cert))
    assert code == 1 and keywords(lines) == ["untrusted"]


def test_check_intermediate_from_cert_file_or_ca_bundle(tmp_path: Path, capsys, pki) -> None:
    leaf = pki["via_inter"]
    code, lines = check(capsys, tmp_path, pem(leaf.cert, pki["inter"].cert), pem(pki["root"].cert),
                        "--name", "mx.contoso.test")
    assert (code, lines) == (0, ["OK"])
    code, lines = check(capsys, tmp_path, pem(leaf.cert), pem(pki["root"].cert, pki["inter"].cert))
    assert (code, lines) == (0, ["OK"])
    code, lines = check(capsys, tmp_path, pem(leaf.cert), pem(pki["root"].cert))  # intermediate missing
    assert code == 1 and keywords(lines) == ["untrusted"]


def test_check_leaf_cannot_act_as_ca(tmp_path: Path, capsys, pki) -> None:
    """A non-CA leaf used as an 'intermediate' must not make a chain (one line, not one per check)."""
    sub = make_leaf(Issued(pki["good"].cert, pki["good"].key), "mail.evil.test")
    code, lines = check(capsys, tmp_path, pem(sub.cert, pki["good"].cert), pem(pki["root"].cert))
    assert code == 1 and keywords(lines) == ["invalid_ca"]
    assert "issuing CA CN=mail.woodgrovebank.test" in lines[0] and "CA:FALSE" in lines[0]


def test_check_expired_intermediate(tmp_path: Path, capsys, pki) -> None:
    inter = make_ca("Old Issuing CA", parent=pki["root"], not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    leaf = make_leaf(inter, "mx.contoso.test")
    code, lines = check(capsys, tmp_path, pem(leaf.cert, inter.cert), pem(pki["root"].cert))
    assert code == 1 and keywords(lines) == ["expired"] and "Old Issuing CA" in lines[0]


def test_check_crl_problems(tmp_path: Path, capsys, pki) -> None:
    leaf = pki["good"]
    forged = write(tmp_path / "forged.pem", pem(make_crl(pki["root"], signer=ec.generate_private_key(ec.SECP256R1()))))
    code, lines = check(capsys, tmp_path, pem(leaf.cert), pem(pki["root"].cert), "--crl", forged)
    assert code == 1 and keywords(lines) == ["crl_invalid"] and "signature" in lines[0]
    # A forged CRL that "revokes" the certificate is not believed either.
    forged2 = write(tmp_path / "forged2.pem", pem(make_crl(pki["root"], [leaf.cert.serial_number],
                                                           signer=ec.generate_private_key(ec.SECP256R1()))))
    code, lines = check(capsys, tmp_path, pem(leaf.cert), pem(pki["root"].cert), "--crl", forged2)
    assert keywords(lines) == ["crl_invalid"]
    stale = write(tmp_path / "stale.pem", pem(make_crl(pki["root"], next_update=NOW - DAY)))
    code, lines = check(capsys, tmp_path, pem(leaf.cert), pem(pki["root"].cert), "--crl", stale)
    assert code == 1 and keywords(lines) == ["crl_expired"]
    wrong_issuer = write(tmp_path / "other.pem", pem(make_crl(pki["other_root"])))
    code, lines = check(capsys, tmp_path, pem(leaf.cert), pem(pki["root"].cert), "--crl", wrong_issuer)
    assert code == 1 and keywords(lines) == ["crl_invalid"]
    junk = write(tmp_path / "junk.crl", b"junk")
    code, lines = check(capsys, tmp_path, pem(leaf.cert), pem(pki["root"].cert), "--crl", junk)
    assert code == 1 and keywords(lines) == ["crl_invalid"]


def test_check_revoked_intermediate(tmp_path: Path, capsys, pki) -> None:
    inter = make_ca("Revoked Issuing CA", parent=pki["root"])
    leaf = make_leaf(inter, "mx.contoso.test")
    crls = write(tmp_path / "crls.pem", pem(make_crl(pki["root"], [inter.cert.serial_number]), make_crl(inter)))
    code, lines = check(capsys, tmp_path, pem(leaf.cert, inter.cert), pem(pki["root"].cert), "--crl", crls)
    assert code == 1 and keywords(lines) == ["revoked"] and "Revoked Issuing CA" in lines[0]


def test_check_names_wildcard_and_cn_fallback(tmp_path: Path, capsys, pki) -> None:
    wild = make_leaf(pki["root"], "wild", ["*.woodgrovebank.test"])
    ca = pem(pki["root"].cert)
    assert check(capsys, tmp_path, pem(wild.cert), ca, "--name", "mail.woodgrovebank.test")[0] == 0
    assert check(capsys, tmp_path, pem(wild.cert), ca, "--name", "a.mail.woodgrovebank.test")[0] == 1
    assert check(capsys, tmp_path, pem(wild.cert), ca, "--name", "woodgrovebank.test")[0] == 1
    # CN consulted only when there are no DNS SANs.
    cn_only = make_leaf(pki["root"], "legacy.woodgrovebank.test", [])
    assert check(capsys, tmp_path, pem(cn_only.cert), ca, "--name", "legacy.woodgrovebank.test")[0] == 0
    san_differs = make_leaf(pki["root"], "cn.woodgrovebank.test", ["san.woodgrovebank.test"])
    assert check(capsys, tmp_path, pem(san_differs.cert), ca, "--name", "cn.woodgrovebank.test")[0] == 1


def test_check_user_errors_exit2(tmp_path: Path, capsys, pki) -> None:
    code, out, err = run(capsys, "check", str(tmp_path / "none.pem"))
    assert code == 2 and "cannot read" in err
    leaf = write(tmp_path / "l.pem", pem(pki["good"].cert))
    code, out, err = run(capsys, "check", leaf, "--name", "bad host")
    assert code == 2 and "'bad host'" in err
    notcert = write(tmp_path / "k.pem", key_pem(pki["good"].key))
    code, out, err = run(capsys, "check", notcert)
    assert code == 2 and "no readable certificate" in err
    assert key_body(pki["good"].key) not in out + err


def test_check_certificate_function_direct(pki) -> None:
    good = pki["good"]
    assert check_certificate(good.cert, [], [pki["root"].cert], None, "mail.woodgrovebank.test") == []
    fails = check_certificate(good.cert, [], [], None, None)
    assert [k for k, _ in fails] == ["untrusted"]
    later = NOW + 200 * DAY  # the leaf is valid for 90 days
    assert [k for k, _ in check_certificate(good.cert, [], [pki["root"].cert], now=later)] == ["expired"]


# --------------------------------------------------------------------------- expiry gauge feed


def test_certificate_expiry(tmp_path: Path, pki, caplog) -> None:
    a = write(tmp_path / "a.pem", pem(pki["good"].cert, pki["root"].cert))
    bad = write(tmp_path / "bad.pem", b"nope")
    missing = str(tmp_path / "missing.pem")
    with caplog.at_level(logging.WARNING, logger="milterd.cert"):
        rows = certificate_expiry([a, bad, missing])
    assert rows == [
        (a, "CN=mail.woodgrovebank.test,O=Woodgrove Bank", pki["good"].cert.not_valid_after_utc.timestamp()),
        (a, "CN=Lab Root CA,O=Lab", pki["root"].cert.not_valid_after_utc.timestamp()),
    ]
    warned = " ".join(r.getMessage() for r in caplog.records if r.name == "milterd.cert")
    assert "bad.pem" in warned and "missing.pem" in warned


def test_check_without_ca_uses_system_bundle_not_the_lab_root(tmp_path: Path, capsys, pki) -> None:
    """Without --ca only the system bundle is trusted; our private lab root is not in it."""
    code, out, err = run(capsys, "check", write(tmp_path / "l.pem", pem(pki["good"].cert)))
    assert code == 1 and out.startswith("untrusted: ")


def test_check_self_signed_leaf_trusted_only_when_listed(tmp_path: Path, capsys) -> None:
    """A self-signed peer certificate named in --ca is trusted as itself; not otherwise."""
    from cryptography.x509.oid import NameOID as N
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(N.COMMON_NAME, "mx.partner.test")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.partner.test")]), critical=False)
            .sign(key, hashes.SHA256()))
    code, lines = check(capsys, tmp_path, pem(cert), pem(cert), "--name", "mx.partner.test")
    assert (code, lines) == (0, ["OK"])
    other = make_ca("Other")
    code, lines = check(capsys, tmp_path, pem(cert), pem(other.cert), "--name", "mx.partner.test")
    assert code == 1 and keywords(lines) == ["untrusted"]


# --------------------------------------------------------------------------- directories 0700


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_request_and_import_make_every_new_directory_0700(tmp_path: Path, capsys, pki, umask: int) -> None:
    """Every directory created on the way to --out/--store is 0700, whatever the umask;
    directories that already existed keep their mode."""
    tmp_path.chmod(0o755)
    old = os.umask(umask)
    try:
        out = tmp_path / "new" / "deeper" / "req"
        code, _, err = run(capsys, "request", "--subject", "CN=mx.contoso.test", "--key", "ec:p256", "--out", str(out))
        assert code == 0, err
        leaf = make_leaf(pki["inter"], "mail.woodgrovebank.test")
        pfx = openssl_pkcs12(tmp_path, leaf, [pki["inter"].cert])
        store = tmp_path / "new" / "store" / "certs"
        code, _, err = run(capsys, "import", str(pfx), "--store", str(store))
        assert code == 0, err
    finally:
        os.umask(old)
    for d in (tmp_path / "new", tmp_path / "new" / "deeper", out, tmp_path / "new" / "store", store):
        assert mode(d) == 0o700, d
    assert mode(tmp_path) == 0o755


def test_request_out_is_a_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "f").write_text("x")
    code, _, err = run(capsys, "request", "--subject", "CN=mx.contoso.test", "--key", "ec:p256",
                       "--out", str(tmp_path / "f" / "sub"))
    assert code == 2 and "cannot create directory" in err


# --------------------------------------------------------------------------- check: OpenSSL, purposes


def test_check_purpose_option(tmp_path: Path, capsys, pki) -> None:
    """--purpose picks the roles; the default is both, and one line names every role refused."""
    from certtool_helpers import make_cert
    from cryptography.x509.oid import ExtendedKeyUsageOID as EKU
    server_only = make_cert(pki["root"], "mx.contoso.test", eku=[EKU.SERVER_AUTH])
    email_only = make_cert(pki["root"], "mx.contoso.test", eku=[EKU.EMAIL_PROTECTION])
    ca = pem(pki["root"].cert)
    assert check(capsys, tmp_path, pem(server_only.cert), ca, "--purpose", "server") == (0, ["OK"])
    code, lines = check(capsys, tmp_path, pem(server_only.cert), ca)  # default: both
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("purpose: CN=mx.contoso.test,O=Lab is not usable as a TLS client certificate"
                               " (extendedKeyUsage serverAuth)")
    code, lines = check(capsys, tmp_path, pem(email_only.cert), ca, "--purpose", "both")
    assert code == 1 and len(lines) == 1
    assert "not usable as a TLS server or TLS client certificate (extendedKeyUsage emailProtection)" in lines[0]
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["cert", "check", "x.pem", "--purpose", "smtp"])
    assert exc.value.code == 2
    with pytest.raises(CertError):
        check_certificate(server_only.cert, [], [pki["root"].cert], purpose="smtp")


def _fake_openssl(tmp_path: Path, version: str, verify_output: str, verify_rc: int) -> str:
    script = tmp_path / "fake-openssl"
    script.write_text("#!/bin/sh\nif [ \"$1\" = version ]; then echo '%s'; exit 0; fi\necho '%s'\nexit %d\n"
                      % (version, verify_output, verify_rc))
    script.chmod(0o755)
    return str(script)


def test_check_never_ok_when_openssl_fails_without_a_parsable_reason(tmp_path: Path, capsys, pki, monkeypatch) -> None:
    monkeypatch.setenv("MILTERD_OPENSSL", _fake_openssl(tmp_path, "OpenSSL 3.9.9 fake", "something new", 1))
    code, lines = check(capsys, tmp_path, pem(pki["good"].cert), pem(pki["root"].cert))
    assert code == 1 and lines == ["refused: openssl verify refused it: something new"]


def test_check_needs_openssl_3(tmp_path: Path, capsys, pki, monkeypatch) -> None:
    leaf = write(tmp_path / "l.pem", pem(pki["good"].cert))
    ca = write(tmp_path / "ca.pem", pem(pki["root"].cert))
    monkeypatch.setenv("MILTERD_OPENSSL", str(tmp_path / "no-such-openssl"))
    code, out, err = run(capsys, "check", leaf, "--ca", ca)
    assert code == 2 and out == "" and "needs the openssl command" in err and "Traceback" not in err
    monkeypatch.setenv("MILTERD_OPENSSL", _fake_openssl(tmp_path, "OpenSSL 1.1.1w  11 Sep 2023", "", 0))
    code, out, err = run(capsys, "check", leaf, "--ca", ca)
    assert code == 2 and out == "" and "needs OpenSSL 3.0 or later" in err


def test_parse_verify_output() -> None:
    text = ("CN=Inter,O=Lab\nerror 10 at 1 depth lookup: certificate has expired\n"
            "CN=Root,O=Lab\n[CRL path] error 8 at 0 depth lookup: CRL signature failure\n"
            "error 20 at 0 depth lookup: unable to get local issuer certificate\n"
            "error leaf.pem: verification failed\n")
    assert parse_verify_output(text) == [
        VerifyError(10, 1, "CN=Inter,O=Lab", "certificate has expired"),
        VerifyError(8, 0, "CN=Root,O=Lab", "CRL signature failure", crl_path=True),
        VerifyError(20, 0, None, "unable to get local issuer certificate"),
    ]


def test_check_through_the_milterd_command(tmp_path: Path, pki) -> None:
    """The real entry point: ``python -m milterd cert check --purpose client``."""
    import sys
    from certtool_helpers import make_cert
    from cryptography.x509.oid import ExtendedKeyUsageOID as EKU
    server_only = make_cert(pki["root"], "mx.contoso.test", eku=[EKU.SERVER_AUTH])
    leaf = write(tmp_path / "l.pem", pem(server_only.cert))
    ca = write(tmp_path / "ca.pem", pem(pki["root"].cert))
    base = [sys.executable, "-m", "milterd", "cert", "check", leaf, "--ca", ca]
    proc = subprocess.run(base + ["--purpose", "server"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "OK\n"), proc.stderr
    proc = subprocess.run(base + ["--purpose", "client"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout.startswith("purpose: "), proc.stdout + proc.stderr


# --------------------------------------------------------------------------- partner pins (#15)

PIN_LINE = re.compile(r'^  pin \((certificate|public key)\): +"([^"]*)"$')


def openssl_pins(cert_file: Path | str) -> tuple[str, str]:
    """The two pins as the system openssl computes them (first certificate in the file)."""
    fp = subprocess.run([OPENSSL, "x509", "-noout", "-fingerprint", "-sha256", "-in", str(cert_file)],
                        capture_output=True, text=True, timeout=60, check=True).stdout
    label, cert_hex = fp.strip().split("=", 1)  # "sha256 Fingerprint=AB:CD:…"
    assert label.lower() == "sha256 fingerprint", fp
    spki_pem = subprocess.run([OPENSSL, "x509", "-noout", "-pubkey", "-in", str(cert_file)],
                              capture_output=True, timeout=60, check=True).stdout
    spki_der = subprocess.run([OPENSSL, "pkey", "-pubin", "-outform", "DER"], input=spki_pem,
                              capture_output=True, timeout=60, check=True).stdout
    digest = subprocess.run([OPENSSL, "dgst", "-sha256", "-r"], input=spki_der,
                            capture_output=True, timeout=60, check=True).stdout.decode().split()[0]
    assert len(digest) == 64, digest
    key_hex = ":".join(digest[i:i + 2] for i in range(0, 64, 2)).upper()
    return "cert-sha256:" + cert_hex.upper(), "key-sha256:" + key_hex


def printed_pins(lines: list[str]) -> list[tuple[str, str]]:
    """(cert pin, key pin) of every pin pair in the output, in order; the pair is always
    certificate then public key, on consecutive lines, and every value parses as its kind."""
    pairs = []
    i = 0
    while i < len(lines):
        m = PIN_LINE.match(lines[i])
        if not m:
            i += 1
            continue
        assert m.group(1) == "certificate", "a key pin line without its certificate pin line: %r" % lines
        k = PIN_LINE.match(lines[i + 1]) if i + 1 < len(lines) else None
        assert k and k.group(1) == "public key", lines
        pair = (m.group(2), k.group(2))
        assert parse_pin(pair[0]) == ("cert", pair[0].split(":", 1)[1]), pair
        assert parse_pin(pair[1]) == ("key", pair[1].split(":", 1)[1]), pair
        pairs.append(pair)
        i += 2
    return pairs


@pytest.fixture()
def reissued(tmp_path: Path) -> dict[str, Any]:
    """A lab CA, a leaf, the same leaf re-issued for the same key, and one with a new key."""
    lab = TestPKI(tmp_path / "pki", "Contoso Lab CA", "Contoso")
    old = lab.issue("old", "mx.contoso.test")
    new = lab.issue("new", "mx.contoso.test", key=old.key)
    other = lab.issue("other", "mx.contoso.test")
    assert new.cert != old.cert and new.cert.public_key() == old.cert.public_key()
    return {"lab": lab, "old": old, "new": new, "other": other}


def test_list_prints_both_pins_as_openssl_computes_them(tmp_path: Path, capsys, reissued) -> None:
    lab = reissued["lab"]
    store = tmp_path / "store"
    store.mkdir()
    for stem in ("old", "new", "other"):  # leaf + CA: the pins are the leaf's
        write(store / ("%s.pem" % stem), reissued[stem].cert_path.read_bytes() + lab.ca_path.read_bytes())
    write(store / "ca.crt", lab.ca_path.read_bytes())
    expected = {name: openssl_pins(store / name) for name in ("old.pem", "new.pem", "other.pem", "ca.crt")}

    code, out, err = run(capsys, "list", "--store", str(store), "--json")
    assert code == 0 and err == ""
    rows = {Path(r["path"]).name: r for r in json.loads(out)}
    assert set(rows) == set(expected)
    for name, r in rows.items():
        assert (r["cert_pin"], r["key_pin"]) == expected[name], name
        assert parse_pin(r["cert_pin"]) == ("cert", r["sha256"])
        assert parse_pin(r["key_pin"]) == ("key", pubkey_sha256_fingerprint(load_cert_file(r["path"])[0]))
    # Re-issued for the same key: same public-key pin, new certificate pin; a new key changes both.
    assert rows["new.pem"]["key_pin"] == rows["old.pem"]["key_pin"]
    assert rows["new.pem"]["cert_pin"] != rows["old.pem"]["cert_pin"]
    assert rows["other.pem"]["key_pin"] != rows["old.pem"]["key_pin"]
    assert rows["old.pem"]["key_pin"] == "key-sha256:" + reissued["old"].pubkey_sha256

    code, out, err = run(capsys, "list", "--store", str(store))
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["SHA1", "THUMBPRINT"]
    # Every row shown is followed by its own two pin lines.
    table_rows = [i for i, line in enumerate(lines[1:], 1) if not PIN_LINE.match(line)]
    assert len(table_rows) == 4
    for i in table_rows:
        name = next(n for n in expected if lines[i].endswith(os.sep + n))
        assert printed_pins(lines[i + 1:i + 3]) == [expected[name]], lines[i:i + 3]
    assert len(printed_pins(lines)) == 4


def test_list_pins_paste_into_a_partner_table(tmp_path: Path, capsys, reissued) -> None:
    """What follows "pin (…):" is a TOML string: pasted into pins = [...] it configures the partner."""
    store = tmp_path / "store"
    store.mkdir()
    write(store / "mx.pem", reissued["old"].cert_path.read_bytes())
    code, out, _ = run(capsys, "list", "--store", str(store))
    assert code == 0
    pasted = [line.split(":", 1)[1].strip() for line in out.splitlines() if PIN_LINE.match(line)]
    assert len(pasted) == 2
    config = parse_config('[partners."contoso.test"]\nreceive = true\npins = [\n  %s,\n]\n'
                          % ",\n  ".join(pasted))
    terms = config.partner("contoso.test")
    assert terms is not None
    assert terms.cert_pins == (reissued["old"].sha256,)
    assert terms.key_pins == (reissued["old"].pubkey_sha256,)


def test_check_pins_option(tmp_path: Path, capsys, reissued) -> None:
    lab = reissued["lab"]
    ca = str(lab.ca_path)
    pins = {}
    for stem in ("old", "new"):
        path = str(reissued[stem].cert_path)
        code, out, err = run(capsys, "check", path, "--ca", ca, "--pins", "--name", "mx.contoso.test")
        assert code == 0 and err == ""
        lines = out.splitlines()
        assert lines[0] == "OK" and len(lines) == 3, lines  # the verdict stays the first line
        pins[stem] = printed_pins(lines[1:])[0]
        assert pins[stem] == openssl_pins(path)
        # Without --pins the output is the verdict alone, as before.
        assert run(capsys, "check", path, "--ca", ca)[:2] == (0, "OK\n")
    assert pins["new"][1] == pins["old"][1] and pins["new"][0] != pins["old"][0]

    # The leaf's pins, not an intermediate's, when the file carries the chain.
    chain = write(tmp_path / "chain.pem", reissued["other"].cert_path.read_bytes() + lab.ca_path.read_bytes())
    code, out, _ = run(capsys, "check", chain, "--ca", ca, "--pins")
    assert code == 0 and printed_pins(out.splitlines()) == [openssl_pins(reissued["other"].cert_path)]

    # A partner's self-signed certificate is untrusted (exit 1, verdict first) but pinnable.
    selfsigned = lab.issue("self", "mx.fabrikam.test", self_signed=True)
    code, out, err = run(capsys, "check", str(selfsigned.cert_path), "--ca", ca, "--pins")
    lines = out.splitlines()
    assert code == 1 and "Traceback" not in err
    assert keywords([line for line in lines if not PIN_LINE.match(line)]) == ["untrusted"]
    assert lines[0].startswith("untrusted: ") and PIN_LINE.match(lines[-1])
    assert printed_pins(lines) == [openssl_pins(selfsigned.cert_path)]
