"""Policy resolution: send list, DANE (AD bit), MTA-STS, DNS failure semantics, cache."""

from __future__ import annotations

import asyncio

import pytest

from dns_server import DnsServer
from milterd.outbound.mtasts import MtaStsClient, StsLookup, StsPolicy
from milterd.outbound.dns import DnsClient
from milterd.outbound.tlspolicy import NextHop, PolicyResolver, parse_nexthop
from milterd.lab.pki import TestPKI
from mtasts_server import PolicyServer
from support import FakeClock

TLSA = "3 1 1 " + "ab" * 32
ENFORCE = b"version: STSv1\nmode: enforce\nmx: mx.sts.test\nmx: *.sts.test\nmax_age: 86400\n"


def run(coro):
    return asyncio.run(coro)


# -- keys (pure) -------------------------------------------------------------------------------
@pytest.mark.parametrize("key,hop", [
    ("example.com", NextHop("example.com", None, False, False)),
    ("Example.COM.", NextHop("example.com", None, False, False)),
    ("example.com:587", NextHop("example.com", 587, False, False)),
    ("[mx.example.com]", NextHop("mx.example.com", None, True, False)),
    ("[mx.example.com]:2525", NextHop("mx.example.com", 2525, True, False)),
    ("[192.0.2.1]:25", NextHop("192.0.2.1", 25, True, True)),
    ("[ipv6:2001:db8::1]", NextHop("2001:db8::1", None, True, True)),
    ("bücher.example", NextHop("xn--bcher-kva.example", None, False, False)),
])
def test_parse_nexthop(key, hop):
    assert parse_nexthop(key) == hop


@pytest.mark.parametrize("key", ["", "a..b", "[x", "example.com:0", "example.com:99999",
                                 "-bad.test", "a b", "x" * 400, "[mx.test]x"])
def test_parse_nexthop_rejects(key):
    assert parse_nexthop(key) is None


# -- send list (no DNS) -------------------------------------------------------------------------
def test_send_list_answers_without_dns():
    r = PolicyResolver(["partner.test", ".group.test"], "TLSv1.2", dns=None, mtasts=None)
    a = run(r.resolve("partner.test"))
    assert (a.kind, a.source) == ("secure", "send_list")
    assert a.socketmap_reply() == "OK secure match=partner.test:.partner.test protocols=>=TLSv1.2"
    a = run(r.resolve("eu.group.test."))
    assert a.policy == "secure match=eu.group.test:.eu.group.test protocols=>=TLSv1.2"
    assert run(r.resolve("[mx.eu.group.test]:25")).kind == "secure"
    # a dotted entry covers strict subdomains only; exact entries do not cover subdomains
    assert run(r.resolve("group.test")).kind == "notfound"
    assert run(r.resolve("sub.partner.test")).kind == "notfound"
    assert run(r.resolve("[192.0.2.1]")).kind == "notfound"
    assert r.peek("partner.test").kind == "secure"


def test_send_list_options():
    r = PolicyResolver(["partner.test"], None, None, None, send_match=("nexthop", "dot-nexthop"))
    assert run(r.resolve("partner.test")).policy == "secure match=nexthop:dot-nexthop"
    with pytest.raises(ValueError):
        PolicyResolver([], "SSLv3", None, None)


@pytest.mark.parametrize("key", ["bad..name", ".partner.test", ".group.test", ".test",
                                 "private/dovecot-lmtp", "/var/run/x.sock"])
def test_non_domain_keys_are_notfound(key):
    """Parent-domain probes and pathnames must not get an error reply (Postfix would defer)."""
    r = PolicyResolver(["partner.test", ".group.test"], None, None, None)
    assert run(r.resolve(key)).socketmap_reply() == "NOTFOUND "


