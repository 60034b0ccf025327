"""The MTA-STS policy cache shared by the fleet (#17 item 3): a policy fetched by host A (loopback
DNS and HTTPS policy host) is served by host B from the store while B's DNS or HTTPS is
unreachable (RFC 8461 §5.1), on SQLite and on a real private PostgreSQL; a store that is down or
hangs leaves lookups working (local fetch) and is not asked again for a while; the resolver of a
host whose DNS fails serves the shared policy; the socketmap service wires it."""

from __future__ import annotations

import asyncio  # noqa: F401
import json
import logging
import threading
import time

import pytest

from dns_server import DnsServer
from milterd.lab.net import free_port
from milterd.lab.pki import TestPKI
from milterd.lab.wait import wait_until
from milterd.outbound.dns import DnsClient
from milterd.outbound.mtasts import MtaStsClient, SharedStsCache
from milterd.outbound.tlspolicy import PolicyResolver
from milterd.store.api import open_store
from mtasts_server import PolicyServer
from support import FakeClock

ENFORCE = (b"version: STSv1\r\nmode: enforce\r\nmx: mx1.sts.test\r\nmx: *.backup.sts.test\r\n"
           b"max_age: 86400\r\n")
TESTING = ENFORCE.replace(b"enforce", b"testing")


@pytest.fixture(scope="module")
def pg():
    from milterd.lab.postgres import running_postgres

    with running_postgres() as lab:
        yield lab


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/milterd.db"
    else:
        url = request.getfixturevalue("pg").url
    s = open_store(url)
    s.migrate()
    if request.param == "postgresql":
        s._run(lambda cur: cur.execute("DELETE FROM cache"))
    s.close()
    return url


@pytest.fixture
def net(tmp_path):
    ca = TestPKI(tmp_path / "pki")
    sts = ca.issue("mta-sts", "mta-sts.sts.test", sans=["mta-sts.sts.test"])
    with DnsServer() as dns_srv, PolicyServer(sts.cert_path, sts.key_path) as web:
        dns_srv.add("sts.test", "MX", ["10 mx1.sts.test."])
        dns_srv.add("_mta-sts.sts.test", "TXT", ['"v=STSv1; id=one;"'])
        web.routes["mta-sts.sts.test"] = (200, {"Content-Type": "text/plain"}, ENFORCE)
        yield dns_srv, web, ca


def closed_port() -> int:
    """A loopback TCP/UDP port nothing listens on."""
    return free_port()


def host(store, name: str, ca, *, dns_port: int, web_port: int, clock) -> MtaStsClient:
    dns = DnsClient(["127.0.0.1"], port=dns_port, timeout=0.3, lifetime=0.6)
    shared = SharedStsCache(lambda: store, name, read_timeout=2.0)
    return MtaStsClient(dns, ca_file=str(ca.ca_path), fetch_timeout=2.0, clock=clock,
                        address_override={"mta-sts.sts.test": ("127.0.0.1", web_port)},
                        shared_cache=shared)


def run(coro):
    return asyncio.run(coro)


