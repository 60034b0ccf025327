"""The partner certificate watch's outbound probe (#18) against real loopback SMTP+STARTTLS servers.

Every MX here is a real TLS server (Python's ssl, certificates from the lab PKI) on a 127.0.0.x
address, found through the loopback DNS server (tests/dns_server.py); the probe connects to the
port given to it.  Nothing sleeps: servers are listening before the probe starts (bind + listen
happen in the constructor), and a stalled server is released when the test stops it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import socketserver
import ssl
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dns_server import DnsServer
from milterd.certs.common import sha256_fingerprint
from milterd.core.partners import PartnerTerms
from milterd.lab.pki import Issued, TestPKI
from milterd.outbound.dns import DnsClient
from milterd.policy import reasons
from milterd.watch.probe import PROBE_REASONS, ProbeResult, probe_partner

DAY = 86400.0


# ----------------------------------------------------------------------------- a loopback MX


class MX:
    """A minimal SMTP server with STARTTLS on ``host:port`` (threads, real TLS).

    ``starttls``: advertise and accept STARTTLS; ``max_tls``: highest TLS version it speaks;
    ``stall``: after the greeting, say nothing more until stopped; ``greeting``: the first line.
    """

    def __init__(self, host: str, port: int = 0, *, cert: Path | None = None,
                 key: Path | None = None, starttls: bool = True,
                 max_tls: ssl.TLSVersion | None = None, stall: bool = False,
                 greeting: bytes = b"220 mx.test ESMTP probe-lab\r\n") -> None:
        self.stop_event = threading.Event()
        self.sessions: list[list[str]] = []
        self.ctx = None
        if cert is not None:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(str(cert), str(key))
            if max_tls is not None:
                self.ctx.maximum_version = max_tls
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._session(self.request, starttls, stall, greeting)

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_cls = type("Srv", (socketserver.ThreadingTCPServer,),
                          {"address_family": family, "daemon_threads": True,
                           "allow_reuse_address": True})
        self.srv = server_cls((host, port), Handler)  # bound and listening: ready
        self.host, self.port = host, self.srv.server_address[1]
        self.thread = threading.Thread(target=self.srv.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def _session(self, conn: socket.socket, starttls: bool, stall: bool, greeting: bytes) -> None:
        log: list[str] = []
        self.sessions.append(log)
        conn.settimeout(10)
        sock: socket.socket = conn
        try:
            conn.sendall(greeting)
            if stall:
                self.stop_event.wait(30)
                return
            buf = b""
            for _ in range(50):  # bounded dialogue
                while b"\n" not in buf:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                line, buf = buf.split(b"\n", 1)
                cmd = line.strip().decode("ascii", "replace")
                log.append(cmd)
                verb = cmd.split(" ")[0].upper()
                if verb == "EHLO":
                    ext = b"250-STARTTLS\r\n" if starttls else b""
                    sock.sendall(b"250-mx.test\r\n250-PIPELINING\r\n" + ext + b"250 8BITMIME\r\n")
                elif verb == "STARTTLS" and starttls and self.ctx is not None:
                    sock.sendall(b"220 go ahead\r\n")
                    sock = self.ctx.wrap_socket(conn, server_side=True)
                    log.append("TLS " + (sock.version() or ""))
                    buf = b""
                elif verb == "QUIT":
                    sock.sendall(b"221 bye\r\n")
                    return
                else:
                    sock.sendall(b"502 not here\r\n")
        except (OSError, ssl.SSLError):
            return
        finally:
            if sock is not conn:
                sock.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.srv.shutdown()
        self.srv.server_close()
        self.thread.join(5)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI(tmp_path_factory.mktemp("probe-pki"))


@pytest.fixture(scope="module")
def dns_srv() -> Iterator[DnsServer]:
    with DnsServer() as srv:
        yield srv


@pytest.fixture
def dns(dns_srv: DnsServer) -> DnsClient:
    return DnsClient(nameservers=[("127.0.0.1", dns_srv.port)], timeout=1.0, lifetime=2.0)


@pytest.fixture
def servers() -> Iterator[list[MX]]:
    started: list[MX] = []
    yield started
    for s in started:
        s.stop()


def with_chain(pki: TestPKI, issued: Issued, *extra: x509.Certificate) -> Path:
    """The leaf's PEM followed by ``extra`` (what the server presents, leaf first)."""
    path = issued.cert_path.with_suffix(".chain.pem")
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                              for c in (issued.cert, *extra)))
    return path


