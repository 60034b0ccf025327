"""A test SMTP client that reports where and how a transaction ended, instead of raising."""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path


@dataclass(frozen=True)
class SendResult:
    stage: str        # "mail" | "rcpt" | "data" | "done" | "connect" | "starttls"
    code: int         # the last SMTP reply code (250 when accepted)
    text: str

    @property
    def accepted(self) -> bool:
        return self.stage == "done" and self.code == 250

    @property
    def reply_class(self) -> str:
        return f"{self.code // 100}xx"


def make_message(sender: str, to: str, subject: str = "test", *, from_header: str | None = None,
                 extra_headers: list[tuple[str, str]] | None = None, body: str = "hello\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = from_header or sender
    msg["To"] = to
    msg["Subject"] = subject
    for name, value in extra_headers or []:
        msg[name] = value
    msg.set_content(body)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))  # SMTP wants CRLF


def client_context(ca: Path | None, cert: Path | None = None, key: Path | None = None,
                   *, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.check_hostname = False  # the lab's server name is not what the client dials (127.0.0.1)
    if ca is None:
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def send(port: int, sender: str, recipients: list[str], data: bytes, *,
         host: str = "127.0.0.1", tls: ssl.SSLContext | None = None,
         helo: str = "client.example.test", timeout: float = 60) -> SendResult:
    """One SMTP transaction; ``tls`` given means STARTTLS with that context (and EHLO again)."""
    try:
        s = smtplib.SMTP(host, port, local_hostname=helo, timeout=timeout)
    except OSError as exc:
        return SendResult("connect", 0, str(exc))
    try:
        s.ehlo()
        if tls is not None:
            code, text = s.starttls(context=tls)
            if code != 220:
                return SendResult("starttls", code, text.decode(errors="replace"))
            s.ehlo()
        code, text = s.mail(sender)
        if code != 250:
            return SendResult("mail", code, text.decode(errors="replace"))
        ok = 0
        last = (250, b"")
        for r in recipients:
            code, text = s.rcpt(r)
            last = (code, text)
            if code in (250, 251):
                ok += 1
        if not ok:
            return SendResult("rcpt", last[0], last[1].decode(errors="replace"))
        code, text = s.data(data)
        return SendResult("done" if code == 250 else "data", code, text.decode(errors="replace"))
    except smtplib.SMTPServerDisconnected as exc:
        return SendResult("disconnected", 0, str(exc))
    except smtplib.SMTPResponseException as exc:
        return SendResult("data", exc.smtp_code, exc.smtp_error.decode(errors="replace"))
    finally:
        try:
            s.quit()
        except Exception:
            s.close()
