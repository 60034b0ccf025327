"""Adversarial review of partner terms (#15): ways mail that policy says to refuse could be
accepted, or a partner's term silently not applied.

Every test runs against the real code.  The first two demonstrated real (low-severity) bugs, now
fixed; every other test pins behaviour that was checked and found safe, so a regression makes it
fail.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from milterd.core.config import ConfigError, parse_config
from milterd.core.partners import reference_identity
from milterd.inbound.policy_views import PolicyView
from milterd.inbound.tlsfacts import from_macros, merge_policy_facts
from milterd.outbound.service import build_resolver
from milterd.outbound.tlspolicy import parse_nexthop
from milterd.policy import domain_security as ds
from milterd.policy import names, reasons
from milterd.session import CertVerify, Connection, Message, TlsFacts

HEX_A, HEX_B, HEX_C = "AA" * 32, "BB" * 32, "CC" * 32


def colons(h: str) -> str:
    return ":".join(h[i:i + 2] for i in range(0, len(h), 2))


def plugin():
    from milterd_plugins import domain_security

    return domain_security


TRUSTED = TlsFacts(version="TLSv1.3", cipher="X", bits=256, verify=CertVerify.OK,
                   subject_cn="mx.hoster.test", issuer="Lab CA", dialect="postfix")
ANON_POSTFIX = TlsFacts(version="TLSv1.3", cipher="X", bits=256, verify=CertVerify.UNKNOWN,
                        dialect="postfix")

CONFIG = parse_config(f"""
[domain_security]
receive_domains = ["fabrikam.test", ".parent.test"]
send_domains = ["fabrikam.test"]
[partners."woodgrovebank.test"]
receive = true
send = true
certificate_names = ["mx.hoster.test"]
server_names = ["mx.hoster.test", ".hoster.test"]
min_version = "TLSv1.3"
[partners."pinned.test"]
receive = true
pins = ["key-sha256:{HEX_A}"]
[partners."onboarding.test"]
receive = true
mode = "report"
[partners.".b.parent.test"]
receive = true
mode = "report"
[partners."sub.parent.test"]
receive = false
send = true
""")


def mail_from(config, tls, sender, client="192.0.2.7"):
    conn = Connection(id="c", tls=tls, client_address=client)
    msg = Message(sender=sender)
    v = plugin().milterd_mail_from(config=config, connection=conn, message=msg)
    return conn, msg, v


# == bugs this review found, fixed ==============================================================

# Was: [peer_cert.pins] keys spelling one domain two ways ('x.test', 'X.TEST') were accepted and
# one list silently dropped.  Now an error names the second key.
def test_legacy_pins_spelled_twice_keep_every_pin_or_are_refused():
    text = f"""