def partner(entry: str, **kw) -> PartnerTerms:
    kw.setdefault("send", True)
    return PartnerTerms(entry=entry, **kw)


def run(coro, bound: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, bound))


def no_crlf(r: ProbeResult) -> None:
    for text in (r.detail, r.subject or "", r.issuer or "", *r.names):
        assert all(" " <= c <= "~" for c in text), text
    assert r.reason is None if r.ok else r.reason in PROBE_REASONS


# ----------------------------------------------------------------------------- the issue's cases


def test_hosted_partner_ok_with_its_server_names(pki, dns_srv, dns, servers):
    """A loopback MX whose certificate names mx.hoster.test and expires in 3 days passes for a
    partner whose server_names say so; everything the watch records is reported."""
    leaf = pki.issue("mx-hoster", "mx.hoster.test", days=3)
    mx = MX("127.0.0.2", cert=with_chain(pki, leaf, pki.ca_cert), key=leaf.key_path)
    servers.append(mx)
    dns_srv.add("hosted.test", "MX", ["10 mx.hoster.test."])
    dns_srv.add("mx.hoster.test", "A", ["127.0.0.2"])
    t0 = time.time()
    res = run(probe_partner(partner("hosted.test", server_names=("mx.hoster.test",)), dns=dns,
                            port=mx.port, timeout=5, ca_file=str(pki.cert_path)))
    assert len(res) == 1
    r = res[0]
    assert r.ok, r
    assert (r.partner, r.mx_host, r.address, r.reason) == ("hosted.test", "mx.hoster.test",
                                                           "127.0.0.2", None)
    assert r.tls_version in ("TLSv1.2", "TLSv1.3")
    assert abs(r.not_after - (t0 + 3 * DAY)) < DAY
    assert r.not_after == leaf.cert.not_valid_after_utc.timestamp()
    assert r.names == ("mx.hoster.test",)
    assert r.cert_sha256 == leaf.sha256
    assert r.pubkey_sha256 == leaf.pubkey_sha256
    assert r.chain_sha256 == (leaf.sha256, sha256_fingerprint(pki.ca_cert))
    assert "CN=mx.hoster.test" in r.subject and "CN=milterd Test CA" in r.issuer
    assert t0 <= r.probed_at <= time.time()
    no_crlf(r)
    # it was a real SMTP session: EHLO, STARTTLS, the handshake, QUIT
    log = mx.sessions[0]
    assert log[0] == "EHLO localhost" and log[1] == "STARTTLS" and log[2].startswith("TLS ")
    assert log[-1] == "QUIT"

    # the same MX for a partner without server_names would fail: the names are not its domain's
    res = run(probe_partner(partner("hosted.test"), dns=dns, port=mx.port, timeout=5,
                            ca_file=str(pki.cert_path)))
    r = res[0]
    assert not r.ok and r.reason == reasons.OUTBOUND_NAME_MISMATCH
    assert "mx.hoster.test" in r.detail and "hosted.test" in r.detail
    assert r.cert_sha256 == leaf.sha256  # the certificate is reported all the same
    no_crlf(r)

    # a server_names entry that names another host fails too
    res = run(probe_partner(partner("hosted.test", server_names=("mx2.hoster.test",)), dns=dns,
                            port=mx.port, timeout=5, ca_file=str(pki.cert_path)))
    assert res[0].reason == reasons.OUTBOUND_NAME_MISMATCH


