"""``milterd demo``: Domain Security end to end on loopback, with a readable summary.

It makes a test PKI, starts milterd (enforce mode, woodgrovebank.test on the receive list, one
pinned self-signed certificate) and a private Postfix for contoso.test that uses it, sends mail
in every TLS case, then prints what happened: SMTP replies, the trace headers of delivered mail,
the counters from /metrics and milterd's per-message log lines.  Everything it starts it stops;
every wait is bounded.  Exit 0 when every outcome was the expected one.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from milterd.lab.net import free_port
from milterd.lab.pki import TestPKI
from milterd.lab.postfix import PostfixLab, PostfixTLS
from milterd.lab.proc import MilterdProcess
from milterd.lab.smtp import client_context, make_message, send

RCPT = "ceo@contoso.test"


def _say(text: str = "") -> None:
    print(text, flush=True)


def main(*, keep: bool = False) -> int:
    if os.geteuid() != 0:
        _say("milterd demo: needs root (it runs a private Postfix instance)")
        return 2
    base = Path(tempfile.mkdtemp(prefix="milterd-demo-"))
    os.chmod(base, 0o755)
    milterd_proc = postfix = None
    started = time.monotonic()
    try:
        _say("== milterd demo: Domain Security between contoso.test and woodgrovebank.test")
        pki = TestPKI(base / "pki", "Demo Root CA")
        server = pki.issue("mx.contoso", "mx.contoso.test")
        partner = pki.issue("mail.woodgrovebank", "mail.woodgrovebank.test")
        impostor = pki.issue("impostor", "mail.woodgrovebank.test", org="Impostor",
                             self_signed=True)
        pinned = pki.issue("direct-trust", "mail2.woodgrovebank.test", self_signed=True)
        _say(f"   test PKI in {pki.dir} (CA, server, partner, impostor, pinned self-signed)")

        metrics_port, policy_port = free_port(), free_port()
        sock = base / "run" / "milter.sock"
        cfg = base / "milterd.toml"
        cfg.write_text(f"""
[milter]
listen = "unix:{sock}"
[metrics]
listen = "127.0.0.1:{metrics_port}"
[policy]
listen = "127.0.0.1:{policy_port}"
[domain_security]
mode = "enforce"
receive_domains = ["woodgrovebank.test"]
send_domains = ["woodgrovebank.test"]
[peer_cert.pins]
"woodgrovebank.test" = ["{pinned.sha256}"]
""")
        milterd_proc = MilterdProcess(cfg, f"unix:{sock}", log_path=base / "milterd.log")
        milterd_proc.start()
        _say(f"   milterd on unix:{sock}, /metrics on 127.0.0.1:{metrics_port}")
        postfix = PostfixLab(milter_socket=f"unix:{sock}",
                             tls=PostfixTLS(server.cert_path, server.key_path, pki.ca_path),
                             policy_service=f"inet:127.0.0.1:{policy_port}",
                             base=base / "postfix")
        postfix.start()
        _say(f"   private Postfix for contoso.test on 127.0.0.1:{postfix.port}")
        _say()

        ca = pki.ca_path
        partner_tls = client_context(ca, partner.cert_path, partner.key_path)
        cases = [
            ("partner over mutual TLS", "alice@woodgrovebank.test", None, partner_tls, True),
            ("partner, pinned self-signed", "bob@woodgrovebank.test", None,
             client_context(ca, pinned.cert_path, pinned.key_path), True),
            ("partner without TLS", "alice@woodgrovebank.test", None, None, False),
            ("partner, STARTTLS no cert", "alice@woodgrovebank.test", None,
             client_context(ca), False),
            ("impostor: self-signed, partner CN", "alice@woodgrovebank.test", None,
             client_context(ca, impostor.cert_path, impostor.key_path), False),
            ("spoof: partner From:, other envelope", "x@fabrikam.test",
             "Woodgrove CEO <ceo@woodgrovebank.test>", None, False),
            ("ordinary sender, opportunistic", "news@fabrikam.test", None, None, True),
        ]
        ok = True
        _say(f"{'case':40} {'expected':9} {'SMTP reply'}")
        for title, sender, from_header, tls, expect in cases:
            data = make_message(sender, RCPT, title, from_header=from_header)
            r = send(postfix.port, sender, [RCPT], data, tls=tls)
            good = r.accepted == expect
            ok &= good
            reply = r.text if r.accepted else f"{r.text[:16]}… at {r.stage.upper()}"
            if not r.accepted and r.text.endswith(")"):
                reply += " " + r.text[r.text.rindex("("):]
            _say(f"{title:40} {'accept' if expect else 'refuse':9} {r.code} {reply}"
                 f"{'' if good else '   <-- UNEXPECTED'}")
        delivered = postfix.wait_delivered(sum(1 for c in cases if c[4]), timeout=20)
        _say()
        _say("== trace headers of delivered mail")
        for msg in delivered:
            _say(f"   {msg['Subject']}:")
            for v in msg.get_all("X-Milterd-TLS") or []:
                _say(f"      X-Milterd-TLS: {v}")
        _say()
        _say("== counters (/metrics)")
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                      timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith(("milterd_domain_secured_messages_received_total",
                                "milterd_domain_security_failures_total",
                                "milterd_messages_total", "milterd_tls_sessions_total")):
                _say(f"   {line}")
        _say()
        _say("== milterd's per-message log (excerpt)")
        for line in milterd_proc.log_text().splitlines():
            if "milterd.message" in line:
                _say("   " + line.split("milterd.message: ", 1)[-1][:230])
        _say()
        _say(f"== {'all outcomes as expected' if ok else 'SOME OUTCOMES WERE UNEXPECTED'} "
             f"({time.monotonic() - started:.1f}s)")
        return 0 if ok else 1
    finally:
        if postfix is not None:
            postfix.stop()
        if milterd_proc is not None:
            milterd_proc.stop()
        if keep:
            _say(f"   kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