[domain_security]
receive_domains = ["x.test"]
[peer_cert.pins]
"x.test" = ["{HEX_A}"]
"X.TEST" = ["{HEX_B}"]
"""
    try:
        c = parse_config(text)
    except ConfigError as exc:
        assert any('peer_cert.pins."X.TEST"' in e for e in exc.errors), exc.errors
        return
    raise AssertionError(f"accepted: {c.partner('x.test').cert_pins}")


# Was: Sendmail dialect with {verify}=NO/NONE (no client certificate) still kept {cert_fp}/
# {cert_pubkey_fp}, and a pin then passed.  Now contradictory facts are dropped (fail closed).
@pytest.mark.parametrize("verify", ["NO", "NONE"])
def test_sendmail_no_certificate_with_an_injected_key_fingerprint_is_refused(verify):
    facts, _ = from_macros({"{tls_version}": "TLSv1.3", "{cipher}": "X", "{cipher_bits}": "256",
                            "{verify}": verify, "{cert_pubkey_fp}": colons(HEX_A)})
    assert facts.verify is CertVerify.NONE
    r = ds.evaluate(facts, CONFIG.partner("pinned.test"), client_address="192.0.2.7")
    assert r.status == ds.FAIL


# == checked and safe ==========================================================================

# -- several partners on one message -----------------------------------------------------------

def test_report_partner_never_masks_enforce_partner_at_any_stage():
    # envelope = report partner, From: = enforce partner: refused at end of message
    conn, msg, v = mail_from(CONFIG, TlsFacts(), "<a@onboarding.test>")
    assert v is None and msg.stash[ds.RESULT_KEY].mode == "report"
    msg.headers.append(("From", "<ceo@fabrikam.test>"))
    v = plugin().milterd_end_of_message(config=CONFIG, connection=conn, message=msg)
    assert v is not None and v.code == "550"
    # both in the envelope (percent hack names two domains): refused at MAIL FROM already
    _, _, v = mail_from(CONFIG, TlsFacts(), "<a%onboarding.test@fabrikam.test>")
    assert v is not None and v.code == "550"
    # the report result listed first in every order
    rep = ds.evaluate(TlsFacts(), CONFIG.partner("onboarding.test"))
    enf = ds.evaluate(TlsFacts(), CONFIG.partner("fabrikam.test"))
    for order in ([rep, enf], [enf, rep], [rep, rep, enf]):
        assert ds.combine(order).refuses


def test_postfix_pinned_deferral_never_masks_another_enforce_partner():
    """MAIL FROM on Postfix defers a pinned partner (fingerprints arrive with the RCPT policy
    request).  When the same envelope also names an unpinned enforce partner that fails, the
    deferral may hide it at MAIL FROM (combine keeps the first equal failure), but RCPT and end
    of message refuse: never accepted."""
    sender = "<a%pinned.test@fabrikam.test>"
    conn, msg, v = mail_from(CONFIG, ANON_POSTFIX, sender)
    entries = plugin()._envelope_entries(CONFIG, msg)
    assert set(entries) == {"pinned.test", "fabrikam.test"}
    v_rcpt = plugin().milterd_rcpt_to(config=CONFIG, connection=conn, message=msg,
                                      recipient="<u@here.test>")
    assert v_rcpt is not None and v_rcpt.code == "550"
    # even if the pinned partner's key then arrives, the other partner still refuses
    conn.tls = merge_policy_facts(ANON_POSTFIX, colons(HEX_C), colons(HEX_A))
    v_eom = plugin().milterd_end_of_message(config=CONFIG, connection=conn, message=msg)
    assert v_eom is not None and v_eom.code == "550" and "fabrikam.test" in v_eom.reply_text()


def test_postfix_pinned_partner_without_a_policy_view_is_refused_at_rcpt():
    conn, msg, v = mail_from(CONFIG, ANON_POSTFIX, "<a@pinned.test>")
    assert v is None                                  # deferred
    v = plugin().milterd_rcpt_to(config=CONFIG, connection=conn, message=msg, recipient="<u@x>")
    assert v is not None and v.code == "550"          # no view came: fail closed


def test_two_idna_readings_naming_two_partners_both_apply():
    # "straße" is strasse (IDNA 2003) and xn--strae-oqa (IDNA 2008): report vs enforce partner
    c = parse_config('[partners."strasse.test"]\nreceive = true\nmode = "report"\n'
                     '[partners."xn--strae-oqa.test"]\nreceive = true\n')
    _, msg, v = mail_from(c, TlsFacts(), "<a@straße.test>")
    assert set(msg.stash.get(plugin()._ENVELOPE_ENTRIES)) == {"strasse.test",
                                                              "xn--strae-oqa.test"}
    assert v is not None and v.code == "550"


# -- which entry covers a domain ---------------------------------------------------------------

def test_receive_false_table_under_a_parent_dot_entry_stays_covered():
    assert CONFIG.receive_partner("sub.parent.test").entry == ".parent.test"
    _, msg, v = mail_from(CONFIG, TlsFacts(), "<a@sub.parent.test>")
    assert v is not None and v.code == "550"
    assert msg.stash[ds.RESULT_KEY].partner == ".parent.test"
    # and the hosts under it
    _, _, v = mail_from(CONFIG, TlsFacts(), "<a@x.sub.parent.test>")
    assert v is not None


def test_most_specific_dot_entry_wins_even_when_it_is_weaker():
    """By design (documented list semantics): a.b.parent gets .b.parent's report terms, not
    .parent's enforce terms.  An admin reading `milterd partners` sees both entries."""
    assert CONFIG.receive_partner("a.b.parent.test").entry == ".b.parent.test"
    assert CONFIG.receive_partner("b.parent.test").entry == ".parent.test"   # dot = under only
    _, msg, v = mail_from(CONFIG, TlsFacts(), "<a@a.b.parent.test>")
    assert v is None and msg.stash[ds.RESULT_KEY].mode == "report"


def test_receive_false_conflicts_are_errors_in_every_spelling():
    errs = pytest.raises(ConfigError, parse_config,
                         '[domain_security]\nreceive_domains = [".parent.test"]\n'
                         '[partners.".PARENT.Test."]\nreceive = false\nsend = true\n')
    assert "receive: false" in str(errs.value.errors)
    errs = pytest.raises(ConfigError, parse_config,
                         '[domain_security]\nreceive_domains = ["bücher.test"]\n'
                         '[partners."XN--BCHER-KVA.test"]\nreceive = false\nsend = true\n')
    assert "receive: false" in str(errs.value.errors)