# -- MTA-STS mapping (pure) ---------------------------------------------------------------------
def test_sts_answer_mapping():
    pol = StsPolicy("enforce", ("mx1.sts.test", "*.sts.test"), 600)
    a = PolicyResolver.sts_answer("sts.test", StsLookup("sts.test", "fetched", pol, "i"))
    assert a.policy == "secure match=mx1.sts.test:.sts.test servername=hostname"
    assert (a.source, a.tlsrpt_policy_type, a.mx_patterns) == ("mta-sts", "sts", pol.mx)
    testing = StsPolicy("testing", ("mx1.sts.test",), 600)
    a = PolicyResolver.sts_answer("sts.test", StsLookup("sts.test", "fetched", testing, "i"))
    assert a.kind == "notfound" and a.tlsrpt_policy_type == "sts" and a.sts_mode == "testing"
    a = PolicyResolver.sts_answer("sts.test", StsLookup("sts.test", "fetched", testing, "i"), "may")
    assert a.socketmap_reply() == "OK may"
    none = StsPolicy("none", (), 600)
    a = PolicyResolver.sts_answer("sts.test", StsLookup("sts.test", "fetched", none, "i"))
    assert a.kind == "notfound" and a.tlsrpt_policy_type == "no-policy-found"
    a = PolicyResolver.sts_answer("sts.test", StsLookup("sts.test", "error", error="sts-webpki-invalid"))
    assert a.kind == "notfound" and a.sts_error == "sts-webpki-invalid"


# -- DNS-backed resolution ----------------------------------------------------------------------
@pytest.fixture
def stack(tmp_path):
    ca = TestPKI(tmp_path)
    sts = ca.issue("mta-sts", "mta-sts.sts.test")
    cert, key = sts.cert_path, sts.key_path
    with DnsServer() as srv, PolicyServer(cert, key) as web:
        # DANE: all MX with TLSA, authenticated
        srv.add("dane.test", "MX", ["10 mx1.dane.test.", "20 mx2.dane.test."], ad=True, ttl=120)
        srv.add("_25._tcp.mx1.dane.test", "TLSA", [TLSA], ad=True, ttl=600)
        srv.add("_25._tcp.mx2.dane.test", "TLSA", [TLSA, "1 0 1 " + "cd" * 32], ad=True)
        # only one of two MX with TLSA
        srv.add("half.test", "MX", ["10 a.half.test.", "20 b.half.test."], ad=True)
        srv.add("_25._tcp.a.half.test", "TLSA", [TLSA], ad=True)
        srv.add("b.half.test", "A", ["192.0.2.2"], ad=True)
        # TLSA but no AD bit
        srv.add("insecure.test", "MX", ["10 mx.insecure.test."], ad=False)
        srv.add("_25._tcp.mx.insecure.test", "TLSA", [TLSA], ad=False)
        # signed MX, unsigned TLSA
        srv.add("halfsigned.test", "MX", ["10 mx.halfsigned.test."], ad=True)
        srv.add("_25._tcp.mx.halfsigned.test", "TLSA", [TLSA], ad=False)
        # only unusable TLSA (PKIX-TA/EE usages 0/1)
        srv.add("pkix.test", "MX", ["10 mx.pkix.test."], ad=True)
        srv.add("_25._tcp.mx.pkix.test", "TLSA", ["1 0 1 " + "cd" * 32], ad=True)
        # implicit MX (no MX, signed denial) with TLSA on the domain itself
        srv.add("implicit.test", "A", ["192.0.2.3"], ad=True)
        srv.secure_denial("implicit.test")
        srv.add("implicit-insecure.test", "A", ["192.0.2.4"])
        srv.add("_25._tcp.implicit-insecure.test", "TLSA", [TLSA], ad=True)
        srv.add("_25._tcp.implicit.test", "TLSA", [TLSA], ad=True)
        # null MX
        srv.add("nullmx.test", "MX", ["0 ."], ad=True)
        # MTA-STS
        srv.add("sts.test", "MX", ["10 mx.sts.test."])
        srv.add("_mta-sts.sts.test", "TXT", ['"v=STSv1; id=1;"'])
        web.routes["mta-sts.sts.test"] = (200, {"Content-Type": "text/plain"}, ENFORCE)
        # DANE and MTA-STS both: DANE wins
        srv.add("both.test", "MX", ["10 mx.both.test."], ad=True)
        srv.add("_25._tcp.mx.both.test", "TLSA", [TLSA], ad=True)
        srv.add("_mta-sts.both.test", "TXT", ['"v=STSv1; id=1;"'])
        srv.add("plain.test", "MX", ["10 mx.plain.test."])
        srv.drop("timeout.test")
        srv.drop("_25._tcp.mx.slowtlsa.test")
        srv.add("slowtlsa.test", "MX", ["10 mx.slowtlsa.test."], ad=True)
        srv.servfail("servfail.test")
        dns = DnsClient(["127.0.0.1"], port=srv.port, timeout=0.3, lifetime=0.6)
        clock = FakeClock(5000.0)
        sts = MtaStsClient(dns, ca_file=str(ca.ca_path), clock=clock,
                           address_override={"mta-sts.sts.test": ("127.0.0.1", web.port)})

        def make(**kw):
            return PolicyResolver(["partner.test", ".group.test"], "TLSv1.2", dns, sts,
                                  clock=clock, **kw)
        yield srv, web, make, clock


