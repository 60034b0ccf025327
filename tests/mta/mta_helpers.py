"""Helpers shared by the reference-MTA tests (imported by module name; tests/mta
has no __init__.py, so this file has a name no other test directory uses)."""

from __future__ import annotations

import json
import smtplib
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from milterd.mta.config import MtaConfig
from milterd.lab.pki import Issued
from milterd.lab.wait import wait_until

HERE = Path(__file__).parent


@dataclass
class MilterProc:
    spec: str
    events_path: Path
    proc: subprocess.Popen  # type: ignore[type-arg]

    def events(self, client_port: Optional[int] = None) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        out = [json.loads(line) for line in self.events_path.read_text().splitlines() if line]
        if client_port is not None:
            out = [e for e in out
                   if e.get("macros", {}).get("{client_port}") == str(client_port)]
        return out


def start_milter(directory: Path, name: str, *extra: str,
                  spec: Optional[str] = None) -> MilterProc:
    """Start the pymilter test milter; ready once its socket accepts connections."""
    spec = spec or "unix:%s" % (directory / ("%s.sock" % name))
    events = directory / ("%s.jsonl" % name)
    proc = subprocess.Popen([sys.executable, str(HERE / "mta_testmilter.py"), spec,
                             str(events), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError("test milter exited: %s" % proc.stderr.read().decode())  # type: ignore[union-attr]
        if spec.startswith("unix:"):
            s = socket.socket(socket.AF_UNIX)
            addr: Any = spec[5:]
        else:
            port, _, host = spec[5:].partition("@")
            s = socket.socket()
            addr = (host, int(port))
        with s:
            try:
                s.connect(addr)
            except OSError:
                return False
        return True

    wait_until(ready, 20, "the pymilter milter socket")
    return MilterProc(spec, events, proc)


def stop_milter(m: MilterProc) -> None:
    # pymilter takes 3-6 s to exit after SIGTERM; it is our own test process,
    # stopped by its PID.
    m.proc.kill()
    m.proc.wait(10)
    if m.proc.stderr is not None:
        m.proc.stderr.close()


def base_config(base: Path, pki: SimpleNamespace, *, hostname: str = "mx.contoso.test",
                local_domains: tuple[str, ...] = ("contoso.test",),
                cert: Optional[Issued] = None, **overrides: Any) -> MtaConfig:
    cert = cert or pki.contoso_server
    cfg = MtaConfig(hostname=hostname, maildir_root=base / "maildir", queue_dir=base / "queue",
                    local_domains=local_domains, tls_cert=cert.cert_path, tls_key=cert.key_path,
                    ca_files=(pki.ca.cert_path,), protocol_log=base / "protocol.log",
                    retry_base=0.2, retry_max_delay=2.0, milter_timeout=10.0)
    return replace(cfg, **overrides)


@dataclass
class OutboundEvents:
    events: list[tuple[str, bool, str]]

    def __call__(self, domain: str, ok: bool, reason: str) -> None:
        self.events.append((domain, ok, reason))


def maildir_messages(root: Path, address: str) -> list[bytes]:
    local, _, domain = address.partition("@")
    new = root / domain / local / "new"
    if not new.is_dir():
        return []
    return [p.read_bytes() for p in sorted(new.iterdir())]


# ---------------------------------------------------------------------- SMTP client helpers


def client_tls_context(pki: SimpleNamespace, cert: Optional[Issued]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert_path))
    ctx.check_hostname = False  # we connect to 127.0.0.1; the server cert names mx.contoso.test
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert_path), str(cert.key_path))
    return ctx


MESSAGE = (b"From: Alice <alice@woodgrovebank.test>\r\n"
           b"To: bob@contoso.test\r\n"
           b"Subject: original subject\r\n"
           b"X-Delete-Me: secret\r\n"
           b"X-Folded: first\r\n\tsecond\r\n"
           b"\r\n"
           b"Hello Bob.\r\n"
           b".leading dot\r\n")


@dataclass
class Conversation:
    """Drives one SMTP session step by step and keeps every reply."""

    smtp: smtplib.SMTP
    replies: list[tuple[int, bytes]]

    @property
    def client_port(self) -> int:
        return self.smtp.sock.getsockname()[1]  # type: ignore[union-attr]

    def cmd(self, line: str) -> tuple[int, bytes]:
        reply = self.smtp.docmd(line)
        self.replies.append(reply)
        return reply

    def data(self, content: bytes) -> tuple[int, bytes]:
        reply = self.smtp.data(content)
        self.replies.append(reply)
        return reply

    def close(self) -> None:
        try:
            self.smtp.quit()
        except smtplib.SMTPException:
            self.smtp.close()


def converse(port: int, *, starttls: bool = False, ctx: Optional[ssl.SSLContext] = None,
             helo: str = "client.woodgrovebank.test") -> Conversation:
    smtp = smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=30)
    conv = Conversation(smtp, [])
    code, msg = smtp.ehlo()
    conv.replies.append((code, msg))
    if starttls:
        assert ctx is not None
        code, msg = smtp.starttls(context=ctx)
        assert code == 220, msg
        code, msg = smtp.ehlo()
        conv.replies.append((code, msg))
    return conv


def send_one(port: int, mail_from: str, rcpts: list[str], content: bytes = MESSAGE,
             **kw: Any) -> tuple[Conversation, list[tuple[int, bytes]]]:
    """MAIL, RCPT..., DATA; returns the conversation (still open) and the replies."""
    conv = converse(port, **kw)
    replies = [conv.cmd("MAIL FROM:<%s>" % mail_from)]
    if replies[0][0] == 250:
        for r in rcpts:
            replies.append(conv.cmd("RCPT TO:<%s>" % r))
        if any(code == 250 for code, _ in replies[1:]):
            try:
                replies.append(conv.data(content))
            except smtplib.SMTPDataError as exc:
                replies.append((exc.smtp_code, exc.smtp_error))
    return conv, replies
