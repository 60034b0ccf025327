"""The core issue's acceptance tests, against a real private Postfix, real TLS and real pymilter."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from milterd.lab.smtp import client_context, make_message, send
from milterd.lab.wait import wait_until

pytestmark = pytest.mark.postfix

RCPT = "user@contoso.test"


def _send(pf, sender, subject="t", tls=None, **kw):
    return send(pf.port, sender, [RCPT], make_message(sender, RCPT, subject, **kw), tls=tls)


def test_plugin_rejects_one_sender_at_mail_from(milterd_factory, postfix_factory):
    m = milterd_factory(plugin_modules=("testplugins.reject_sender",))
    pf = postfix_factory(m.socket_spec)
    blocked = _send(pf, "blocked@fabrikam.test", "blocked")
    allowed = _send(pf, "alice@fabrikam.test", "allowed")
    assert (blocked.stage, blocked.code) == ("mail", 550), blocked
    assert blocked.text.startswith("5.7.1 Sender blocked by test policy")
    assert allowed.accepted, allowed
    delivered = pf.wait_delivered(1)
    assert [d["Subject"] for d in delivered] == ["allowed"]


def test_hooks_see_normalised_tls_facts_for_the_four_cases(milterd_factory, postfix_factory,
                                                           partners, tmp_path):
    record = tmp_path / "tls.jsonl"
    m = milterd_factory(plugin_modules=("testplugins.record_tls",),
                        env={"MILTERD_TEST_RECORD": str(record)})
    pf = postfix_factory(m.socket_spec)
    ca = partners.pki.ca_path
    cases = {
        "none@fabrikam.test": None,
        "anon@fabrikam.test": client_context(ca),
        "trusted@fabrikam.test": client_context(ca, partners.partner.cert_path,
                                                partners.partner.key_path),
        "selfsigned@fabrikam.test": client_context(ca, partners.self_signed.cert_path,
                                                   partners.self_signed.key_path),
    }
    for sender, ctx in cases.items():
        assert _send(pf, sender, tls=ctx).accepted
    seen = {json.loads(line)["sender"].strip("<>"): json.loads(line)
            for line in record.read_text().splitlines()}
    # The table of notes/postfix.md, normalised.
    none = seen["none@fabrikam.test"]
    assert (none["version"], none["bits"], none["verify"], none["subject_cn"]) == (
        None, None, "none", None)
    anon = seen["anon@fabrikam.test"]
    assert anon["version"] == "TLSv1.3" and anon["bits"] == 256 and anon["cipher"]
    assert (anon["verify"], anon["subject_cn"], anon["issuer"]) == ("unknown", None, None)
    trusted = seen["trusted@fabrikam.test"]
    assert (trusted["version"], trusted["verify"], trusted["subject_cn"], trusted["issuer"]) == (
        "TLSv1.3", "ok", "mail.woodgrovebank.test", "milterd Test CA")
    selfsigned = seen["selfsigned@fabrikam.test"]
    # Postfix hides an untrusted certificate from a milter: same as no certificate.
    assert (selfsigned["verify"], selfsigned["subject_cn"], selfsigned["fingerprint"]) == (
        "unknown", None, None)
    assert all(v["dialect"] == ("none" if k.startswith("none") else "postfix")
               for k, v in seen.items())
    assert all(v["client_address"] == "127.0.0.1" and v["client_port"] for v in seen.values())


def test_raising_plugin_tempfails_and_next_message_is_served(milterd_factory, postfix_factory):
    m = milterd_factory(plugin_modules=("testplugins.raiser",))
    pf = postfix_factory(m.socket_spec)
    boom = _send(pf, "a@fabrikam.test", "boom please")
    fine = _send(pf, "a@fabrikam.test", "fine")
    assert boom.reply_class == "4xx" and boom.stage == "data", boom
    assert "4.3.0" in boom.text and "exploded" not in boom.text  # no exception text leaks
    assert fine.accepted, fine
    assert [d["Subject"] for d in pf.wait_delivered(1)] == ["fine"]
    assert "plugin testplugins.raiser failed in milterd_end_of_message" in m.log_text()


def test_milterd_down_means_tempfail_and_nothing_delivered(milterd_factory, postfix_factory):
    m = milterd_factory()
    pf = postfix_factory(m.socket_spec)
    assert _send(pf, "a@fabrikam.test", "while up").accepted
    m.stop()
    down = _send(pf, "a@fabrikam.test", "while down")
    assert down.reply_class == "4xx", down
    assert [d["Subject"] for d in pf.wait_delivered(1)] == ["while up"]
    assert pf.queue_ids() == []


def test_sighup_reload_keeps_old_config_when_broken_and_applies_good_one(
        milterd_factory, postfix_factory):
    m = milterd_factory(plugin_modules=("testplugins.reject_sender",))
    pf = postfix_factory(m.socket_spec)
    config: Path = m.config_path
    good_text = config.read_text()

    config.write_text(good_text + "\n[domain_security]\nmode = 'sometimes'\n")
    m.signal(signal.SIGHUP)
    _wait_for_log(m, "reload refused")
    # The old config (with the reject_sender plugin) still serves.
    assert _send(pf, "blocked@fabrikam.test").code == 550
    assert "domain_security.mode: must be one of enforce, report" in m.log_text()

    # A good new config: no test plugin any more, a receive list instead.
    config.write_text(good_text.replace('"testplugins.reject_sender"', "") +
                      '\n[domain_security]\nreceive_domains = ["woodgrovebank.test"]\n')
    m.signal(signal.SIGHUP)
    _wait_for_log(m, "configuration reloaded")
    assert _send(pf, "blocked@fabrikam.test", "now allowed").accepted
    refused = _send(pf, "x@woodgrovebank.test", "partner without TLS")
    assert refused.code == 550 and "(no_tls)" in refused.text


def test_contrib_postfix_fragment_is_what_the_lab_runs(postfix_factory, milterd_factory):
    m = milterd_factory()
    pf = postfix_factory(m.socket_spec)
    main_cf = (pf.conf / "main.cf").read_text()
    assert "milter_default_action = tempfail" in main_cf
    assert f"smtpd_milters = {m.socket_spec}" in main_cf
    mode = Path(m.socket_spec.split(":", 1)[1]).stat().st_mode & 0o777
    assert mode == 0o660


def _wait_for_log(proc, needle: str, timeout: float = 15) -> None:
    wait_until(lambda: needle in proc.log_text(), timeout,
               lambda: f"{needle!r} to be logged:\n{proc.log_tail()}")