@pytest.mark.parametrize("key,reply", [
    ("dane.test", "OK dane-only"),
    ("half.test", "OK dane"),
    ("implicit.test", "OK dane-only"),
    ("implicit-insecure.test", "NOTFOUND "),       # no MX, denial not authenticated
    ("[mx1.dane.test]", "OK dane-only"),
    ("[mx1.dane.test]:587", "NOTFOUND "),          # no TLSA at _587._tcp
    ("insecure.test", "NOTFOUND "),                # TLSA without AD: not DANE
    ("halfsigned.test", "NOTFOUND "),
    ("pkix.test", "NOTFOUND "),
    ("nullmx.test", "NOTFOUND "),
    ("nxdomain.test", "NOTFOUND "),
    ("plain.test", "NOTFOUND "),
    ("both.test", "OK dane-only"),
    ("sts.test", "OK secure match=mx.sts.test:.sts.test servername=hostname"),
    ("slowtlsa.test", "OK dane"),                  # TLSA lookup failed for a signed MX
    ("timeout.test", "TEMP DNS lookup failure"),
    ("servfail.test", "TEMP DNS lookup failure"),
    ("partner.test", "OK secure match=partner.test:.partner.test protocols=>=TLSv1.2"),
])
def test_resolution(stack, key, reply):
    _, _, make, _ = stack
    assert run(make().resolve(key)).socketmap_reply() == reply


def test_dane_answer_carries_tlsrpt_details(stack):
    _, _, make, _ = stack
    a = run(make().resolve("dane.test"))
    assert a.tlsrpt_policy_type == "tlsa" and a.mx_patterns == ("mx1.dane.test", "mx2.dane.test")
    assert TLSA in a.policy_strings and not any(s.startswith("1 ") for s in a.policy_strings)


def test_send_list_never_queries_dns(stack):
    srv, _, make, _ = stack
    srv.drop("partner.test")
    srv.drop("x.group.test")
    r = make()
    assert run(r.resolve("partner.test")).kind == "secure"
    assert run(r.resolve("x.group.test")).kind == "secure"
    assert not [q for q in srv.queries if "partner" in q[0] or "group" in q[0]]


def test_dns_failure_uses_cached_sts_enforce_policy(stack):
    srv, _, make, clock = stack
    r = make()
    assert run(r.resolve("sts.test")).kind == "secure"
    r.clear_cache()
    srv.drop("sts.test")  # MX lookup now times out
    a = run(r.resolve("sts.test"))
    assert (a.kind, a.source) == ("secure", "mta-sts")
    clock.now += 86401  # policy expired: nothing to fall back on
    assert run(r.resolve("sts.test")).kind == "temp"


def test_fail_open_option(stack):
    _, _, make, _ = stack
    a = run(make(on_dns_error="notfound").resolve("timeout.test"))
    assert a.socketmap_reply() == "NOTFOUND "


def test_deadline_bounds_resolution(stack):
    srv, _, make, _ = stack
    srv.add("slow.test", "MX", ["10 mx.slow.test."], delay=1.0)
    a = run(make(deadline=0.2).resolve("slow.test"))
    assert a.kind == "temp"


def test_answer_cache_ttl_and_bound(stack):
    srv, _, make, clock = stack
    r = make(cache_size=2)
    assert run(r.resolve("dane.test")).kind == "dane-only"
    n = len(srv.queries)
    assert run(r.resolve("dane.test")).kind == "dane-only" and len(srv.queries) == n
    assert r.peek("dane.test").kind == "dane-only"
    clock.now += 121  # smallest TTL (the MX, 120 s) has passed
    assert r.peek("dane.test") is None
    run(r.resolve("plain.test"))
    run(r.resolve("insecure.test"))
    run(r.resolve("nxdomain.test"))
    assert r.peek("plain.test") is None  # evicted (LRU, 2 entries)
    assert r.peek("nxdomain.test") is not None
    assert run(r.resolve("timeout.test")).kind == "temp"
    assert r.peek("timeout.test") is None  # TEMP is never cached