def test_name_rules_wildcard_dot_entry_and_domain_default(pki, dns_srv, dns, servers):
    wild = pki.issue("mx-wild", "*.hoster2.test")
    mx = MX("127.0.0.3", cert=wild.cert_path, key=wild.key_path)
    servers.append(mx)
    dns_srv.add("wild.test", "MX", ["10 mx.hoster2.test."])
    dns_srv.add("mx.hoster2.test", "A", ["127.0.0.3"])
    ca = str(pki.cert_path)

    def probe(**kw) -> ProbeResult:
        return run(probe_partner(partner("wild.test", **kw), dns=dns, port=mx.port, timeout=5,
                                 ca_file=ca))[0]

    assert probe(server_names=("mx.hoster2.test",)).ok          # RFC 9525: *.hoster2.test
    assert probe(server_names=(".hoster2.test",)).ok            # any host under hoster2.test
    assert probe(server_names=("hoster2.test",)).reason == reasons.OUTBOUND_NAME_MISMATCH
    assert probe(server_names=("a.b.hoster2.test",)).reason == reasons.OUTBOUND_NAME_MISMATCH

    # no server_names: the partner domain or a host under it (Postfix nexthop:dot-nexthop)
    own = pki.issue("mx-own", "mx.own.test")
    mx2 = MX("127.0.0.4", cert=own.cert_path, key=own.key_path)
    servers.append(mx2)
    dns_srv.add("own.test", "MX", ["10 mx.own.test."])
    dns_srv.add("mx.own.test", "A", ["127.0.0.4"])
    r = run(probe_partner(partner("own.test"), dns=dns, port=mx2.port, timeout=5, ca_file=ca))[0]
    assert r.ok and r.names == ("mx.own.test",), r
    # label-wise: mx.own.test ends in "wn.test" but is not a host under wn.test
    dns_srv.add("wn.test", "MX", ["10 mx.own.test."])
    r = run(probe_partner(partner("wn.test"), dns=dns, port=mx2.port, timeout=5, ca_file=ca))[0]
    assert r.reason == reasons.OUTBOUND_NAME_MISMATCH, r


