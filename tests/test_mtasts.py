"""MTA-STS: parsing (pure) and discovery + HTTPS fetch + cache against loopback servers."""

from __future__ import annotations

import asyncio

import pytest

from dns_server import DnsServer
from milterd.outbound.dns import DnsClient
from milterd.outbound.mtasts import (MtaStsClient, StsError, StsPolicy, parse_sts_policy,
                                     parse_sts_txt)
from milterd.lab.pki import TestPKI
from mtasts_server import PolicyServer
from support import FakeClock

ENFORCE = (b"version: STSv1\r\nmode: enforce\r\nmx: mx1.sts.test\r\nmx: *.backup.sts.test\r\n"
           b"max_age: 86400\r\n")


# -- pure parsing ------------------------------------------------------------------------------
def test_txt_record_parsing():
    assert parse_sts_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_sts_txt(["v=STSv1;id=abc"]) == "abc"
    assert parse_sts_txt(["v=spf1 -all", "v=STSv1; id=x1"]) == "x1"  # others discarded
    assert parse_sts_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # not exactly one
    assert parse_sts_txt(["v=STSv1; id=" + "a" * 33]) is None  # id too long
    assert parse_sts_txt(["v=STSv1; id=a-b"]) is None  # not alnum
    assert parse_sts_txt(["v=STSv1"]) is None
    assert parse_sts_txt([]) is None


def test_policy_parsing_and_postfix_form():
    pol = parse_sts_policy(ENFORCE.decode())
    assert pol == StsPolicy("enforce", ("mx1.sts.test", "*.backup.sts.test"), 86400)
    assert pol.postfix_match() == "mx1.sts.test:.backup.sts.test"
    assert pol.matches_mx("a.backup.sts.test")
    assert not pol.matches_mx("a.b.backup.sts.test")  # wildcard = exactly one label
    assert not pol.matches_mx("backup.sts.test")
    assert pol.policy_strings() == ["version: STSv1", "mode: enforce", "mx: mx1.sts.test",
                                    "mx: *.backup.sts.test", "max_age: 86400"]
    # LF endings, extra keys ignored, max_age clamped, mode none needs no mx
    assert parse_sts_policy("version: STSv1\nmode: none\nmax_age: 9999999999\nfoo: bar\n") == \
        StsPolicy("none", (), 31557600)


@pytest.mark.parametrize("body", [
    "mode: enforce\nmx: a.test\nmax_age: 1\n",                      # no version
    "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
    "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmax_age: 1\n",                  # enforce without mx
    "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
    "version: STSv1\nmode: enforce\nmx: a.test\n",                  # no max_age
    "version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 1\n",
    "garbage without colon\n",
])
def test_invalid_policies(body):
    with pytest.raises(StsError) as ei:
        parse_sts_policy(body)
    assert ei.value.result_type == "sts-policy-invalid"


# -- network -----------------------------------------------------------------------------------
@pytest.fixture
def env(tmp_path):
    ca = TestPKI(tmp_path)
    sts = ca.issue("mta-sts", "mta-sts.sts.test", sans=["mta-sts.sts.test", "mta-sts.other.test"])
    cert, key = sts.cert_path, sts.key_path
    with DnsServer() as dns_srv, PolicyServer(cert, key) as web:
        dns_srv.add("_mta-sts.sts.test", "TXT", ['"v=STSv1; id=one;"'])
        web.routes["mta-sts.sts.test"] = (200, {"Content-Type": "text/plain; charset=utf-8"}, ENFORCE)
        clock = FakeClock(1_000_000.0)
        dns = DnsClient(["127.0.0.1"], port=dns_srv.port, timeout=0.3, lifetime=0.6)
        override = {f"mta-sts.{d}": ("127.0.0.1", web.port) for d in ("sts.test", "other.test")}
        client = MtaStsClient(dns, ca_file=str(ca.ca_path), address_override=override,
                              fetch_timeout=3.0, clock=clock)
        yield dns_srv, web, client, clock, ca, override, dns


def run(coro):
    return asyncio.run(coro)


def test_fetch_enforce_and_cache_by_id(env):
    dns_srv, web, client, clock, *_ = env
    res = run(client.lookup("sts.test"))
    assert res.status == "fetched" and res.policy_id == "one"
    assert res.policy.mode == "enforce"
    assert web.requests == [("mta-sts.sts.test", "/.well-known/mta-sts.txt")]
    # same id: no refetch
    res = run(client.lookup("sts.test"))
    assert res.status == "cached" and len(web.requests) == 1
    # new id: refetch
    dns_srv.add("_mta-sts.sts.test", "TXT", ['"v=STSv1; id=two;"'])
    web.routes["mta-sts.sts.test"] = (200, {"Content-Type": "text/plain"},
                                      ENFORCE.replace(b"enforce", b"testing"))
    res = run(client.lookup("sts.test"))
    assert res.status == "fetched" and res.policy.mode == "testing" and len(web.requests) == 2


