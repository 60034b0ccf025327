"""End-to-end tests of tests/sendmail_lab.py + contrib/sendmail/milterd.mc against a real Sendmail.

A probe milter (tests/sendmail_probe_milter.py, a subprocess) records the macros Sendmail sends at
each stage; smtplib plays the client (plain, STARTTLS without / with a CA-signed / with a
self-signed client certificate). Provisioning problems FAIL these tests, they never skip.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))
from milterd.lab.net import wait_for_unix_socket  # noqa: E402
from milterd.lab.wait import wait_until  # noqa: E402
from sendmail_lab import (  # noqa: E402
    CONTRIB_MC,
    SendmailLab,
    SendmailLabError,
    ensure_provisioned,
    pid_alive,
)

pytestmark = pytest.mark.sendmail

PROBE = Path(__file__).resolve().parent / "sendmail_probe_milter.py"
CLIENT_CN = "mail.woodgrovebank.test"
LOCAL_DOMAIN = "contoso.test"
RCPT = f"alice@{LOCAL_DOMAIN}"
REJECTED_SENDER = "spammer@evil.test"
TLS_MACROS = ("{verify}", "{cert_subject}", "{cert_issuer}", "{cn_subject}", "{cn_issuer}",
              "{tls_version}", "{cipher}", "{cipher_bits}", "{cert_fp}", "{cert_md5}")


# ------------------------------------------------------------------------------------- PKI
def _name(o: str, cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, o),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, issuer, pub, signer, *, ca=False, eku=None, san=None, days=30, expired=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(days=10 if expired else 0, minutes=5)
    end = now - datetime.timedelta(days=1) if expired else now + datetime.timedelta(days=days)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(pub)
         .serial_number(x509.random_serial_number())
         .not_valid_before(start)
         .not_valid_after(end)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                            critical=True)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(signer, hashes.SHA256())


def _write(path: Path, cert, key=None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        kp = path.with_suffix(".key")
        kp.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        os.chmod(kp, 0o600)
    return path


def _fp(cert) -> str:
    """SHA-256 of the DER certificate, upper-case hex with colons (as openssl -fingerprint)."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(
        cert.public_bytes(serialization.Encoding.DER)).digest())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(_name("Lab", "Lab Test CA"), _name("Lab", "Lab Test CA"), ca_key.public_key(),
               ca_key, ca=True, days=365)
    import ipaddress
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = _cert(_name("Lab", "mx.lab.test"), ca.subject, srv_key.public_key(), ca_key,
                eku=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                san=[x509.DNSName("mx.lab.test"), x509.DNSName("localhost"),
                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    good_key = ec.generate_private_key(ec.SECP256R1())
    good = _cert(_name("Lab", CLIENT_CN), ca.subject, good_key.public_key(), ca_key,
                 eku=[ExtendedKeyUsageOID.CLIENT_AUTH], san=[x509.DNSName(CLIENT_CN)])
    old_key = ec.generate_private_key(ec.SECP256R1())
    old = _cert(_name("Lab", CLIENT_CN), ca.subject, old_key.public_key(), ca_key,
                eku=[ExtendedKeyUsageOID.CLIENT_AUTH], san=[x509.DNSName(CLIENT_CN)], expired=True)
    evil_key = ec.generate_private_key(ec.SECP256R1())
    evil = _cert(_name("Evil", CLIENT_CN), _name("Evil", CLIENT_CN), evil_key.public_key(),
                 evil_key, eku=[ExtendedKeyUsageOID.CLIENT_AUTH], san=[x509.DNSName(CLIENT_CN)])
    return {
        "dir": d,
        "ca": _write(d / "ca.crt", ca),
        "server": _write(d / "server.crt", srv, srv_key),
        "server_key": d / "server.key",
        "good": _write(d / "good.crt", good, good_key),
        "evil": _write(d / "evil.crt", evil, evil_key),
        "expired": _write(d / "expired.crt", old, old_key),
        "good_fp": _fp(good),
        "expired_fp": _fp(old),
        "evil_fp": _fp(evil),
    }


# --------------------------------------------------------------------------- probe milter
class ProbeMilter:
    def __init__(self, workdir: Path, reject_sender: str | None = None):
        self.sock = workdir / "milter.sock"
        self.out = workdir / "probe.jsonl"
        self.log = workdir / "probe.stderr"
        self.reject_sender = reject_sender
        self.proc: subprocess.Popen | None = None

    @property
    def spec(self) -> str:
        return f"unix:{self.sock}"

    def start(self) -> None:
        cmd = [sys.executable, str(PROBE), "--socket", self.spec, "--out", str(self.out)]
        if self.reject_sender:
            cmd += ["--reject-sender", self.reject_sender]
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         start_new_session=True)
        pid = self.proc.pid
        if not wait_for_unix_socket(self.sock, timeout=20, alive=lambda: pid_alive(pid)):
            self.stop()
            raise SendmailLabError(f"probe milter socket {self.sock} not ready (exited or"
                                   f" timed out)\n{self.log.read_text(errors='replace')}")

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)       # libmilter needs 3-6 s to exit
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def events(self) -> list[dict]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def session(self, client_port: int, until_stage: str = "eom", timeout: float = 10.0):
        """Events of the milter connection whose {client_port} is client_port (bounded wait)."""
        def mine() -> list[dict]:
            evs = self.events()
            conns = {e["conn"] for e in evs
                     if e["stage"] == "connect"
                     and e["macros"].get("{client_port}") == str(client_port)}
            return [e for e in evs if e["conn"] in conns]
        try:
            return wait_until(lambda: (m := mine()) and any(e["stage"] == until_stage for e in m)
                              and m, timeout, f"milter stage {until_stage}")
        except AssertionError:
            return mine()


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def sendmail_root():
    try:
        return ensure_provisioned()
    except SendmailLabError as e:
        pytest.fail(f"cannot provision the private sendmail: {e}")