def test_policy_fetched_by_a_is_served_by_b(net, store_url):
    dns_srv, web, ca = net
    clock = FakeClock(1_000_000.0)
    store_a, store_b = open_store(store_url), open_store(store_url)   # two hosts, two connections
    a = host(store_a, "mx1.test", ca, dns_port=dns_srv.port, web_port=web.port, clock=clock)
    res = run(a.lookup("sts.test"))
    assert res.status == "fetched" and res.policy_id == "one" and len(web.requests) == 1
    entry = wait_until(lambda: store_b.cache_get("mta-sts", "sts.test", clock()),
                       what="host A's policy in the store")
    value = json.loads(entry.value)
    assert (value["id"], value["host"], value["mode"]) == ("one", "mx1.test", "enforce")
    assert value["policy"] == ENFORCE.decode()
    assert entry.expires_at == clock() + 86400 and entry.host == "mx1.test"

    # B: DNS points nowhere, the policy host is unreachable — the shared policy is served
    b = host(store_b, "mx2.test", ca, dns_port=closed_port(), web_port=closed_port(), clock=clock)
    res_b = run(b.lookup("sts.test"))
    assert res_b.status == "cached" and res_b.policy == res.policy and res_b.policy_id == "one"
    assert "mx1.test" in res_b.detail
    assert b.cached("sts.test").policy == res.policy              # now in B's own cache too
    assert len(web.requests) == 1

    # C: DNS works, HTTPS is down; the TXT id is the shared one: no fetch needed
    c = host(open_store(store_url), "mx3.test", ca, dns_port=dns_srv.port,
             web_port=closed_port(), clock=clock)
    res_c = run(c.lookup("sts.test"))
    assert (res_c.status, res_c.policy) == ("cached", res.policy) and len(web.requests) == 1

    # A new policy id: A fetches it and shares it; D (HTTPS down) gets the new one from the store
    dns_srv.add("_mta-sts.sts.test", "TXT", ['"v=STSv1; id=two;"'])
    web.routes["mta-sts.sts.test"] = (200, {"Content-Type": "text/plain"}, TESTING)
    clock.now += 100
    assert run(a.lookup("sts.test")).status == "fetched" and len(web.requests) == 2
    wait_until(lambda: json.loads(store_b.cache_get("mta-sts", "sts.test", clock()).value)["id"]
               == "two", what="the new id in the store")
    # C still holds "one" locally; the TXT says "two": the store has it, no fetch
    res_c = run(c.lookup("sts.test"))
    assert (res_c.status, res_c.policy_id, res_c.policy.mode) == ("cached", "two", "testing")
    assert len(web.requests) == 2

    # expired (fetched + max_age): B has nothing left to fall back on
    clock.now += 86401
    b2 = host(store_b, "mx2.test", ca, dns_port=closed_port(), web_port=closed_port(), clock=clock)
    assert run(b2.lookup("sts.test")).status == "dns-error"


def test_a_down_store_leaves_lookups_working(net, caplog):
    caplog.set_level(logging.INFO)
    dns_srv, web, ca = net
    clock = FakeClock(1_000_000.0)
    down = open_store(f"postgresql://milterd:pw@127.0.0.1:{closed_port()}/milterd")
    shared = SharedStsCache(lambda: down, "mx1.test", read_timeout=2.0, retry_after=30.0)
    dns = DnsClient(["127.0.0.1"], port=dns_srv.port, timeout=0.3, lifetime=0.6)
    c = MtaStsClient(dns, ca_file=str(ca.ca_path), fetch_timeout=2.0, clock=clock,
                     address_override={"mta-sts.sts.test": ("127.0.0.1", web.port)},
                     shared_cache=shared)
    res = run(c.lookup("sts.test"))
    assert res.status == "fetched" and res.policy.mode == "enforce"
    assert shared.failures >= 1 and shared.reads == 1
    # the store is left alone now: the next lookups neither read nor write it
    dns_srv.add("_mta-sts.other.test", "TXT", ['"v=STSv1; id=x;"'])
    run(c.lookup("other.test"))
    assert shared.reads == 1
    warnings = [r for r in caplog.records if "shared MTA-STS cache unavailable" in r.getMessage()]
    assert len(warnings) == 1