def test_case_and_idna_variants_of_one_table_are_one_partner_or_an_error():
    errs = pytest.raises(ConfigError, parse_config,
                         '[partners."Bücher.test"]\nreceive = true\nmode = "report"\n'
                         '[partners."xn--bcher-kva.test."]\nreceive = true\n')
    assert "names the same domain" in str(errs.value.errors)
    c = parse_config('[partners."Bücher.test"]\nreceive = true\n'
                     '[partners."xn--bcher-kva.test."]\nreceive = true\n')
    assert [p.entry for p in c.partners] == ["xn--bcher-kva.test"]
    for bad in ('"\uff0ex.test"', '"*.x.test"', '"stra\u00dfe.test"', '"x..test"'):
        with pytest.raises(ConfigError):
            parse_config(f'[partners.{bad}]\nreceive = true\n')


def test_legacy_pins_apply_to_exact_and_dot_entries_and_conflicts_are_errors():
    c = parse_config(f'[domain_security]\nreceive_domains = [".x.test", "x.test"]\n'
                     f'[peer_cert.pins]\n"x.test" = ["{HEX_A}"]\n')
    assert c.partner(".x.test").cert_pins == c.partner("x.test").cert_pins == (colons(HEX_A),)
    for pins in ("[]", f'["key-sha256:{HEX_A}"]', f'["cert-sha256:{HEX_B}"]'):
        with pytest.raises(ConfigError):
            parse_config(f'[peer_cert.pins]\n"x.test" = ["{HEX_A}"]\n'
                         f'[partners.".x.test"]\nreceive = true\npins = {pins}\n')


def test_explicit_empty_lists_mean_no_restriction_and_are_visible():
    """An explicit [] is the admin's word: trusted_issuers = [] lifts the global issuer
    allow-list for that partner only (shown as '# table' by `milterd partners`)."""
    c = parse_config('[peer_cert]\ntrusted_issuers = ["Lab CA"]\n'
                     '[partners."a.test"]\nreceive = true\ntrusted_issuers = []\n'
                     '[partners."b.test"]\nreceive = true\n')
    assert c.partner("a.test").trusted_issuers == ()
    assert c.partner("b.test").trusted_issuers == ("Lab CA",)
    other_ca = replace(TRUSTED, issuer="Other CA", subject_cn="mx.b.test")
    assert ds.evaluate(other_ca, c.partner("b.test")).reason == reasons.ISSUER_NOT_ALLOWED


# -- certificate names -------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    "*.hoster.test", ".test", "test", "test.", "localhost.", "192.0.2.1", "mx.123", "::1",
    "_x.hoster.test", "stra\u00dfe.test", "mx.hoster.test..", "mx\u00adhoster.test", "",
    "mx hoster.test",
])
def test_certificate_names_that_cannot_be_reference_identities(bad):
    assert reference_identity(bad) is None
    with pytest.raises(ConfigError):
        parse_config(f'[partners."w.test"]\nreceive = true\ncertificate_names = ["{bad}"]\n')


@pytest.mark.parametrize("cn", [
    "*.test", "*.hoster.test.evil.test", "mx.hoster.test.evil.test", "xmx.hoster.test",
    "mx.hoster.tes", "mx.hoster.test\x00.evil.test", "*", "*.*.test", "mx.hoster.test..",
    "hoster.test", "xn--mx-hoster.test",
])
def test_certificate_names_match_no_more_than_intended(cn):
    r = ds.evaluate(replace(TRUSTED, subject_cn=cn), CONFIG.partner("woodgrovebank.test"))
    assert r.status == ds.FAIL


def test_a_hosted_certificate_cannot_claim_another_partner_on_the_same_message():
    conn, msg, v = mail_from(CONFIG, TRUSTED, "<a@woodgrovebank.test>")
    assert v is None and msg.stash[ds.RESULT_KEY].match == ds.MATCH_CERTIFICATE_NAME
    msg.headers.append(("From", "<ceo@fabrikam.test>"))
    v = plugin().milterd_end_of_message(config=CONFIG, connection=conn, message=msg)
    assert v is not None and "fabrikam.test" in v.reply_text()


# -- pins --------------------------------------------------------------------------------------