def test_concurrent_lookups_share_one_resolution(stack):
    srv, _, make, _ = stack
    srv.add("slow2.test", "MX", ["10 mx.slow2.test."], delay=0.1)
    r = make()

    async def many():
        return await asyncio.gather(*(r.resolve("slow2.test") for _ in range(10)))
    answers = run(many())
    assert {a.kind for a in answers} == {"notfound"}
    assert len([q for q in srv.queries if q[0] == "slow2.test." and q[1] == "MX"]) == 1


def test_queries_request_dnssec(stack):
    srv, _, make, _ = stack
    run(make().resolve("dane.test"))
    name, rdtype, flags, do = srv.queries[0]
    assert do and flags & 0x0020  # DO bit in EDNS, AD bit in the header


def test_cancelled_waiter_does_not_cancel_shared_resolution(stack):
    srv, _, make, _ = stack
    srv.add("slow3.test", "MX", ["10 mx.slow3.test."], ad=True, delay=0.1)
    srv.add("_25._tcp.mx.slow3.test", "TLSA", [TLSA], ad=True)
    r = make()

    async def go():
        first = asyncio.ensure_future(r.resolve("slow3.test"))
        second = asyncio.ensure_future(r.resolve("slow3.test"))
        for _ in range(3):  # let both register on the shared task
            await asyncio.sleep(0)
        first.cancel()
        return await second
    assert run(go()).kind == "dane-only"
    assert r.peek("slow3.test").kind == "dane-only"


# -- TLSRPT attributes (Postfix >= 3.10) --------------------------------------------------------
# A Python mirror of how Postfix 3.10 parses a policy answer (src/smtp/smtp_tls_policy.c,
# tls_policy_lookup_one: mystrtokq(CHARS_COMMA_SP, CHARS_BRACE), extpar(STRIP|NORMAL_WS),
# split_nameval; the attribute checks; tlsrpt_wrapper.c's policy type / failure names).  The
# real Postfix 3.10 check is tests/test_postfix_tlsrpt_policy.py.
_PF_ONCE = {"ciphers", "protocols", "servername", "exclude", "policy_ttl", "policy_type",
            "policy_domain", "policy_failure"}
_PF_MULTI = {"match", "tafile", "policy_string", "mx_host_pattern"}
_PF_LAST = {"connection_reuse", "enable_rpk"}
_PF_EXT = {"policy_ttl", "policy_type", "policy_domain", "policy_string", "mx_host_pattern",
           "policy_failure"}


def postfix_parse_policy(policy: str) -> tuple[str, dict[str, list[str]]]:
    """(level, {name: [values]}) as Postfix 3.10 reads them; AssertionError where it refuses."""
    toks, i = [], 0
    while i < len(policy):
        if policy[i] in " \t\r\n,":
            i += 1
            continue
        if policy[i] == "{":
            depth, j = 0, i
            while j < len(policy):
                depth += {"{": 1, "}": -1}.get(policy[j], 0)
                if depth == 0:
                    break
                j += 1
            assert depth == 0, f"unbalanced brace in {policy!r}"
            toks.append(policy[i:j + 1])
            i = j + 1
        else:
            j = i
            while j < len(policy) and policy[j] not in " \t\r\n,":
                j += 1
            toks.append(policy[i:j])
            i = j
    level, attrs = toks[0], {}
    assert level in ("none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify",
                     "secure"), level
    for tok in toks[1:]:
        if tok.startswith("{"):
            assert tok.endswith("}"), tok
            tok = " ".join(tok[1:-1].split())
        name, eq, val = tok.partition("=")
        name, val = name.strip(), val.strip()
        assert eq and name, f"malformed attribute/value pair {tok!r}"
        assert name in _PF_ONCE | _PF_MULTI | _PF_LAST, f"invalid attribute name: {name!r}"
        assert not (name in _PF_ONCE and name in attrs), f"{name} specified multiple times"
        attrs.setdefault(name, []).append(val)
    if "policy_type" in attrs:
        assert attrs["policy_type"][0] in ("sts", "no-policy-found")
    if "policy_domain" in attrs:
        assert parse_nexthop(attrs["policy_domain"][0]) is not None
    if "policy_failure" in attrs:
        assert attrs["policy_failure"][0] in ("sts-policy-fetch-error", "sts-policy-invalid",
                                              "sts-webpki-invalid", "validation-failure")
    if "policy_type" not in attrs:
        assert not _PF_EXT & set(attrs), "built-in policy has unexpected attribute"
    return level, attrs