def _start_pair(base: Path, pki: dict, reject_sender: str | None):
    base.mkdir(parents=True, exist_ok=True)
    probe = ProbeMilter(base, reject_sender=reject_sender)
    probe.start()
    lab = SendmailLab(base / "sm", milter_socket=probe.spec, ca_cert=pki["ca"],
                      server_cert=pki["server"], server_key=pki["server_key"],
                      local_domains=[LOCAL_DOMAIN])
    try:
        lab.start()
    except Exception:
        probe.stop()
        raise
    return probe, lab


@pytest.fixture(scope="module")
def lab_pair(sendmail_root, pki, tmp_path_factory):
    probe, lab = _start_pair(tmp_path_factory.mktemp("smlab"), pki, REJECTED_SENDER)
    yield probe, lab
    lab.stop()
    probe.stop()


# -------------------------------------------------------------------------------- client
def _msg(sender: str, subject: str) -> EmailMessage:
    m = EmailMessage()
    m["From"] = sender
    m["To"] = RCPT
    m["Subject"] = subject
    m.set_content(f"body of {subject}\n")
    return m


def _send(port: int, ca: Path, *, tls: bool, cert: Path | None = None,
          sender: str = f"bob@{CLIENT_CN}", subject: str = "probe") -> int:
    """Send one message; returns the client's local port (the milter's {client_port})."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.woodgrovebank.test",
                      timeout=30) as s:
        s.ehlo()
        if tls:
            ctx = ssl.create_default_context(cafile=str(ca))
            if cert is not None:
                ctx.load_cert_chain(str(cert), str(cert.with_suffix(".key")))
            s.starttls(context=ctx)
            s.ehlo()
        local_port = s.sock.getsockname()[1]
        s.send_message(_msg(sender, subject), from_addr=sender, to_addrs=[RCPT])
    return local_port


def _stage(events: list[dict], stage: str) -> dict:
    found = [e for e in events if e["stage"] == stage]
    assert found, f"no {stage} event in {events}"
    return found[-1]["macros"]


# --------------------------------------------------------------------------------- tests
def test_cf_is_built_from_contrib_fragment(lab_pair):
    probe, lab = lab_pair
    cf = lab.cf_path.read_text()
    assert f"Xmilterd, S={probe.spec}, F=T, T=S:30s;R:30s;E:5m" in cf
    assert "O CertFingerprintAlgorithm=sha256" in cf
    mc = lab.mc_path.read_text()
    assert f"include(`{CONTRIB_MC}')" in mc
    for stage in ("helo", "envfrom", "envrcpt", "eom"):
        line = next(ln for ln in cf.splitlines() if ln.startswith(f"O Milter.macros.{stage}="))
        for m in ("{verify}", "{cert_subject}", "{cn_subject}", "{cert_fp}", "{client_addr}",
                  "{client_port}"):
            assert m in line, (stage, m, line)


TLS_CASES = {
    # case: (tls, cert key in pki, expected {verify}, {cert_subject}, {cn_subject}, fp key)
    "plain": (False, None, None, None, None, None),
    "starttls-no-cert": (True, None, "NO", "", "", ""),
    "ca-signed-cert": (True, "good", "OK", f"/O=Lab/CN={CLIENT_CN}", CLIENT_CN, "good_fp"),
    "self-signed-cert": (True, "evil", "FAIL", f"/O=Evil/CN={CLIENT_CN}", CLIENT_CN, "evil_fp"),
    "expired-ca-signed-cert": (True, "expired", "FAIL", f"/O=Lab/CN={CLIENT_CN}", CLIENT_CN,
                               "expired_fp"),
}


@pytest.mark.parametrize("case", list(TLS_CASES))
def test_tls_macros(lab_pair, pki, case):
    probe, lab = lab_pair
    tls, cert, verify, subject, cn, fpkey = TLS_CASES[case]
    n_before = len(lab.delivered())
    port = _send(lab.port, pki["ca"], tls=tls, cert=pki[cert] if cert else None, subject=case)
    events = probe.session(port)
    stages = [e["stage"] for e in events]
    assert stages[0] == "connect" and "eom" in stages, stages
    assert stages.count("helo") == (2 if tls else 1), stages

    # never TLS facts at connect, nor at the first HELO (before STARTTLS)
    assert not set(TLS_MACROS) & set(_stage(events, "connect")), events[0]
    first_helo = next(e for e in events if e["stage"] == "helo")["macros"]
    assert not set(TLS_MACROS) & set(first_helo), first_helo

    expected_fp = pki[fpkey] if fpkey else ("" if fpkey == "" else None)
    for stage in ("helo", "envfrom", "envrcpt", "eom"):
        m = _stage(events, stage)       # the last HELO: after STARTTLS when there is one
        assert m.get("{client_addr}") == "127.0.0.1", (stage, m)
        assert m.get("{client_port}") == str(port), (stage, m)
        assert m.get("{verify}") == verify, (stage, m)
        assert m.get("{cert_subject}") == subject, (stage, m)
        assert m.get("{cn_subject}") == cn, (stage, m)
        assert m.get("{cert_fp}") == expected_fp, (stage, m)
        assert "{cert_md5}" not in m, (stage, m)   # sha256 configured: md5 never sent
        if tls:
            assert m.get("{tls_version}", "").startswith("TLSv1"), (stage, m)
            assert int(m.get("{cipher_bits}", "0")) >= 128, (stage, m)
        else:
            assert not set(TLS_MACROS) & set(m), (stage, m)
    eom = _stage(events, "eom")
    assert eom.get("i"), eom                      # queue id at end of message
    if cert == "good":
        assert eom["{cert_issuer}"] == "/O=Lab/CN=Lab+20Test+20CA"   # xtext: space -> +20
    if cert == "evil":
        assert eom["{cert_issuer}"] == f"/O=Evil/CN={CLIENT_CN}"
    if cert == "expired":
        assert eom["{cert_issuer}"] == "/O=Lab/CN=Lab+20Test+20CA"
        lab.wait_for_log(r"certificate has expired", timeout=5)

    delivered = lab.delivered()
    assert len(delivered) == n_before + 1
    msg = delivered[-1]
    assert msg["Subject"] == case
    assert msg["X-Lab-Delivered-To"] == "alice"
    received = " ".join(str(h) for h in msg.get_all("Received", []))
    if tls:
        assert f"verify={verify}" in received, received
    else:
        assert "verify=" not in received, received


def test_milter_reject_reaches_client_as_5xx(lab_pair, pki):
    probe, lab = lab_pair
    n_before = len(lab.delivered())
    with pytest.raises(smtplib.SMTPSenderRefused) as ei:
        _send(lab.port, pki["ca"], tls=True, cert=pki["good"], sender=REJECTED_SENDER,
              subject="must be rejected")
    assert 500 <= ei.value.smtp_code < 600, ei.value
    assert b"rejected by probe milter" in ei.value.smtp_error, ei.value
    assert len(lab.delivered()) == n_before


def test_sendmail_log_is_captured(lab_pair, pki):
    probe, lab = lab_pair
    _send(lab.port, pki["ca"], tls=True, cert=pki["good"], subject="log check")
    lab.wait_for_log(r"stat=Sent", timeout=10)
    text = lab.log_text()
    assert "starting daemon" in text, text[-2000:]
    assert "verify=OK" in text, text[-2000:]
    assert "Milter" in text or "milter" in text, text[-2000:]


def test_milter_down_tempfails_mail_from(sendmail_root, pki, tmp_path):
    probe, lab = _start_pair(tmp_path / "down", pki, None)
    try:
        _send(lab.port, pki["ca"], tls=True, cert=pki["good"], subject="while milter up")
        assert len(lab.delivered()) == 1
        probe.stop()                                   # waits for the PID to exit
        assert probe.proc is None
        # plain session: 451 at MAIL FROM
        with pytest.raises(smtplib.SMTPSenderRefused) as ei:
            _send(lab.port, pki["ca"], tls=False, subject="while milter down, plain")
        assert ei.value.smtp_code == 451, ei.value
        assert ei.value.smtp_error.startswith(b"4.3.2"), ei.value
        # with F=T Sendmail already refuses STARTTLS itself (454 4.7.0) while the milter is down
        with pytest.raises(smtplib.SMTPResponseException) as ei:
            _send(lab.port, pki["ca"], tls=True, cert=pki["good"], subject="while milter down")
        assert ei.value.smtp_code == 454, ei.value
        assert "STARTTLS command () from" in lab.wait_for_log(r"SMTP STARTTLS command.*tempfailed").group(0)
        assert len(lab.delivered()) == 1
    finally:
        lab.stop()
        probe.stop()
    assert not lab.running()