def test_postfix_view_trust_boundary_for_key_pins():
    """The policy socket is the trust boundary (documented in policy_views): a view that agrees
    on protocol/cipher/bits is joined, and its ccert_pubkey_fingerprint is believed, also
    without a certificate fingerprint (Postfix 3.9 raw public keys).  A view that disagrees on
    any TLS attribute is not joined.  Restrict [policy] listen (unix socket + group)."""
    view = PolicyView("192.0.2.7", 40000, None, colons(HEX_A), None, None, "TLSv1.3", "X", 256,
                      None, None, 0.0)
    assert view.agrees_with(ANON_POSTFIX)
    joined = merge_policy_facts(ANON_POSTFIX, view.fingerprint, view.pubkey_fingerprint)
    assert ds.evaluate(joined, CONFIG.partner("pinned.test")).match == ds.MATCH_KEY_PIN
    for bad in (replace(view, cipher="Y"), replace(view, keysize=128),
                replace(view, protocol="TLSv1.2"), replace(view, protocol=None)):
        assert not bad.agrees_with(ANON_POSTFIX)
    # a key fingerprint is never used by the Postfix merge for a non-Postfix session
    sm = replace(ANON_POSTFIX, dialect="sendmail", verify=CertVerify.FAIL)
    assert merge_policy_facts(sm, None, colons(HEX_A)).pubkey_sha256 is None


def test_postfix_ignores_a_cert_pubkey_fp_macro():
    facts, _ = from_macros({"{tls_version}": "TLSv1.3", "{cipher}": "X", "{cipher_bits}": "256",
                            "{cert_pubkey_fp}": colons(HEX_A)})
    assert facts.dialect == "postfix" and facts.pubkey_sha256 is None
    assert ds.evaluate(facts, CONFIG.partner("pinned.test")).status == ds.FAIL


def test_sendmail_malformed_or_non_sha256_key_macro_never_pins():
    for value in (colons(HEX_A)[:-3], "AA" * 20, colons(HEX_A) + "\x00", "zz" * 32):
        facts, _ = from_macros({"{tls_version}": "TLSv1.3", "{cipher_bits}": "256",
                                "{verify}": "FAIL", "{cert_pubkey_fp}": value})
        assert facts.pubkey_sha256 is None
        assert ds.evaluate(facts, CONFIG.partner("pinned.test")).reason == reasons.NO_TRUSTED_CERT


def test_a_cert_fingerprint_is_never_taken_for_a_key_pin_or_vice_versa():
    c = parse_config(f'[partners."k.test"]\nreceive = true\npins = ["key-sha256:{HEX_A}"]\n'
                     f'[partners."c.test"]\nreceive = true\npins = ["cert-sha256:{HEX_A}"]\n')
    as_cert = replace(TRUSTED, verify=CertVerify.FAIL, fingerprint_sha256=colons(HEX_A))
    as_key = replace(TRUSTED, verify=CertVerify.FAIL, pubkey_sha256=colons(HEX_A))
    assert ds.evaluate(as_cert, c.partner("k.test")).status == ds.FAIL
    assert ds.evaluate(as_key, c.partner("c.test")).status == ds.FAIL
    with pytest.raises(ConfigError):   # a bare value is no pin in a table
        parse_config(f'[partners."k.test"]\nreceive = true\npins = ["{HEX_A}"]\n')


# -- client networks ---------------------------------------------------------------------------

def test_client_networks_fail_closed_on_every_odd_spelling():
    c = parse_config('[partners."n.test"]\nreceive = true\n'
                     'client_networks = ["192.0.2.0/24", "2001:db8::/32"]\n')
    p = c.partner("n.test")
    good = replace(TRUSTED, subject_cn="mx.n.test")
    for client in ("192.0.2.7", "::ffff:192.0.2.7", "IPv6:::ffff:192.0.2.7", "[2001:db8::1]",
                   "192.0.2.7 ", "[192.0.2.7]"):   # the same address spelled otherwise
        assert ds.evaluate(good, p, client_address=client).status == ds.PASS, client
    for client in ("unknown", None, "", "192.0.2.7%eth0", "fe80::1%eth0", "2001:db8::1%1",
                   "::192.0.2.7", "64:ff9b::192.0.2.7", "2002:c000:0207::1", "192.000.002.007",
                   "x" * 5000, "192.0.2.7:25"):
        r = ds.evaluate(good, p, client_address=client)
        assert (r.status, r.reason) == (ds.FAIL, reasons.CLIENT_NETWORK), client


