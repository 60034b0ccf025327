"""Partner terms (#15): the config tables, the merge with the lists, and decisions per partner.

End-to-end proofs against real MTAs are in test_postfix_partners.py (Postfix),
test_partners_sendmail_refmta.py (Sendmail, reference MTA) and test_postfix_outbound_partners.py.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import tomllib
from dataclasses import replace

import pytest

from milterd.core.config import ConfigError, parse_config
from milterd.core.partners import parse_pin, reference_identity, render_partners
from milterd.outbound.tlspolicy import parse_nexthop
from milterd.policy import domain_security as ds
from milterd.policy import reasons
from milterd.policy.stamp import parse_stamp, stamp_value
from milterd.session import CertVerify, Connection, Message, TlsFacts

HEX_A, HEX_B, HEX_C = "AA" * 32, "BB" * 32, "CC" * 32


def colons(h: str) -> str:
    return ":".join(h[i:i + 2] for i in range(0, len(h), 2))


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    return exc.value.errors


TRUSTED = TlsFacts(version="TLSv1.3", cipher="X", bits=256, verify=CertVerify.OK,
                   subject_cn="mx.hoster.test", issuer="Lab CA", dialect="postfix")

CONFIG = parse_config(f"""
[domain_security]
receive_domains = ["fabrikam.test", ".contoso.test"]
send_domains = ["fabrikam.test"]
[tls]
min_version = "TLSv1.2"
[partners."woodgrovebank.test"]
receive = true
send = true
certificate_names = ["mx.hoster.test", ".relay.hoster.test"]
server_names = ["mx.hoster.test", ".hoster.test"]
min_version = "TLSv1.3"
[partners."pinned.test"]
receive = true
pins = ["key-sha256:{HEX_A}", "cert-sha256:{colons(HEX_B)}"]
[partners."netbound.test"]
receive = true
client_networks = ["192.0.2.0/24", "2001:db8::/32"]
[partners."onboarding.test"]
receive = true
mode = "report"
""")


# -- the config -------------------------------------------------------------------------------

def test_lists_are_partners_with_the_global_terms():
    c = parse_config(f"""