def test_cn_only_when_no_san(pki, dns_srv, dns, servers, tmp_path):
    """A certificate without a DNS SAN is judged by its CN (as Postfix); with SANs the CN is
    ignored."""
    import datetime as _dt
    from cryptography import x509 as _x
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def make(cn: str, sans: list[str], stem: str) -> tuple[Path, Path, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _dt.datetime.now(_dt.timezone.utc)
        b = (_x.CertificateBuilder()
             .subject_name(_x.Name([_x.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(pki.ca_cert.subject).public_key(key.public_key())
             .serial_number(_x.random_serial_number())
             .not_valid_before(now - _dt.timedelta(days=1))
             .not_valid_after(now + _dt.timedelta(days=30))
             .add_extension(_x.BasicConstraints(ca=False, path_length=None), critical=True))
        if sans:
            b = b.add_extension(_x.SubjectAlternativeName([_x.DNSName(s) for s in sans]), False)
        cert = b.sign(pki.ca_key, hashes.SHA256())
        cp, kp = tmp_path / f"{stem}.crt", tmp_path / f"{stem}.key"
        cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        kp.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        return cp, kp, cert

    cp, kp, _ = make("mx.cn.test", [], "cn-only")
    mx = MX("127.0.0.5", cert=cp, key=kp)
    servers.append(mx)
    dns_srv.add("cn.test", "MX", ["10 mx.cn.test."])
    dns_srv.add("mx.cn.test", "A", ["127.0.0.5"])
    r = run(probe_partner(partner("cn.test"), dns=dns, port=mx.port, timeout=5,
                          ca_file=str(pki.cert_path)))[0]
    assert r.ok and r.names == ("mx.cn.test",), r

    cp, kp, _ = make("mx.cnsan.test", ["other.example"], "cn-and-san")
    mx2 = MX("127.0.0.5", cert=cp, key=kp)
    servers.append(mx2)
    dns_srv.add("cnsan.test", "MX", ["10 mx.cnsan.test."])
    dns_srv.add("mx.cnsan.test", "A", ["127.0.0.5"])
    r = run(probe_partner(partner("cnsan.test"), dns=dns, port=mx2.port, timeout=5,
                          ca_file=str(pki.cert_path)))[0]
    assert r.reason == reasons.OUTBOUND_NAME_MISMATCH and r.names == ("other.example",), r


def test_untrusted_certificates(pki, dns_srv, dns, servers, tmp_path):
    selfsigned = pki.issue("mx-self", "mx.self.test", self_signed=True)
    mx = MX("127.0.0.6", cert=selfsigned.cert_path, key=selfsigned.key_path)
    servers.append(mx)
    dns_srv.add("self.test", "MX", ["10 mx.self.test."])
    dns_srv.add("mx.self.test", "A", ["127.0.0.6"])
    r = run(probe_partner(partner("self.test"), dns=dns, port=mx.port, timeout=5,
                          ca_file=str(pki.cert_path)))[0]
    assert not r.ok and r.reason == reasons.OUTBOUND_UNTRUSTED_CERT, r
    assert "self-signed" in r.detail
    assert r.cert_sha256 == selfsigned.sha256 and r.names == ("mx.self.test",)
    no_crlf(r)

    # a server presenting its own CA along with the leaf: the presented CA is no trust anchor
    evil = TestPKI(tmp_path / "evil", ca_name="Evil CA")
    leaf = evil.issue("mx-evil", "mx.evil.test")
    mx2 = MX("127.0.0.6", cert=with_chain(evil, leaf, evil.ca_cert), key=leaf.key_path)
    servers.append(mx2)
    dns_srv.add("evil.test", "MX", ["10 mx.evil.test."])
    dns_srv.add("mx.evil.test", "A", ["127.0.0.6"])
    r = run(probe_partner(partner("evil.test"), dns=dns, port=mx2.port, timeout=5,
                          ca_file=str(pki.cert_path)))[0]
    assert r.reason == reasons.OUTBOUND_UNTRUSTED_CERT, r
    assert r.chain_sha256 == (leaf.sha256, sha256_fingerprint(evil.ca_cert))
    # ... and trusted when its CA is the configured one
    r = run(probe_partner(partner("evil.test"), dns=dns, port=mx2.port, timeout=5,
                          ca_file=str(evil.cert_path)))[0]
    assert r.ok, r
    # the system bundle (no ca_file) does not trust the lab CA
    r = run(probe_partner(partner("evil.test"), dns=dns, port=mx2.port, timeout=5))[0]
    assert r.reason == reasons.OUTBOUND_UNTRUSTED_CERT
    # an unreadable CA file: untrusted, said so, no exception
    r = run(probe_partner(partner("evil.test"), dns=dns, port=mx2.port, timeout=5,
                          ca_file=str(tmp_path / "missing.pem")))[0]
    assert r.reason == reasons.OUTBOUND_UNTRUSTED_CERT and "cannot read CA file" in r.detail


def make_intermediate(pki: TestPKI, tmp_path: Path, stem: str, leaf_name: str):
    """An intermediate CA under ``pki``'s root and a leaf it issues: (leaf, key path, inter)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ikey = ec.generate_private_key(ec.SECP256R1())
    iname = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{stem} Intermediate")])
    inter = (x509.CertificateBuilder().subject_name(iname).issuer_name(pki.ca_cert.subject)
             .public_key(ikey.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(days=1))
             .not_valid_after(now + dt.timedelta(days=60))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                          False), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(ikey.public_key()), False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 pki.ca_key.public_key()), False)
             .sign(pki.ca_key, hashes.SHA256()))
    lkey = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, leaf_name)]))
            .issuer_name(iname).public_key(lkey.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(leaf_name)]), False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ikey.public_key()), False)
            .sign(ikey, hashes.SHA256()))
    kp = tmp_path / f"{stem}.key"
    kp.write_bytes(lkey.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return leaf, kp, inter


def test_presented_intermediates(pki, dns_srv, dns, servers, tmp_path):
    """Intermediates the server sends complete the path to a configured root (as in real
    deployments: the bundle holds roots only), but never become trust anchors themselves."""
    leaf, kp, inter = make_intermediate(pki, tmp_path, "hoster3", "mx.inter.test")
    chain = tmp_path / "inter-chain.pem"
    chain.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, inter)))
    mx = MX("127.0.0.15", cert=chain, key=kp)
    servers.append(mx)
    dns_srv.add("inter.test", "MX", ["10 mx.inter.test."])
    dns_srv.add("mx.inter.test", "A", ["127.0.0.15"])
    r = run(probe_partner(partner("inter.test"), dns=dns, port=mx.port, timeout=5,
                          ca_file=str(pki.cert_path)))[0]
    assert r.ok, r
    assert r.chain_sha256 == (sha256_fingerprint(leaf), sha256_fingerprint(inter))
    # A CA file without any root (here: some unrelated leaf) must not let the presented
    # intermediate anchor the chain.
    unrelated = pki.issue("unrelated", "unrelated.test")
    r = run(probe_partner(partner("inter.test"), dns=dns, port=mx.port, timeout=5,
                          ca_file=str(unrelated.cert_path)))[0]
    assert r.reason == reasons.OUTBOUND_UNTRUSTED_CERT, r


def test_expiry_is_checked_at_the_clock(pki, dns_srv, dns, servers):
    """A certificate expiring in 3 days passes now and fails (untrusted, expired) 4 days on."""
    leaf = pki.issue("mx-exp", "mx.exp.test", days=3)
    mx = MX("127.0.0.7", cert=leaf.cert_path, key=leaf.key_path)
    servers.append(mx)
    dns_srv.add("exp.test", "MX", ["10 mx.exp.test."])
    dns_srv.add("mx.exp.test", "A", ["127.0.0.7"])
    later = time.time() + 4 * DAY
    r = run(probe_partner(partner("exp.test"), dns=dns, port=mx.port, timeout=5,
                          ca_file=str(pki.cert_path), clock=lambda: later))[0]
    assert r.reason == reasons.OUTBOUND_UNTRUSTED_CERT and "expired" in r.detail, r
    assert r.probed_at == later
    r = run(probe_partner(partner("exp.test"), dns=dns, port=mx.port, timeout=5,
                          ca_file=str(pki.cert_path)))[0]
    assert r.ok, r


def test_starttls_not_offered(pki, dns_srv, dns, servers):
    mx = MX("127.0.0.8", starttls=False)
    servers.append(mx)
    dns_srv.add("plain.test", "MX", ["10 mx.plain.test."])
    dns_srv.add("mx.plain.test", "A", ["127.0.0.8"])
    r = run(probe_partner(partner("plain.test"), dns=dns, port=mx.port, timeout=5,
                          ca_file=str(pki.cert_path)))[0]
    assert not r.ok and r.reason == reasons.OUTBOUND_STARTTLS_NOT_OFFERED, r
    assert r.address == "127.0.0.8" and r.cert_sha256 is None and r.tls_version is None
    assert mx.sessions[0] == ["EHLO localhost"]  # no STARTTLS attempted, nothing else sent
    no_crlf(r)


def test_tls_version_below_partner_minimum(pki, dns_srv, dns, servers):
    leaf = pki.issue("mx-tls12", "mx.tls12.test")
    mx = MX("127.0.0.9", cert=leaf.cert_path, key=leaf.key_path,
            max_tls=ssl.TLSVersion.TLSv1_2)
    servers.append(mx)
    dns_srv.add("tls12.test", "MX", ["10 mx.tls12.test."])
    dns_srv.add("mx.tls12.test", "A", ["127.0.0.9"])
    r = run(probe_partner(partner("tls12.test", min_version="TLSv1.3"), dns=dns, port=mx.port,
                          timeout=5, ca_file=str(pki.cert_path)))[0]
    assert not r.ok and r.reason == "tls_version" and r.tls_version == "TLSv1.2", r
    assert "TLSv1.3" in r.detail
    assert r.cert_sha256 == leaf.sha256  # seen and reported all the same
    r = run(probe_partner(partner("tls12.test", min_version="TLSv1.2"), dns=dns, port=mx.port,
                          timeout=5, ca_file=str(pki.cert_path)))[0]
    assert r.ok and r.tls_version == "TLSv1.2", r


def test_connect_failed_and_first_answering_address(pki, dns_srv, dns, servers):
    leaf = pki.issue("mx-multi", "mx.multi.test")
    mx = MX("127.0.0.11", cert=leaf.cert_path, key=leaf.key_path)
    servers.append(mx)
    # nothing listens on 127.0.0.10:port (the port was free on .11, nothing binds .10)
    dns_srv.add("multi.test", "MX", ["10 mx.multi.test."])
    dns_srv.add("mx.multi.test", "A", ["127.0.0.10", "127.0.0.11"])
    r = run(probe_partner(partner("multi.test"), dns=dns, port=mx.port, timeout=5,
                          ca_file=str(pki.cert_path)))[0]
    assert r.ok and r.address == "127.0.0.11", r

    dns_srv.add("closed.test", "MX", ["10 mx.closed.test."])
    dns_srv.add("mx.closed.test", "A", ["127.0.0.10"])
    t0 = time.monotonic()
    r = run(probe_partner(partner("closed.test"), dns=dns, port=mx.port, timeout=5,
                          ca_file=str(pki.cert_path)))[0]
    assert time.monotonic() - t0 < 5
    assert not r.ok and r.reason == "connect_failed" and r.address == "", r
    assert "127.0.0.10" in r.detail
    no_crlf(r)


def test_dns_failures(dns_srv, dns):
    r = run(probe_partner(partner("nxdomain.test"), dns=dns, timeout=5))
    assert len(r) == 1 and r[0].reason == "dns_failed" and r[0].address == "", r
    assert not r[0].ok and "NXDOMAIN" in r[0].detail
    # an MX host without any address
    dns_srv.add("noaddr.test", "MX", ["10 mx.noaddr.test."])
    r = run(probe_partner(partner("noaddr.test"), dns=dns, timeout=5))
    assert [(x.mx_host, x.reason) for x in r] == [("mx.noaddr.test", "dns_failed")]
    # SERVFAIL
    dns_srv.servfail("broken.test")
    r = run(probe_partner(partner("broken.test"), dns=dns, timeout=5))
    assert r[0].reason == "dns_failed" and r[0].address == ""
    # no DNS server at all (a loopback port nobody listens on): bounded, no exception
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    dead = DnsClient(nameservers=[("127.0.0.1", dead_port)], timeout=0.5, lifetime=1.0)
    t0 = time.monotonic()
    r = run(probe_partner(partner("any.test"), dns=dead, timeout=2))
    assert time.monotonic() - t0 < 2.5
    assert len(r) == 1 and r[0].reason == "dns_failed" and r[0].address == "", r
    # a DNS server that never answers: the probe's own timeout bounds the MX lookup
    dns_srv.drop("silent.test")
    slow = DnsClient(nameservers=[("127.0.0.1", dns_srv.port)], timeout=30, lifetime=60)
    t0 = time.monotonic()
    r = run(probe_partner(partner("silent.test"), dns=slow, timeout=1.0))
    assert time.monotonic() - t0 < 1.5
    assert r[0].reason == "dns_failed" and "timed out" in r[0].detail
    for x in r:
        no_crlf(x)


def test_stalled_server_times_out_within_the_bound(pki, dns_srv, dns, servers):
    mx = MX("127.0.0.12", stall=True)
    servers.append(mx)
    dns_srv.add("stall.test", "MX", ["10 mx.stall.test."])
    dns_srv.add("mx.stall.test", "A", ["127.0.0.12"])
    timeout = 1.0
    t0 = time.monotonic()
    r = run(probe_partner(partner("stall.test"), dns=dns, port=mx.port, timeout=timeout,
                          ca_file=str(pki.cert_path)))
    elapsed = time.monotonic() - t0
    assert elapsed < timeout + 0.5, elapsed
    assert elapsed >= timeout * 0.9, elapsed  # it did wait for the server, not give up early
    assert len(r) == 1 and r[0].reason == "timeout" and r[0].address == "127.0.0.12", r
    assert "EHLO" in r[0].detail  # the stage it was stuck in
    no_crlf(r[0])


def test_mx_selection_null_and_implicit(pki, dns_srv, dns, servers):
    leaf = pki.issue("mx-sel", "mx.sel.test", sans=["mx1.sel.test", "mx2.sel.test",
                                                     "mx3.sel.test", "impl.sel.test"])
    mx = MX("127.0.0.13", cert=leaf.cert_path, key=leaf.key_path)
    servers.append(mx)
    for h in ("mx1", "mx2", "mx3"):
        dns_srv.add(f"{h}.sel.test", "A", ["127.0.0.13"])
    dns_srv.add("sel.test", "MX", ["30 mx3.sel.test.", "10 mx1.sel.test.", "20 mx2.sel.test.",
                                   "20 mx2.sel.test."])
    r = run(probe_partner(partner("sel.test"), dns=dns, port=mx.port, timeout=5, max_hosts=2,
                          ca_file=str(pki.cert_path)))
    assert [x.mx_host for x in r] == ["mx1.sel.test", "mx2.sel.test"]
    assert all(x.ok for x in r)
    assert len(mx.sessions) == 2
    # no MX: the domain itself (implicit MX)
    dns_srv.add("impl.sel.test", "A", ["127.0.0.13"])
    r = run(probe_partner(partner("impl.sel.test"), dns=dns, port=mx.port, timeout=5,
                          ca_file=str(pki.cert_path)))
    assert [(x.mx_host, x.address) for x in r] == [("impl.sel.test", "127.0.0.13")]
    assert r[0].ok, r
    # null MX: nothing to probe
    dns_srv.add("null.test", "MX", ["0 ."])
    assert run(probe_partner(partner("null.test"), dns=dns, timeout=5)) == []
    # a dot entry is not probed (its mail goes to subdomains not known in advance)
    assert run(probe_partner(partner(".sel.test"), dns=dns, timeout=5)) == []
    assert len(mx.sessions) == 3


def test_ipv6_mx(pki, dns_srv, dns, servers):
    leaf = pki.issue("mx-v6", "mx.v6.test")
    mx = MX("::1", cert=leaf.cert_path, key=leaf.key_path)
    servers.append(mx)
    dns_srv.add("v6.test", "MX", ["10 mx.v6.test."])
    dns_srv.add("mx.v6.test", "AAAA", ["::1"])
    r = run(probe_partner(partner("v6.test"), dns=dns, port=mx.port, timeout=5,
                          ca_file=str(pki.cert_path)))
    assert [(x.address, x.ok) for x in r] == [("::1", True)], r


def test_hostile_server_text_is_cleaned(pki, dns_srv, dns, servers):
    mx = MX("127.0.0.14", greeting=b"554 go away \x1b[31m\xff" + b"x" * 2000 + b"\r\n")
    servers.append(mx)
    dns_srv.add("rude.test", "MX", ["10 mx.rude.test."])
    dns_srv.add("mx.rude.test", "A", ["127.0.0.14"])
    r = run(probe_partner(partner("rude.test"), dns=dns, port=mx.port, timeout=5,
                          ca_file=str(pki.cert_path)))[0]
    assert not r.ok and r.reason == reasons.OUTBOUND_OTHER, r
    assert "554" in r.detail and "\x1b" not in r.detail and len(r.detail) <= 300
    no_crlf(r)
    mx2 = MX("127.0.0.14", greeting=b"220-" + b"y" * 10000 + b"\r\n220 ok\r\n")
    servers.append(mx2)
    r = run(probe_partner(partner("rude.test"), dns=dns, port=mx2.port, timeout=5,
                          ca_file=str(pki.cert_path)))[0]
    assert not r.ok and r.reason == reasons.OUTBOUND_OTHER and "too long" in r.detail, r
    no_crlf(r)