def test_tlsrpt_attributes_for_sts_enforce():
    pol = StsPolicy("enforce", ("mail.example.com", "*.example.net", "backupmx.example.com"),
                    604800)
    a = PolicyResolver.sts_answer("example.com", StsLookup("example.com", "fetched", pol, "i"))
    plain = "OK secure match=mail.example.com:.example.net:backupmx.example.com servername=hostname"
    assert a.socketmap_reply() == plain                      # switch off: Postfix 3.7 form
    assert a.socketmap_reply(tlsrpt=True) == plain + (
        " policy_type=sts policy_domain=example.com"
        " { policy_string = version: STSv1 } { policy_string = mode: enforce }"
        " { policy_string = mx: mail.example.com } { policy_string = mx: *.example.net }"
        " { policy_string = mx: backupmx.example.com } { policy_string = max_age: 604800 }"
        " mx_host_pattern=mail.example.com mx_host_pattern=*.example.net"
        " mx_host_pattern=backupmx.example.com")
    level, attrs = postfix_parse_policy(a.socketmap_reply(tlsrpt=True)[3:])
    assert level == "secure"
    assert attrs["policy_type"] == ["sts"] and attrs["policy_domain"] == ["example.com"]
    assert attrs["policy_string"] == pol.policy_strings()
    assert attrs["mx_host_pattern"] == list(pol.mx)
    assert attrs["match"] == ["mail.example.com:.example.net:backupmx.example.com"]
    assert "policy_failure" not in attrs


def test_tlsrpt_attributes_only_on_sts_answers():
    testing = StsPolicy("testing", ("mx.sts.test",), 600)
    look = StsLookup("sts.test", "fetched", testing, "i")
    # testing answered "may": Postfix reports it as the sts policy it is
    level, attrs = postfix_parse_policy(
        PolicyResolver.sts_answer("sts.test", look, "may").socketmap_reply(tlsrpt=True)[3:])
    assert (level, attrs["policy_type"], attrs["policy_string"][1]) == (
        "may", ["sts"], "mode: testing")
    # testing answered NOTFOUND (the default): nothing to attach an attribute to
    assert PolicyResolver.sts_answer("sts.test", look).socketmap_reply(tlsrpt=True) == "NOTFOUND "
    r = PolicyResolver(["partner.test"], "TLSv1.2", dns=None, mtasts=None)
    sent = run(r.resolve("partner.test"))
    assert sent.socketmap_reply(tlsrpt=True) == sent.socketmap_reply() == (
        "OK secure match=partner.test:.partner.test protocols=>=TLSv1.2")
    assert postfix_parse_policy(sent.socketmap_reply(tlsrpt=True)[3:])[1].keys() == {
        "match", "protocols"}
    fetch_error = PolicyResolver.sts_answer(
        "sts.test", StsLookup("sts.test", "error", error="sts-policy-fetch-error"))
    assert fetch_error.socketmap_reply(tlsrpt=True) == "NOTFOUND "   # fail open, no failure


def test_tlsrpt_attributes_dane_answer_is_plain(stack):
    _, _, make, _ = stack
    r = make()
    for key, level in (("dane.test", "dane-only"), ("half.test", "dane")):
        a = run(r.resolve(key))
        assert a.tlsrpt_policy_type == "tlsa"                   # kept for milterd's records
        assert a.socketmap_reply(tlsrpt=True) == f"OK {level}"   # Postfix reports DANE itself
    sts = run(r.resolve("sts.test"))
    level, attrs = postfix_parse_policy(sts.socketmap_reply(tlsrpt=True)[3:])
    assert attrs["mx_host_pattern"] == ["mx.sts.test", "*.sts.test"]
    assert attrs["policy_domain"] == ["sts.test"]


def test_postfix_grammar_mirror_refuses_what_postfix_refuses():
    for bad in ("secure policy_type=tlsa", "secure policy_domain=x.test",
                "secure policy_type=sts policy_type=sts", "secure { policy_string = a",
                "secure bogus=1", "secure mx_host_pattern=a.test"):
        with pytest.raises(AssertionError):
            postfix_parse_policy(bad)
