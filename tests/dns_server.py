"""A tiny authoritative-style DNS server for tests (UDP + TCP on 127.0.0.1, ephemeral port).

Built on dnspython's message/rdata classes.  Per RRset it can claim DNSSEC validation (sets the
AD bit, as a validating resolver would — only when the query has DO or AD set, RFC 6840 §5.7),
delay the answer, or never answer (to provoke client timeouts), and it answers SERVFAIL on
request.  Names without any data get NXDOMAIN; a name with other types gets NODATA.

    with DnsServer() as srv:
        srv.add("example.test", "MX", ["10 mx.example.test."], ad=True)
        srv.add("_25._tcp.mx.example.test", "TLSA", ["3 1 1 " + "ab" * 32], ad=True)
        srv.drop("slow.test")            # never answers
        srv.port                          # the bound port (UDP and TCP)
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = ["DnsServer"]


@dataclass
class _RRset:
    records: list[str]
    ttl: int
    ad: bool
    delay: float


class DnsServer:
    def __init__(self) -> None:
        self._data: dict[tuple[dns.name.Name, int], _RRset] = {}
        self._drop: set[dns.name.Name] = set()
        self._servfail: set[dns.name.Name] = set()
        self._secure_denial: set[dns.name.Name] = set()
        self._lock = threading.Lock()
        self.queries: list[tuple[str, str, int, bool]] = []  # (name, type, flags, do)
        self._udp: socketserver.ThreadingUDPServer | None = None
        self._tcp: socketserver.ThreadingTCPServer | None = None
        self._threads: list[threading.Thread] = []

    # -- data --------------------------------------------------------------------------------
    def add(self, name: str, rdtype: str, records: list[str], *, ad: bool = False,
            ttl: int = 300, delay: float = 0.0) -> None:
        key = (dns.name.from_text(name), dns.rdatatype.from_text(rdtype))
        with self._lock:
            self._data[key] = _RRset(list(records), ttl, ad, delay)

    def remove(self, name: str, rdtype: str) -> None:
        with self._lock:
            self._data.pop((dns.name.from_text(name), dns.rdatatype.from_text(rdtype)), None)

    def drop(self, name: str) -> None:
        """Never answer queries for ``name`` (any type)."""
        with self._lock:
            self._drop.add(dns.name.from_text(name))

    def secure_denial(self, name: str) -> None:
        """NODATA / NXDOMAIN answers for ``name`` claim DNSSEC validation (AD bit)."""
        with self._lock:
            self._secure_denial.add(dns.name.from_text(name))

    def servfail(self, name: str) -> None:
        with self._lock:
            self._servfail.add(dns.name.from_text(name))

    # -- serving -----------------------------------------------------------------------------
    def answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if not query.question:
            return None
        q = query.question[0]
        do = bool(query.ednsflags & dns.flags.DO) if query.edns >= 0 else False
        with self._lock:
            self.queries.append((q.name.to_text(), dns.rdatatype.to_text(q.rdtype),
                                 query.flags, do))
            if q.name in self._drop:
                return None
            servfail = q.name in self._servfail
            rr = self._data.get((q.name, q.rdtype))
            exists = any(n == q.name for n, _ in self._data)
            denial_ad = q.name in self._secure_denial
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        if servfail:
            resp.set_rcode(dns.rcode.SERVFAIL)
            return resp.to_wire()
        if rr is not None:
            if rr.delay:
                time.sleep(rr.delay)
            rrset = dns.rrset.from_text_list(q.name, rr.ttl, dns.rdataclass.IN, q.rdtype, rr.records)
            resp.answer.append(rrset)
            if rr.ad and (do or query.flags & dns.flags.AD):
                resp.flags |= dns.flags.AD
        else:
            if not exists:
                resp.set_rcode(dns.rcode.NXDOMAIN)
            if denial_ad and (do or query.flags & dns.flags.AD):
                resp.flags |= dns.flags.AD
        return resp.to_wire()

    def start(self) -> "DnsServer":
        outer = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                out = outer.answer(data)
                if out is not None:
                    if len(out) > 1232:  # truncate: client retries over TCP
                        msg = dns.message.from_wire(out)
                        msg.answer = []
                        msg.flags |= dns.flags.TC
                        out = msg.to_wire()
                    sock.sendto(out, self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                conn.settimeout(5)
                try:
                    while True:
                        head = _recv_exact(conn, 2)
                        if head is None:
                            return
                        data = _recv_exact(conn, struct.unpack("!H", head)[0])
                        if data is None:
                            return
                        out = outer.answer(data)
                        if out is None:
                            continue
                        conn.sendall(struct.pack("!H", len(out)) + out)
                except OSError:
                    return

        socketserver.ThreadingUDPServer.daemon_threads = True
        socketserver.ThreadingTCPServer.daemon_threads = True
        for _ in range(20):  # bounded: find a port free for both UDP and TCP
            udp = socketserver.ThreadingUDPServer(("127.0.0.1", 0), Udp)
            port = udp.server_address[1]
            try:
                socketserver.ThreadingTCPServer.allow_reuse_address = True
                tcp = socketserver.ThreadingTCPServer(("127.0.0.1", port), Tcp)
            except OSError:
                udp.server_close()
                continue
            self._udp, self._tcp = udp, tcp
            break
        else:
            raise RuntimeError("no free port for the test DNS server")
        for srv in (self._udp, self._tcp):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                 daemon=True)
            t.start()
            self._threads.append(t)
        return self

    @property
    def port(self) -> int:
        assert self._udp is not None
        return self._udp.server_address[1]

    def stop(self) -> None:
        for srv in (self._udp, self._tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        for t in self._threads:
            t.join(5)
        self._threads.clear()

    def __enter__(self) -> "DnsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