def test_a_hanging_store_costs_a_lookup_at_most_read_timeout(net, tmp_path):
    dns_srv, web, ca = net
    clock = FakeClock(1_000_000.0)
    release = threading.Event()
    real = open_store(f"sqlite:///{tmp_path}/milterd.db")
    real.migrate()

    class Hanging:
        def cache_get(self, *a):
            release.wait(30)
            return real.cache_get(*a)

        def cache_put(self, *a):
            release.wait(30)
            return real.cache_put(*a)

    shared = SharedStsCache(lambda: Hanging(), "mx1.test", read_timeout=0.3, retry_after=30.0)
    dns = DnsClient(["127.0.0.1"], port=dns_srv.port, timeout=0.3, lifetime=0.6)
    c = MtaStsClient(dns, ca_file=str(ca.ca_path), fetch_timeout=2.0, clock=clock,
                     address_override={"mta-sts.sts.test": ("127.0.0.1", web.port)},
                     shared_cache=shared)

    async def many():
        # other lookups on the same loop go on while the store hangs
        return await asyncio.gather(c.lookup("sts.test"), c.lookup("none.test"))

    t0 = time.monotonic()
    res, none = run(many())
    took = time.monotonic() - t0
    assert res.status == "fetched" and none.status == "none"
    assert took < 2.0, took
    t0 = time.monotonic()
    assert run(c.lookup("sts.test")).status == "cached"         # local, store not asked
    assert time.monotonic() - t0 < 0.5
    release.set()


def test_resolver_with_dns_down_serves_the_shared_policy(net, tmp_path):
    """Host B's whole DNS fails (its MX lookup too): the resolver falls back to the cached
    MTA-STS enforce policy — which B has only in the shared store."""
    dns_srv, web, ca = net
    clock = FakeClock(5000.0)
    url = f"sqlite:///{tmp_path}/milterd.db"
    s = open_store(url)
    s.migrate()
    a = host(s, "mx1.test", ca, dns_port=dns_srv.port, web_port=web.port, clock=clock)
    resolver_a = PolicyResolver([], None, a._dns, a, clock=clock)
    answer = run(resolver_a.resolve("sts.test"))
    assert answer.socketmap_reply() == "OK secure match=mx1.sts.test:.backup.sts.test " \
        "servername=hostname"
    wait_until(lambda: s.cache_get("mta-sts", "sts.test", clock()), what="shared")
    b = host(open_store(url), "mx2.test", ca, dns_port=closed_port(), web_port=closed_port(),
             clock=clock)
    resolver_b = PolicyResolver([], None, b._dns, b, clock=clock, deadline=2.0)

    # The very first lookup on B (nothing in B's own cache) is served from the store: no TEMP
    # answer, so Postfix need not even defer the first message.
    got = run(resolver_b.resolve("sts.test"))
    assert got.socketmap_reply() == answer.socketmap_reply()
    assert (got.source, got.tlsrpt_policy_type) == ("mta-sts", "sts")


async def _until(pred):
    while not pred():
        await asyncio.sleep(0.01)


def test_socketmap_service_shares_policies_through_the_store_service(net, tmp_path):
    """The wiring: build_resolver gets the app's shared cache, which follows the running store
    service (none before it starts, the new store after a restart)."""
    from milterd.core.app import App
    from milterd.core.config import parse_config
    from milterd.outbound.service import shared_sts_cache
    from milterd.store.service import start_store_services

    dns_srv, web, ca = net
    state = tmp_path / "state"
    state.mkdir()
    config = parse_config(f'[outbound]\nmaillog = "{tmp_path}/maillog"\nstate_dir = "{state}"\n'
                          f'[store]\nhost = "mx9.test"\n')
    app = App(config)
    shared = shared_sts_cache(app)
    assert shared._getter() is None                               # no store service yet
    service = start_store_services(app, config)
    try:
        wait_until(lambda: shared._getter() is not None, what="the store service's store")
        assert shared.host == "mx9.test"
        clock = FakeClock(1_000_000.0)
        dns = DnsClient(["127.0.0.1"], port=dns_srv.port, timeout=0.3, lifetime=0.6)
        c = MtaStsClient(dns, ca_file=str(ca.ca_path), clock=clock, shared_cache=shared,
                         address_override={"mta-sts.sts.test": ("127.0.0.1", web.port)})
        assert run(c.lookup("sts.test")).status == "fetched"
        s = open_store(f"sqlite:///{state}/milterd.db")
        entry = wait_until(lambda: s.cache_get("mta-sts", "sts.test", clock()), what="shared")
        assert entry.host == "mx9.test"
    finally:
        service.stop()
    assert shared._getter() is None
