"""The Domain Security table, shared by the Postfix, Sendmail and reference-MTA tests (parity).

Each row: how the client connects, the envelope sender and From: header, and the outcome every
MTA integration must produce under :data:`DS_CONFIG` — reply class, delivered or not, and the
reason (from the reply text when refused, from the trace header when delivered).
"""

from __future__ import annotations

import email
import email.policy
import ssl
from dataclasses import dataclass
from pathlib import Path

from milterd.lab.smtp import client_context
from milterd.lab.wait import wait_until
from milterd.policy.stamp import parse_stamp

PARTNER = "woodgrovebank.test"


def ds_config(partners, *, mode: str = "enforce", policy_listen: str | None = None) -> str:
    text = f"""
[domain_security]
mode = "{mode}"
receive_domains = ["{PARTNER}"]
[tls]
min_version = "TLSv1.3"
[peer_cert.pins]
"{PARTNER}" = ["{partners.pinned.sha256}"]
"""
    if policy_listen:
        text += f'[policy]\nlisten = "{policy_listen}"\n'
    return text


@dataclass(frozen=True)
class Row:
    name: str
    client: str                  # none | anon | partner | other | selfsigned | pinned | tls12
    sender: str
    from_header: str | None
    reply_class: str             # "2xx" | "5xx"
    delivered: bool
    status: str                  # domain-secure= pass | fail | none
    reason: str | None


C, U = f"alice@{PARTNER}", "bob@fabrikam.test"
ROWS = [
    Row("covered/no-tls", "none", C, None, "5xx", False, "fail", "no_tls"),
    Row("covered/starttls-no-cert", "anon", C, None, "5xx", False, "fail", "no_trusted_cert"),
    Row("covered/trusted-partner-cert", "partner", C, None, "2xx", True, "pass", None),
    Row("covered/trusted-other-domain-cert", "other", C, None, "5xx", False, "fail",
        "name_mismatch"),
    Row("covered/self-signed-partner-cn", "selfsigned", C, None, "5xx", False, "fail",
        "pin_mismatch"),
    Row("covered/pinned-self-signed", "pinned", C, None, "2xx", True, "pass", None),
    Row("covered/tls1.2-below-minimum", "tls12", C, None, "5xx", False, "fail", "tls_version"),
    Row("covered-from/uncovered-envelope/no-tls", "none", U, f"CEO <ceo@{PARTNER}>", "5xx", False,
        "fail", "no_tls"),
    Row("covered-from/uncovered-envelope/trusted", "partner", U, f"CEO <ceo@{PARTNER}>", "2xx",
        True, "pass", None),
] + [
    Row(f"uncovered/{client}", client, U, None, "2xx", True, "none", None)
    for client in ("none", "anon", "partner", "other", "selfsigned", "pinned", "tls12")
]


def client_tls(partners, client: str) -> ssl.SSLContext | None:
    ca = partners.pki.ca_path
    certs = {"partner": partners.partner, "other": partners.other,
             "selfsigned": partners.self_signed, "pinned": partners.pinned, "tls12": partners.partner}
    if client == "none":
        return None
    if client == "anon":
        return client_context(ca)
    issued = certs[client]
    return client_context(ca, issued.cert_path, issued.key_path,
                          max_version=ssl.TLSVersion.TLSv1_2 if client == "tls12" else None)


def reason_from_reply(text: str) -> str | None:
    if text.endswith(")") and "(" in text:
        return text[text.rindex("(") + 1:-1]
    return None


def check_row(row: Row, result, delivered_msg, *, mode: str = "enforce",
              header: str = "X-Milterd-TLS") -> None:
    """Assert one row's outcome; ``delivered_msg`` is the delivered message or None."""
    expect_class, expect_delivered = row.reply_class, row.delivered
    if mode == "report":
        expect_class, expect_delivered = "2xx", True
    assert result.reply_class == expect_class, (row.name, result)
    assert (delivered_msg is not None) == expect_delivered, row.name
    if delivered_msg is not None:
        stamps = delivered_msg.get_all(header) or []
        assert len(stamps) == 1, (row.name, stamps)
        stamp = parse_stamp(str(stamps[0]))
        assert stamp["domain-secure"] == row.status, (row.name, stamp)
        assert stamp.get("reason") == row.reason, (row.name, stamp)
    else:
        assert reason_from_reply(result.text) == row.reason, (row.name, result.text)


def delivered_with_subject(mta, subject: str, timeout: float = 15):
    """The message ``mta`` delivered with this Subject, waiting up to ``timeout``; None if none
    arrived (rows whose accepted message must not be delivered)."""
    def find():
        return next((m for m in mta.delivered() if m["Subject"] == subject), None)
    try:
        return wait_until(find, timeout, f"delivery of {subject!r}")
    except AssertionError:
        return None


class ReferenceMtaLab:
    """The reference MTA as contoso.test's MX in front of a milterd (``milter_spec``), with the
    partners' server certificate; ``delivered()`` reads the mailbox of ``rcpt``."""

    kind = "reference-mta"

    def __init__(self, partners, milter_spec: str, base: Path, rcpt: str = "user@contoso.test"):
        from milterd.mta.__main__ import MtaThread
        from milterd.mta.config import MtaConfig

        self.root = base / "maildir"
        self.rcpt = rcpt
        cfg = MtaConfig(hostname="mx.contoso.test", maildir_root=self.root,
                        queue_dir=base / "queue", local_domains=("contoso.test",),
                        tls_cert=partners.server.cert_path, tls_key=partners.server.key_path,
                        ca_files=(partners.pki.ca_path,), milter=milter_spec)
        self.thread = MtaThread(cfg).start()
        self.port = self.thread.port

    def delivered(self):
        local, _, domain = self.rcpt.partition("@")
        new = self.root / domain / local / "new"
        files = sorted(new.iterdir()) if new.is_dir() else []
        return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
                for p in files]

    def stop(self):
        self.thread.stop()