[domain_security]
mode = "report"
failure_action = "tempfail"
receive_domains = ["a.test", ".b.test"]
send_domains = ["a.test"]
[tls]
min_version = "TLSv1.3"
min_cipher_bits = 256
[peer_cert]
trusted_issuers = ["Lab CA"]
[peer_cert.pins]
"b.test" = ["{HEX_C}"]
""")
    a, b = c.partner("a.test"), c.partner(".b.test")
    assert (a.receive, a.send, b.receive, b.send) == (True, True, True, False)
    for p in (a, b):
        assert (p.mode, p.failure_action, p.min_version, p.min_cipher_bits, p.trusted_issuers) \
            == ("report", "tempfail", "TLSv1.3", 256, ("Lab CA",))
        assert not p.table and not p.certificate_names and not p.client_networks
    assert b.cert_pins == (colons(HEX_C),)   # [peer_cert.pins] keyed by the domain: the .b.test entry
    assert c.receive_entries == ("a.test", ".b.test") and c.send_entries == ("a.test",)
    assert c.receive_partner("x.b.test") is b and c.receive_partner("b.test") is None


def test_a_table_gives_a_listed_domain_its_terms_and_defaults_the_rest():
    p = CONFIG.partner("woodgrovebank.test")
    assert p.table and p.receive and p.send
    assert p.min_version == "TLSv1.3"             # the table's
    assert p.min_cipher_bits == 128 and p.mode == "enforce"   # the global defaults
    assert p.certificate_names == ("mx.hoster.test", ".relay.hoster.test")
    c = parse_config('[domain_security]\nreceive_domains = ["x.test"]\n'
                     '[partners."x.test"]\nmode = "report"\n')
    assert c.partner("x.test").receive and c.partner("x.test").mode == "report"


@pytest.mark.parametrize("text, key", [
    ('[partners."a.test"]\nreceive = true\nclient_networks = ["192.0.2.1/24"]\n',
     'partners."a.test".client_networks'),
    ('[partners."a.test"]\nreceive = true\nclient_networks = ["example.com"]\n',
     'partners."a.test".client_networks'),
    (f'[partners."a.test"]\nreceive = true\npins = ["{HEX_A}"]\n', 'partners."a.test".pins'),
    (f'[partners."a.test"]\nreceive = true\npins = ["sha256:{HEX_A}"]\n',
     'partners."a.test".pins'),
    ('[partners."a.test"]\nreceive = true\npins = ["key-sha256:ABCD"]\n',
     'partners."a.test".pins'),
    ('[partners."a.test"]\nreceive = true\ncertificate_names = ["*.hoster.test"]\n',
     'partners."a.test".certificate_names'),
    ('[partners."a.test"]\nreceive = true\ncertificate_names = ["192.0.2.1"]\n',
     'partners."a.test".certificate_names'),
    ('[partners."a.test"]\nreceive = true\ncertificate_names = ["localhost"]\n',
     'partners."a.test".certificate_names'),
    ('[partners."a.test"]\nsend = true\nserver_names = ["mx..hoster.test"]\n',
     'partners."a.test".server_names'),
    ('[partners."a.test"]\nreceive = true\nmode = "audit"\n', 'partners."a.test".mode'),
    ('[partners."a.test"]\nreceive = true\nmin_version = "TLSv1.4"\n',
     'partners."a.test".min_version'),
    ('[partners."a.test"]\nreceive = "yes"\n', 'partners."a.test".receive'),
    ('[partners."a.test"]\nreceive = true\ncolour = "blue"\n', 'partners."a.test".colour'),
    ('[partners."a.test"]\ncertificate_names = ["mx.hoster.test"]\n', 'partners."a.test"'),
    ('[partners."*.test"]\nreceive = true\n', 'partners."*.test"'),
    # one domain twice, with conflicting terms
    ('[partners."a.test"]\nreceive = true\n[partners."A.TEST."]\nreceive = true\nmode = "report"\n',
     'partners."A.TEST."'),
    ('[partners."xn--bcher-kva.test"]\nreceive = true\n'
     '[partners."bücher.test"]\nreceive = true\nmode = "report"\n', 'partners."bücher.test"'),
    ('[domain_security]\nreceive_domains = ["a.test"]\n[partners."a.test"]\nreceive = false\n',
     'partners."a.test".receive'),
    ('[domain_security]\nsend_domains = ["a.test"]\n[partners."a.test"]\nsend = false\n',
     'partners."a.test".send'),
    (f'[peer_cert.pins]\n"a.test" = ["{HEX_A}"]\n[partners."a.test"]\nreceive = true\n'
     f'pins = ["cert-sha256:{HEX_B}"]\n', 'partners."a.test".pins'),
])
def test_check_config_names_the_key_of_every_partner_error(text, key):
    errs = errors(text)
    assert any(e.split(": ", 2)[1] == key for e in errs), errs


def test_the_same_terms_written_twice_are_one_partner():
    c = parse_config('[partners."a.test"]\nreceive = true\n[partners."A.test."]\nreceive = true\n')
    assert [p.entry for p in c.partners] == ["a.test"]


def test_pin_spelling_is_unambiguous():
    assert parse_pin(f"cert-sha256:{HEX_A.lower()}") == ("cert", colons(HEX_A))
    assert parse_pin(f"KEY-SHA256:{colons(HEX_A)}") == ("key", colons(HEX_A))
    for bad in (HEX_A, colons(HEX_A), f"sha256:{HEX_A}", f"pin-sha256:{HEX_A}", "key-sha256:",
                f"key-sha256:{HEX_A}00", 5, None):
        assert parse_pin(bad) is None, bad


def test_reference_identities():
    assert reference_identity("MX.Hoster.Test.") == "mx.hoster.test"
    assert reference_identity(".Hoster.test") == ".hoster.test"
    assert reference_identity("bücher.test") == "xn--bcher-kva.test"
    for bad in ("*.hoster.test", "mx.*.test", "192.0.2.1", "[::1]", "test", "", ".", "a..b",
                "mx.hoster.test/x", "straße.test"):
        assert reference_identity(bad) is None, bad


# -- decisions per partner --------------------------------------------------------------------

def verdict(tls, entry, client="192.0.2.7"):
    return ds.evaluate(tls, CONFIG.partner(entry), client_address=client)


def test_hosted_partner_passes_only_through_its_certificate_names():
    r = verdict(TRUSTED, "woodgrovebank.test")
    assert (r.status, r.match, r.partner) == (ds.PASS, ds.MATCH_CERTIFICATE_NAME,
                                              "woodgrovebank.test")
    # the same certificate claiming a partner without that term
    r = verdict(TRUSTED, "fabrikam.test")
    assert (r.status, r.reason) == (ds.FAIL, reasons.NAME_MISMATCH)
    # a self-signed impostor with that name: not trusted, not pinned
    r = verdict(replace(TRUSTED, verify=CertVerify.FAIL), "woodgrovebank.test")
    assert (r.status, r.reason) == (ds.FAIL, reasons.NO_TRUSTED_CERT)
    # the partner's own domain still passes, as without the term
    r = verdict(replace(TRUSTED, subject_cn="mail.woodgrovebank.test"), "woodgrovebank.test")
    assert (r.status, r.match) == (ds.PASS, ds.MATCH_DOMAIN)


@pytest.mark.parametrize("cn, passes", [
    ("mx.hoster.test", True), ("MX.HOSTER.TEST.", True), ("*.hoster.test", True),
    ("a.relay.hoster.test", True), ("*.relay.hoster.test", True), ("b.a.relay.hoster.test", True),
    ("relay.hoster.test", False),           # ".relay.hoster.test": hosts under it only
    ("mx2.hoster.test", False), ("mx.hoster.test.evil.test", False), ("evilmx.hoster.test", False),
    ("*.test", False), ("m*.hoster.test", False), ("*.*.hoster.test", False), ("", False),
])
def test_certificate_name_rules(cn, passes):
    r = verdict(replace(TRUSTED, subject_cn=cn or None), "woodgrovebank.test")
    assert (r.status == ds.PASS) is passes, r


def test_key_pin_survives_a_reissue_and_certificate_pin_does_not():
    key_only = replace(TRUSTED, verify=CertVerify.FAIL, subject_cn="self",
                       fingerprint_sha256=colons(HEX_C), pubkey_sha256=colons(HEX_A))
    r = verdict(key_only, "pinned.test")
    assert (r.status, r.match, r.via) == (ds.PASS, ds.MATCH_KEY_PIN, "pinned")
    cert_only = replace(key_only, fingerprint_sha256=colons(HEX_B), pubkey_sha256=colons(HEX_C))
    assert verdict(cert_only, "pinned.test").match == ds.MATCH_CERT_PIN
    rekeyed = replace(key_only, pubkey_sha256=colons(HEX_C))
    assert verdict(rekeyed, "pinned.test").reason == reasons.PIN_MISMATCH
    # Sendmail gives no public key: a key pin cannot match (fail closed)
    sendmail = replace(key_only, pubkey_sha256=None, dialect="sendmail")
    assert verdict(sendmail, "pinned.test").reason == reasons.PIN_MISMATCH
    # Postfix before the policy request: wait for the fingerprints, then decide
    anon = TlsFacts(version="TLSv1.3", bits=256, verify=CertVerify.UNKNOWN, dialect="postfix")
    assert ds.may_still_pass(anon, CONFIG.partner("pinned.test"))
    assert not ds.may_still_pass(anon, CONFIG.partner("woodgrovebank.test"))


@pytest.mark.parametrize("client, inside", [
    ("192.0.2.7", True), ("IPv6:::ffff:192.0.2.7", True), ("::ffff:192.0.2.7", True),
    ("2001:db8::25", True), ("IPv6:2001:DB8::25", True), ("[2001:db8::25]", True),
    ("192.0.3.7", False), ("127.0.0.1", False), ("2001:db9::1", False), ("::1", False),
    (None, False), ("unknown", False), ("", False), ("fe80::1%eth0", False),
    ("١٩٢.0.2.7", False),
])
def test_client_networks(client, inside):
    good = replace(TRUSTED, subject_cn="mail.netbound.test")
    r = verdict(good, "netbound.test", client)
    assert (r.status == ds.PASS) is inside
    if not inside:
        assert r.reason == reasons.CLIENT_NETWORK
    assert ds.in_networks(client, CONFIG.partner("netbound.test").client_networks) is inside


def test_tls_minimum_is_per_partner():
    tls12 = replace(TRUSTED, version="TLSv1.2")
    assert verdict(tls12, "woodgrovebank.test").reason == reasons.TLS_VERSION
    assert verdict(replace(tls12, subject_cn="mail.fabrikam.test"), "fabrikam.test").status \
        == ds.PASS


def test_a_report_partner_never_masks_an_enforce_partners_failure():
    no_tls = TlsFacts()
    report = verdict(no_tls, "onboarding.test")
    enforce = verdict(no_tls, "fabrikam.test")
    assert report.status == enforce.status == ds.FAIL
    assert not report.refuses and enforce.refuses
    assert ds.combine([report, enforce]) is enforce
    assert ds.combine([enforce, report]) is enforce
    tempfail = replace(enforce, failure_action="tempfail")
    assert ds.combine([tempfail, enforce]) is enforce   # reject wins over tempfail
    passed = verdict(replace(TRUSTED, subject_cn="mail.fabrikam.test"), "fabrikam.test")
    assert ds.combine([passed, report]) is report


def test_plugin_refuses_when_the_from_partner_enforces_and_the_envelope_partner_reports():
    from milterd_plugins import domain_security as plugin

    conn = Connection(id="c1", tls=TlsFacts(), client_address="192.0.2.7")
    msg = Message(sender="<a@onboarding.test>")
    assert plugin.milterd_mail_from(config=CONFIG, connection=conn, message=msg) is None
    assert msg.stash[ds.RESULT_KEY].status == ds.FAIL   # report: stamped, not refused
    msg.headers.append(("From", "CEO <ceo@fabrikam.test>"))
    v = plugin.milterd_end_of_message(config=CONFIG, connection=conn, message=msg)
    assert v is not None and v.code == "550" and "fabrikam.test" in v.reply_text()


def test_subdomain_entry_and_exact_entry_keep_their_own_terms():
    c = parse_config('[partners."bank.test"]\nreceive = true\n'
                     '[partners.".bank.test"]\nreceive = true\n'
                     'certificate_names = ["mx.hoster.test"]\n')
    from milterd_plugins import domain_security as plugin

    for sender, status in (("<a@bank.test>", ds.FAIL), ("<a@branch.bank.test>", ds.PASS)):
        conn = Connection(id="c", tls=TRUSTED, client_address="192.0.2.7")
        msg = Message(sender=sender)
        plugin.milterd_mail_from(config=c, connection=conn, message=msg)
        r = msg.stash[ds.RESULT_KEY]
        assert r.status == status and r.domain == "bank.test", (sender, r)
    assert r.partner == ".bank.test"


def test_stamp_says_whose_terms_applied_and_how_the_certificate_matched():
    r = verdict(TRUSTED, "woodgrovebank.test")
    value = stamp_value(TRUSTED, r.status, r.domain, r.reason, partner=r.partner, match=r.match)
    parsed = parse_stamp(value)
    assert (parsed["domain-secure"], parsed["partner"], parsed["match"]) == \
        ("pass", "woodgrovebank.test", "certificate_name")
    assert value.startswith("tls=TLSv1.3; cipher=X; bits=256; verify=ok; ")


# -- outbound ---------------------------------------------------------------------------------

def test_socketmap_answers_each_send_partner_with_its_own_names_and_minimum():
    from milterd.outbound.service import build_resolver

    resolver = build_resolver(CONFIG)

    def answer(key):
        a = resolver.send_list_answer(parse_nexthop(key))
        return a.socketmap_reply() if a else None

    assert answer("woodgrovebank.test") == \
        "OK secure match=mx.hoster.test:.hoster.test protocols=>=TLSv1.3"
    assert answer("fabrikam.test") == \
        "OK secure match=fabrikam.test:.fabrikam.test protocols=>=TLSv1.2"
    assert answer("contoso.test") is None and answer("onboarding.test") is None


# -- what an admin reads ----------------------------------------------------------------------

def test_partners_output_is_the_config_it_describes():
    """`milterd partners` prints TOML tables; read back as a config they give the same terms."""
    text = render_partners(CONFIG)
    back = parse_config(text.replace("# effective", "# was"))
    strip = lambda ps: [replace(p, table=False, explicit=frozenset()) for p in ps]  # noqa: E731
    assert strip(back.partners) == strip(CONFIG.partners)
    assert tomllib.loads(text)["partners"]["woodgrovebank.test"]["certificate_names"] == \
        ["mx.hoster.test", ".relay.hoster.test"]
    assert 'min_version = "TLSv1.3"' in text and "# table" in text
    assert "# default: tls.min_cipher_bits" in text and "# from receive_domains" in text
    js = json.loads(render_partners(CONFIG, as_json=True))
    pinned = next(p for p in js if p["partner"] == "pinned.test")
    assert pinned["terms"]["pins"] == [f"cert-sha256:{colons(HEX_B)}", f"key-sha256:{colons(HEX_A)}"]
    nets = next(p for p in js if p["partner"] == "netbound.test")["terms"]["client_networks"]
    assert [ipaddress.ip_network(n) for n in nets] == list(
        CONFIG.partner("netbound.test").client_networks)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "milterd", *args], capture_output=True,
                          text=True, timeout=60)


def test_cli_partners_and_check_config(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(f'[partners."k.test"]\nreceive = true\npins = ["key-sha256:{HEX_A}"]\n')
    out = _cli("partners", "-c", str(good))
    assert out.returncode == 0 and '[partners."k.test"]' in out.stdout, out
    chk = _cli("check-config", "-c", str(good))
    assert chk.returncode == 0 and "OK" in chk.stdout
    # what the MTAs cannot give is said, not silently accepted
    assert "[policy] listen" in chk.stderr and "Sendmail cannot" in chk.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[partners."k.test"]\nreceive = true\nclient_networks = ["10.0.0.1/8"]\n'
                   'pins = ["AB"]\n')
    chk = _cli("check-config", "-c", str(bad))
    assert chk.returncode == 2
    assert 'partners."k.test".client_networks' in chk.stderr
    assert 'partners."k.test".pins' in chk.stderr
    assert _cli("partners", "-c", str(bad)).returncode == 2
