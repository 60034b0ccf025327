"""A reload never changes policy in the middle of a session.

A real milterd; one SMTP session, driven over the milter protocol by the reference MTA's client,
is held open in the middle of a transaction while a SIGHUP reload changes the policy (the partner
removed from ``receive_domains`` and the trace header renamed; or enforce switched to report).
A session opened after the reload gets the new policy; the session opened before finishes that
transaction — and starts further ones — under the policy it started with.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from milterd.mta.milter_client import MilterClientSession
from milterd.policy.stamp import parse_stamp
from milterd.lab.wait import wait_until

BEFORE = """
[domain_security]
receive_domains = ["woodgrovebank.test"]
"""

AFTER = {
    # The partner is gone from the receive list, and the trace header has another name.
    "partner_removed": '[stamp]\nheader = "X-Reloaded-TLS"\n',
    # Same partner, but failures are only reported.
    "enforce_to_report": BEFORE + 'mode = "report"\n',
}

MACROS = {"{client_addr}": "127.0.0.1", "{client_port}": "40001", "i": "4QRLD1"}  # no TLS
UNCOVERED = "bob@fabrikam.test"
SPOOF = "ceo@woodgrovebank.test"   # a partner's name, not over mutual TLS


def _stamp(result, name: str) -> dict[str, str] | None:
    for mod in result.modifications:
        if getattr(mod, "name", "").lower() == name.lower() and getattr(mod, "value", None):
            return parse_stamp(mod.value)
    return None


async def _open(spec: str) -> MilterClientSession:
    s = MilterClientSession(spec, command_timeout=20)
    assert await s.open()
    await s.connect("client.fabrikam.test", "4", 40001, "127.0.0.1", MACROS)
    await s.helo("client.fabrikam.test", MACROS)
    return s


async def _up_to_eom(s: MilterClientSession, sender: str, from_field: str, subject: str):
    """MAIL, RCPT and the headers; the MAIL FROM result (end of message not sent yet)."""
    mail = await s.mail(sender, (), MACROS)
    if mail.refuses:
        return mail
    assert not (await s.rcpt("postmaster@contoso.test", (), MACROS)).refuses
    await s.header("From", f" {from_field}")
    await s.header("Subject", f" {subject}")
    return mail


async def _transaction(s: MilterClientSession, sender: str, from_field: str, subject: str):
    mail = await _up_to_eom(s, sender, from_field, subject)
    if mail.refuses:
        return mail
    return await s.eom(MACROS)


def _reload(proc, text: str) -> None:
    """Write the new config, SIGHUP, and wait until milterd says it reloaded."""
    done = proc.log_text().count("configuration reloaded")
    proc.config_path.write_text(text)
    proc.signal(signal.SIGHUP)
    def reloaded() -> bool:
        log = proc.log_text()
        assert "reload refused" not in log, proc.log_tail()
        return log.count("configuration reloaded") > done
    wait_until(reloaded, 20, proc.log_tail)


@pytest.mark.parametrize("change", list(AFTER))
def test_the_policy_a_session_started_with_decides_it_to_the_end(milterd_factory, change):
    proc = milterd_factory(BEFORE)
    text = proc.config_path.read_text()
    assert text.endswith(BEFORE)
    after = text[:-len(BEFORE)] + AFTER[change]

    async def scenario() -> None:
        old = await _open(proc.socket_spec)
        try:
            # A transaction in progress: an ordinary envelope, a From: in a partner's name.
            mail = await _up_to_eom(old, UNCOVERED, SPOOF, "in flight")
            assert not mail.refuses, mail

            _reload(proc, after)

            # A session opened after the reload: the new policy accepts the very same mail.
            new = await _open(proc.socket_spec)
            try:
                eom = await _transaction(new, UNCOVERED, SPOOF, "after reload")
                assert eom.verdict == "continue", eom
                if change == "partner_removed":
                    assert _stamp(eom, "X-Milterd-TLS") is None
                    assert _stamp(eom, "X-Reloaded-TLS")["domain-secure"] == "none"
                else:
                    stamp = _stamp(eom, "X-Milterd-TLS")
                    assert (stamp["domain-secure"], stamp["domain"]) == ("fail",
                                                                         "woodgrovebank.test")
                # ... also at MAIL FROM, for the partner's own envelope
                eom = await _transaction(new, SPOOF, SPOOF, "partner envelope, new session")
                assert eom.verdict == "continue", eom
            finally:
                await new.close()

            # The session opened before the reload: the old policy ends the transaction ...
            eom = await old.eom(MACROS)
            assert eom.verdict == "reject", eom
            assert eom.reply.startswith("550 5.7.1"), eom.reply
            await old.abort()
            # ... and decides its later transactions too: refused at MAIL FROM,
            mail = await _transaction(old, SPOOF, SPOOF, "partner envelope, old session")
            assert mail.verdict == "reject" and mail.reply.startswith("550 5.7.1"), mail
            await old.abort()
            # while ordinary mail is stamped as the old configuration says.
            eom = await _transaction(old, UNCOVERED, UNCOVERED, "ordinary, old session")
            assert eom.verdict == "continue", eom
            assert _stamp(eom, "X-Milterd-TLS")["domain-secure"] == "none"
            assert _stamp(eom, "X-Reloaded-TLS") is None
        finally:
            await old.close()

    asyncio.run(scenario())
    assert proc.proc.poll() is None, proc.log_tail()
    assert "reload refused" not in proc.log_text()
