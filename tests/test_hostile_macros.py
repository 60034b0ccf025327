"""Nothing the MTA sends as a macro can break milterd: a real milterd, driven over the milter
protocol by the reference MTA's client with hostile macro bytes (non-ASCII digits, invalid UTF-8,
CR/LF, overlong values).  Uncovered mail keeps flowing and is stamped without a raw CR/LF; covered
mail without TLS facts milterd can trust is refused; the daemon keeps serving."""

from __future__ import annotations

import asyncio

import pytest

from milterd.mta.milter_client import MilterClientSession
from milterd.policy.stamp import parse_stamp

CONFIG = """
[domain_security]
receive_domains = ["woodgrovebank.test"]
"""

GOOD_TLS = {"{tls_version}": "TLSv1.3", "{cipher}": "TLS_AES_256_GCM_SHA384",
            "{cipher_bits}": "256", "{client_addr}": "127.0.0.1", "{client_port}": "40000",
            "i": "Q1"}

HOSTILE = [
    {"{cipher_bits}": "²"},
    {"{cipher_bits}": "\u0663"},                       # Arabic-Indic three
    {"{cipher_bits}": "\udcff\udcfe"},                 # invalid UTF-8 bytes
    {"{tls_version}": "TLSv1.3\n"},
    {"{tls_version}": "\udcff"},
    {"{cipher}": "AES\r\nX-Injected: yes"},
    {"{cert_subject}": "mail.woodgrovebank.test\n", "{cert_issuer}": "CA\r\n"},
    {"{cert_subject}": "\udcc3\udca9" * 3000},
    {"{client_addr}": "IPv6:::1\n", "{client_port}": "²"},
    {"{client_port}": "99999999999999999999"},
    {"i": "\udcff\n"},
    {"{verify}": "OK\n", "{cert_fp}": "\udcff" * 10},
]


async def _transaction(spec: str, sender: str, from_header: str, macros: dict[str, str]):
    s = MilterClientSession(spec, command_timeout=10)
    assert await s.open()
    try:
        await s.connect("client.test", "4", 40000, "127.0.0.1", macros)
        await s.helo("client.test", macros)
        mail = await s.mail(sender, (), macros)
        if mail.refuses:
            return mail, None, None
        rcpt = await s.rcpt("postmaster@contoso.test", (), macros)
        await s.header("From", from_header)
        await s.header("Subject", "hostile macros")
        eom = await s.eom(macros)
        return mail, rcpt, eom
    finally:
        await s.close()


def _stamp(result) -> str:
    for mod in result.modifications:
        name = getattr(mod, "name", None)
        if name and name.lower() == "x-milterd-tls" and getattr(mod, "value", None) is not None:
            return mod.value
    raise AssertionError(f"no stamp among {result.modifications!r}")


@pytest.mark.parametrize("hostile", HOSTILE, ids=[",".join(h) for h in HOSTILE])
def test_hostile_macros_leave_uncovered_mail_flowing(milterd_factory, hostile):
    proc = milterd_factory(CONFIG)
    macros = {**GOOD_TLS, **hostile}
    mail, rcpt, eom = asyncio.run(_transaction(proc.socket_spec, "bob@fabrikam.test",
                                               "bob@fabrikam.test", macros))
    assert not mail.refuses and not rcpt.refuses, (mail, rcpt)
    assert eom.verdict == "continue", eom
    stamp = _stamp(eom)
    assert "\n" not in stamp and "\r" not in stamp, stamp
    assert parse_stamp(stamp)["domain-secure"] == "none"
    # Covered mail with the same macros is refused, never waved through on odd facts.
    mail, _rcpt, eom = asyncio.run(_transaction(proc.socket_spec, "ceo@woodgrovebank.test",
                                                "ceo@woodgrovebank.test", macros))
    assert mail.refuses or (eom is not None and eom.refuses), (mail, eom)
    # ... and the daemon is still there for the next session.
    mail, _rcpt, eom = asyncio.run(_transaction(proc.socket_spec, "bob@fabrikam.test",
                                                "bob@fabrikam.test", GOOD_TLS))
    assert eom.verdict == "continue"