def test_ipv4_mapped_network_in_config_never_matches_fail_closed():
    """Clients are normalised to IPv4 (mapped addresses), so a network written in mapped form
    matches nobody: the partner is refused (fail closed), not widened.  (Usability note:
    check-config could say so.)"""
    c = parse_config('[partners."n.test"]\nreceive = true\n'
                     'client_networks = ["::ffff:192.0.2.0/120"]\n')
    good = replace(TRUSTED, subject_cn="mx.n.test")
    for client in ("192.0.2.7", "::ffff:192.0.2.7"):
        assert ds.evaluate(good, c.partner("n.test"), client_address=client).reason == \
            reasons.CLIENT_NETWORK


def test_client_networks_are_checked_before_pins():
    c = parse_config(f'[partners."n.test"]\nreceive = true\nclient_networks = ["192.0.2.0/24"]\n'
                     f'pins = ["key-sha256:{HEX_A}"]\n')
    pinned = replace(ANON_POSTFIX, verify=CertVerify.FAIL, pubkey_sha256=colons(HEX_A))
    assert ds.evaluate(pinned, c.partner("n.test"), client_address="198.51.100.1").reason == \
        reasons.CLIENT_NETWORK


# -- outbound ----------------------------------------------------------------------------------

def test_crafted_nexthop_keys_never_get_a_weaker_or_another_partners_answer():
    resolver = build_resolver(CONFIG)

    def answer(key):
        hop = parse_nexthop(key)
        a = resolver.send_list_answer(hop) if hop else None
        return a.socketmap_reply() if a else None

    wood = "OK secure match=mx.hoster.test:.hoster.test protocols=>=TLSv1.3"
    for key in ("woodgrovebank.test", "WoodGroveBank.Test.", "woodgrovebank.test:587",
                "[woodgrovebank.test]", "[woodgrovebank.test]:25", "ｗoodgrovebank.test"):
        assert answer(key) == wood, key
    fab = "OK secure match=fabrikam.test:.fabrikam.test protocols=>=TLSv1.2"
    assert answer("FABRIKAM.test.") == fab
    # names that are not the partner get no partner answer (and never woodgrove's names)
    for key in ("woodgrovebank.test.fabrikam.test", "mx.woodgrovebank.test",
                "woodgrovebank.test.evil.test", "evilwoodgrovebank.test", "[192.0.2.1]"):
        assert answer(key) is None or "hoster" not in answer(key), key
    # keys that cannot be parsed never reach the send list
    for key in ("woodgrovebank.test match=evil.test", "woodgrovebank.test\nOK",
                "woodgrovebank.test:99999"):
        assert parse_nexthop(key) is None, key


def test_send_false_table_under_a_dot_send_entry_is_not_exempted():
    c = parse_config('[domain_security]\nsend_domains = [".parent.test"]\n'
                     '[partners."sub.parent.test"]\nreceive = true\nsend = false\n')
    a = build_resolver(c).send_list_answer(parse_nexthop("sub.parent.test"))
    assert a is not None and a.kind == "secure"


# -- hot-path memoisation ----------------------------------------------------------------------

def test_every_memoised_hot_path_function_is_bounded():
    from milterd.policy import coverage

    for f in (names.name_covers_domain, names.reference_matches, names.normalize_dns_name,
              names._domain_listed_cached, names.address_domain, ds._client_ip,
              coverage._value_domains_cached):
        assert f.cache_info().maxsize is not None and f.cache_info().maxsize <= 8192, f
    import ipaddress

    nets = (ipaddress.ip_network("192.0.2.0/24"),)
    for i in range(5000):   # attacker-chosen strings: the cache stays bounded
        assert not ds.in_networks(f"unknown-{i}", nets)
    assert ds._client_ip.cache_info().currsize <= 4096


# -- reload ------------------------------------------------------------------------------------

def test_decisions_read_the_config_they_are_given_not_a_newer_one():
    """The plugin decides with the session's config (the dispatcher snapshot): a reload that
    switches a partner to report mode does not relax an open session's refusal, and entries
    computed at MAIL FROM are looked up in that same config."""
    relaxed = parse_config('[partners."fabrikam.test"]\nreceive = true\nmode = "report"\n')
    conn, msg, v = mail_from(CONFIG, TlsFacts(), "<a@fabrikam.test>")
    assert v is not None
    v = plugin().milterd_end_of_message(config=CONFIG, connection=conn, message=msg)
    assert v is not None and v.code == "550"
    _, _, v2 = mail_from(relaxed, TlsFacts(), "<a@fabrikam.test>")
    assert v2 is None
