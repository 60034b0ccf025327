"""Socketmap server over real loopback TCP, backed by the real resolver, DNS and HTTPS servers."""

from __future__ import annotations

import asyncio
import socket

import pytest

from dns_server import DnsServer
from milterd.outbound.mtasts import MtaStsClient
from milterd.outbound.socketmap import SocketmapServer, encode_netstring
from milterd.outbound.dns import DnsClient
from milterd.outbound.tlspolicy import PolicyAnswer, PolicyResolver
from milterd.lab.pki import TestPKI
from mtasts_server import PolicyServer

TLSA = "3 1 1 " + "ab" * 32


def netstring(payload: bytes) -> bytes:
    return str(len(payload)).encode() + b":" + payload + b","


class Client:
    """Minimal socketmap client (what Postfix does): one connection, many requests."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> str | None:
        while b":" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                return None
            self.buf += chunk
        head, _, rest = self.buf.partition(b":")
        n = int(head)
        while len(rest) < n + 1:
            chunk = self.sock.recv(4096)
            if not chunk:
                return None
            rest += chunk
        assert rest[n:n + 1] == b","
        self.buf = rest[n + 1:]
        return rest[:n].decode()

    def query(self, key: str, name: str = "tlspolicy") -> str | None:
        self.send_raw(netstring(f"{name} {key}".encode()))
        return self.read_reply()

    def closed(self) -> bool:
        """True once the server has closed the connection (bounded wait)."""
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("socketmap")
    ca = TestPKI(tmp)
    sts = ca.issue("mta-sts", "mta-sts.sts.test", sans=["mta-sts.sts.test", "mta-sts.testing.test"])
    cert, key = sts.cert_path, sts.key_path
    with DnsServer() as dns_srv, PolicyServer(cert, key) as web:
        dns_srv.add("dane.test", "MX", ["10 mx.dane.test."], ad=True)
        dns_srv.add("_25._tcp.mx.dane.test", "TLSA", [TLSA], ad=True)
        dns_srv.add("nodnssec.test", "MX", ["10 mx.nodnssec.test."])
        dns_srv.add("_25._tcp.mx.nodnssec.test", "TLSA", [TLSA])
        for dom, mode in (("sts.test", "enforce"), ("testing.test", "testing")):
            dns_srv.add(dom, "MX", [f"10 mx.{dom}."])
            dns_srv.add(f"_mta-sts.{dom}", "TXT", ['"v=STSv1; id=20240101;"'])
            web.routes[f"mta-sts.{dom}"] = (
                200, {"Content-Type": "text/plain"},
                f"version: STSv1\nmode: {mode}\nmx: mx.{dom}\nmx: *.mx.{dom}\nmax_age: 3600\n".encode())
        # DNS that never answers, for everything below these names
        for name in ("partner.test", "x.group.test", "timeout.test"):
            dns_srv.drop(name)
        dns = DnsClient(["127.0.0.1"], port=dns_srv.port, timeout=0.3, lifetime=0.6)
        sts = MtaStsClient(dns, ca_file=str(ca.ca_path), address_override={
            f"mta-sts.{d}": ("127.0.0.1", web.port) for d in ("sts.test", "testing.test")})
        resolver = PolicyResolver(["partner.test", ".group.test"], "TLSv1.2", dns, sts)
        handle = SocketmapServer(resolver, "127.0.0.1", 0, max_request=300).start_in_thread()
        try:
            yield handle
        finally:
            handle.stop()


@pytest.fixture
def client(server):
    c = Client(server.port)
    yield c
    c.close()


def test_port_is_bound(server):
    assert server.port > 0


@pytest.mark.parametrize("key,reply", [
    ("partner.test", "OK secure match=partner.test:.partner.test protocols=>=TLSv1.2"),
    ("partner.test.", "OK secure match=partner.test:.partner.test protocols=>=TLSv1.2"),
    ("[partner.test]:25", "OK secure match=partner.test:.partner.test protocols=>=TLSv1.2"),
    ("x.group.test", "OK secure match=x.group.test:.x.group.test protocols=>=TLSv1.2"),
    ("dane.test", "OK dane-only"),
    ("nodnssec.test", "NOTFOUND "),
    ("sts.test", "OK secure match=mx.sts.test:.mx.sts.test servername=hostname"),
    ("testing.test", "NOTFOUND "),
    ("unknown.test", "NOTFOUND "),
    ("timeout.test", "TEMP DNS lookup failure"),
    ("bad..key", "NOTFOUND "),
    (".partner.test", "NOTFOUND "),            # Postfix's parent-domain probe
    ("private/dovecot-lmtp", "NOTFOUND "),     # UNIX-domain next hop
])
def test_replies(client, key, reply):
    assert client.query(key) == reply


def test_many_requests_on_one_connection(client):
    keys = ["partner.test", "dane.test", "unknown.test"] * 5
    # pipelined: all requests first, then all replies, in order
    client.send_raw(b"".join(netstring(f"tlspolicy {k}".encode()) for k in keys))
    replies = [client.read_reply() for _ in keys]
    assert replies[0].startswith("OK secure") and replies[1] == "OK dane-only"
    assert replies[2] == "NOTFOUND " and replies[3:] == replies[:3] * 4


def test_request_split_across_packets(client):
    data = netstring(b"tlspolicy dane.test")
    for i in range(len(data)):
        client.send_raw(data[i:i + 1])
    assert client.read_reply() == "OK dane-only"


def test_bad_requests_keep_connection(client):
    assert client.query("dane.test", name="othermap") == "PERM unknown map name"
    client.send_raw(netstring(b"tlspolicy"))
    assert client.read_reply() == "PERM invalid request"
    client.send_raw(netstring(b"tlspolicy \xff\xfe"))
    assert client.read_reply() == "PERM invalid request encoding"
    assert client.query("dane.test") == "OK dane-only"


@pytest.mark.parametrize("raw,reply", [
    (b"abc:tlspolicy x,", "PERM malformed netstring"),
    (b"5:tlspolicy x,", "PERM malformed netstring"),          # length lies: no comma
    (b"999999:" + b"a" * 10, "PERM request too large"),        # over max_request
    (b"1" * 100, "PERM malformed netstring"),                  # no colon at all
    (b"-1:,", "PERM malformed netstring"),
])
def test_framing_errors_get_perm_and_close(server, raw, reply):
    c = Client(server.port)
    try:
        c.send_raw(raw)
        assert c.read_reply() == reply
        assert c.closed()
    finally:
        c.close()
    # the server survives
    c2 = Client(server.port)
    try:
        assert c2.query("partner.test").startswith("OK secure")
    finally:
        c2.close()


def test_clean_eof_and_abrupt_close(server):
    c = Client(server.port)
    c.send_raw(b"12:tlspolicy")  # half a request, then gone
    c.close()
    c = Client(server.port)
    assert c.query("dane.test") == "OK dane-only"
    c.close()


def test_encode_netstring():
    assert encode_netstring("OK x") == b"4:OK x,"
    assert encode_netstring("") == b"0:,"


class _Boom:
    async def resolve(self, key: str) -> PolicyAnswer:
        if key == "slow.test":
            await asyncio.sleep(5)
        raise RuntimeError("secret internal detail")


def test_resolver_errors_become_temp_without_detail():
    handle = SocketmapServer(_Boom(), "127.0.0.1", 0, request_timeout=0.3).start_in_thread()
    try:
        c = Client(handle.port)
        assert c.query("x.test") == "TEMP internal error"
        assert c.query("slow.test") == "TEMP lookup timeout"
        c.close()
    finally:
        handle.stop()


def test_idle_connections_are_closed_and_limit_enforced():
    r = PolicyResolver(["partner.test"], None, None, None)
    handle = SocketmapServer(r, "127.0.0.1", 0, idle_timeout=0.3, max_connections=1).start_in_thread()
    try:
        c1 = Client(handle.port)
        assert c1.query("partner.test").startswith("OK")
        c2 = Client(handle.port)  # over the limit: closed at once
        assert c2.closed()
        c2.close()
        assert c1.closed()  # idle timeout
        c1.close()
        c3 = Client(handle.port)
        assert c3.query("partner.test").startswith("OK")
        c3.close()
    finally:
        handle.stop()


def test_stop_closes_open_connections_and_port():
    r = PolicyResolver(["partner.test"], None, None, None)
    handle = SocketmapServer(r, "127.0.0.1", 0).start_in_thread()
    c = Client(handle.port)
    assert c.query("partner.test").startswith("OK")
    handle.stop()
    assert not handle.thread.is_alive()
    assert c.closed()
    c.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", handle.port), timeout=2).close()


def test_bind_error_is_raised():
    r = PolicyResolver([], None, None, None)
    h = SocketmapServer(r, "127.0.0.1", 0).start_in_thread()
    try:
        with pytest.raises(OSError):
            SocketmapServer(r, "127.0.0.1", h.port).start_in_thread()
    finally:
        h.stop()


def test_resolver_can_be_swapped_on_reload():
    handle = SocketmapServer(PolicyResolver(["old.test"], None, None, None)).start_in_thread()
    try:
        c = Client(handle.port)
        assert c.query("old.test").startswith("OK secure")
        handle.server.resolver = PolicyResolver(["new.test"], None, None, None)
        assert c.query("old.test") == "NOTFOUND "
        assert c.query("new.test") == "OK secure match=new.test:.new.test"
        c.close()
    finally:
        handle.stop()


# -- TLSRPT attributes and the served-policy record ------------------------------------------
def test_tlsrpt_switch_adds_attributes_to_sts_answers_only(server):
    server.server.tlsrpt = True
    c = Client(server.port)
    try:
        sts = c.query("sts.test")
        assert sts == ("OK secure match=mx.sts.test:.mx.sts.test servername=hostname"
                       " policy_type=sts policy_domain=sts.test"
                       " { policy_string = version: STSv1 } { policy_string = mode: enforce }"
                       " { policy_string = mx: mx.sts.test } { policy_string = mx: *.mx.sts.test }"
                       " { policy_string = max_age: 3600 }"
                       " mx_host_pattern=mx.sts.test mx_host_pattern=*.mx.sts.test")
        assert c.query("dane.test") == "OK dane-only"
        assert c.query("partner.test") == (
            "OK secure match=partner.test:.partner.test protocols=>=TLSv1.2")
        assert c.query("testing.test") == "NOTFOUND "
        server.server.tlsrpt = False                         # reload back to Postfix < 3.10
        assert c.query("sts.test") == "OK secure match=mx.sts.test:.mx.sts.test servername=hostname"
    finally:
        server.server.tlsrpt = False
        c.close()


def test_on_answer_sees_every_answer_and_cannot_break_replies():
    seen = []

    def on_answer(key, answer):
        seen.append((key, answer.kind))
        if key == "boom.test":
            raise RuntimeError("recording failed")

    r = PolicyResolver(["partner.test", "boom.test"], None, None, None)
    handle = SocketmapServer(r, on_answer=on_answer).start_in_thread()
    try:
        c = Client(handle.port)
        assert c.query("partner.test").startswith("OK secure")
        assert c.query("boom.test").startswith("OK secure")       # the reply is unchanged
        assert c.query(".partner.test") == "NOTFOUND "
        c.close()
    finally:
        handle.stop()
    assert seen == [("partner.test", "secure"), ("boom.test", "secure"),
                    (".partner.test", "notfound")]


def test_served_policies_record_and_lookup():
    from milterd.outbound.service import ServedPolicies
    from support import FakeClock

    clock = FakeClock(100.0)
    served = ServedPolicies(max_entries=3, ttl=50, clock=clock)
    assert served.lookup("sts.test") is None                  # no server, nothing served
    sts = PolicyAnswer("secure", "secure match=mx.sts.test", "mta-sts", "sts.test",
                       tlsrpt_policy_type="sts", policy_strings=("version: STSv1",),
                       mx_patterns=("mx.sts.test",))
    served.record("STS.test.", sts)
    assert served.lookup("sts.TEST") is sts
    # not recorded: TEMP/PERM (no session follows), [host]/IP hops, parent-domain probes
    served.record("sts.test", PolicyAnswer("temp", "", "none", "sts.test", reason="x"))
    served.record("[sts.test]", PolicyAnswer("notfound", "", "none", "sts.test"))
    served.record(".sts.test", PolicyAnswer("notfound", "", "none", "sts.test"))
    assert served.lookup("sts.test") is sts
    # a later answer for the same domain replaces it (the policy that applied last)
    none = PolicyAnswer("notfound", "", "none", "sts.test")
    served.record("sts.test:25", none)
    assert served.lookup("sts.test") is none
    clock.now += 50
    assert served.lookup("sts.test") is None                  # expired
    for i in range(4):
        served.record(f"d{i}.test", none)
    assert served.lookup("d0.test") is None and served.lookup("d3.test") is none  # bounded


def test_served_policies_follow_the_current_resolver():
    from milterd.outbound.service import ServedPolicies

    served = ServedPolicies()
    old = SocketmapServer(PolicyResolver(["old.test"], None, None, None))
    new = SocketmapServer(PolicyResolver(["new.test"], None, None, None))
    served.register(old)
    assert served.lookup("old.test").source == "send_list"    # peek: the send list
    old.resolver = PolicyResolver(["swapped.test"], None, None, None)  # reconfigure
    assert served.lookup("old.test") is None
    assert served.lookup("swapped.test").source == "send_list"
    served.register(new)                                      # a listener swap: new first
    assert served.lookup("new.test") is not None and served.lookup("swapped.test") is None
    served.unregister(new)                                    # refused reload: back to old
    assert served.lookup("swapped.test") is not None
    served.register(new)
    served.unregister(old)                                    # committed reload
    assert served.lookup("new.test") is not None
    served.unregister(new)
    assert served.resolver is None and served.lookup("new.test") is None


def test_service_records_served_answers_across_reload(tmp_path):
    """Through the service wiring the daemon uses: start_socketmap, a query over TCP, then
    reconfigure (what a reload does) with a resolver that would answer otherwise — the follower's
    lookup still gives what was served; the switch follows the reload."""
    from milterd.core.app import App
    from milterd.core.config import parse_config
    from milterd.lab.net import free_port
    from milterd.outbound.service import served_policies, start_socketmap

    port = free_port()

    def config(send, tlsrpt):
        return parse_config(f'[socketmap]\nlisten = "127.0.0.1:{port}"\ntlsrpt = {tlsrpt}\n'
                            f'[domain_security]\nsend_domains = ["{send}"]\n'
                            '[outbound]\ndns_servers = ["127.0.0.1:9"]\n')

    app = App(config("partner.test", "false"))
    service = start_socketmap(app, app.config)
    try:
        c = Client(port)
        assert c.query("partner.test").startswith("OK secure match=partner.test")
        service.reconfigure(config("other.test", "true"))
        assert service.handle.server.tlsrpt is True
        lookup = served_policies(app).lookup
        assert lookup("partner.test").source == "send_list"    # what was served survives
        assert served_policies(app).resolver.peek("partner.test") is None
        assert lookup("other.test").source == "send_list"      # new resolver's peek
        c.close()
    finally:
        service.stop()
    assert served_policies(app).resolver is None
    assert served_policies(app).lookup("partner.test").source == "send_list"