def test_cached_policy_survives_dns_failure_and_expires(env):
    dns_srv, web, client, clock, *_ = env
    assert run(client.lookup("sts.test")).status == "fetched"
    dns_srv.drop("_mta-sts.sts.test")
    res = run(client.lookup("sts.test"))
    assert res.status == "cached" and res.policy.mode == "enforce"
    clock.now += 86401  # past max_age
    assert client.cached("sts.test") is None
    assert run(client.lookup("sts.test")).status == "dns-error"


def test_cached_policy_survives_removed_record_and_failed_refetch(env):
    dns_srv, web, client, clock, *_ = env
    assert run(client.lookup("sts.test")).status == "fetched"
    dns_srv.remove("_mta-sts.sts.test", "TXT")
    assert run(client.lookup("sts.test")).status == "cached"
    dns_srv.add("_mta-sts.sts.test", "TXT", ['"v=STSv1; id=three;"'])
    web.routes["mta-sts.sts.test"] = (500, {"Content-Type": "text/plain"}, b"oops")
    res = run(client.lookup("sts.test"))
    assert res.status == "cached" and res.policy_id == "one"


def test_no_record_is_none(env):
    _, _, client, *_ = env
    assert run(client.lookup("nothing.test")).status == "none"


@pytest.mark.parametrize("route,error", [
    ((301, {"Location": "https://elsewhere.test/", "Content-Type": "text/plain"}, b""),
     "sts-policy-fetch-error"),
    ((404, {"Content-Type": "text/plain"}, b""), "sts-policy-fetch-error"),
    ((200, {"Content-Type": "text/html"}, ENFORCE), "sts-policy-invalid"),
    ((200, {"Content-Type": "text/plain"}, b"version: STSv1\nmode: bogus\n"), "sts-policy-invalid"),
    ((200, {"Content-Type": "text/plain"}, b"x" * (64 * 1024 + 1)), "sts-policy-fetch-error"),
])
def test_fetch_errors(env, route, error):
    dns_srv, web, client, *_ = env
    web.routes["mta-sts.sts.test"] = route
    res = run(client.lookup("sts.test"))
    assert res.status == "error" and res.error == error and res.policy is None


def test_chunked_body_and_size_limit_without_length(env):
    dns_srv, web, client, *_ = env
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(ENFORCE), ENFORCE)
    web.routes["mta-sts.sts.test"] = (200, {"Content-Type": "text/plain",
                                            "Transfer-Encoding": "chunked"}, chunked)
    assert run(client.lookup("sts.test")).policy.mode == "enforce"


def test_untrusted_and_wrong_name_certificates(env, tmp_path):
    dns_srv, web, client, clock, ca, override, dns = env
    # a client trusting a different CA: webpki failure
    other_ca = TestPKI(tmp_path / "other", "other CA")
    c2 = MtaStsClient(dns, ca_file=str(other_ca.ca_path), address_override=override, clock=clock)
    res = run(c2.lookup("sts.test"))
    assert res.status == "error" and res.error == "sts-webpki-invalid"
    # right CA, but the server's certificate does not name mta-sts.wrong.test
    dns_srv.add("_mta-sts.wrong.test", "TXT", ['"v=STSv1; id=w;"'])
    c3 = MtaStsClient(dns, ca_file=str(ca.ca_path),
                      address_override={"mta-sts.wrong.test": ("127.0.0.1", web.port)}, clock=clock)
    res = run(c3.lookup("wrong.test"))
    assert res.status == "error" and res.error == "sts-webpki-invalid"


def test_fetch_time_limit(env):
    """A server that accepts but never answers: the fetch is bounded by fetch_timeout."""
    import socket
    import time
    dns_srv, web, client, clock, ca, override, dns = env
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        c = MtaStsClient(dns, ca_file=str(ca.ca_path), fetch_timeout=0.5, clock=clock,
                         address_override={"mta-sts.sts.test": silent.getsockname()})
        t0 = time.monotonic()
        res = run(c.lookup("sts.test"))
        assert res.status == "error" and res.error == "sts-policy-fetch-error"
        assert time.monotonic() - t0 < 3
    finally:
        silent.close()


def test_cache_is_bounded(env):
    dns_srv, web, client, clock, ca, override, dns = env
    small = MtaStsClient(dns, ca_file=str(ca.ca_path), address_override=override, clock=clock,
                         cache_size=1)
    dns_srv.add("_mta-sts.other.test", "TXT", ['"v=STSv1; id=o;"'])
    web.routes["mta-sts.other.test"] = (200, {"Content-Type": "text/plain"}, ENFORCE)
    assert run(small.lookup("sts.test")).status == "fetched"
    assert run(small.lookup("other.test")).status == "fetched"
    assert small.cached("sts.test") is None and small.cached("other.test") is not None
