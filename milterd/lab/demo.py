"""``milterd demo``: Domain Security end to end on loopback, with a readable summary.

Default (``--mta reference``): two organisations, contoso.test and woodgrovebank.test, each with a
reference pure-Python MTA and its own milterd, exchange domain-secured mail in both directions
(mutual TLS, send lists, receive lists); then a spoofed partner mail without TLS and an ordinary
opportunistic mail arrive at contoso, and a hoster's MTA (certificate for mx.hoster.test) sends
the same mail for two of contoso's partners: hosted.test, whose ``[partners."hosted.test"]``
terms accept that certificate name (``certificate_names``), and litware.test, whose terms do not
(refused: name_mismatch).  Needs nothing but the Python install.

``--mta postfix``: milterd in front of a private Postfix for contoso.test (root and Debian's
postfix needed), mail in every TLS case including a pinned self-signed partner and the hosted
partner.

Both print what happened — SMTP replies, trace headers, counters, logs — stop everything they
started, bound every wait, and exit 0 only when every outcome was the expected one.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from milterd.lab.net import free_port
from milterd.lab.pki import TestPKI
from milterd.lab.postfix import PostfixLab, PostfixTLS
from milterd.lab.proc import MilterdProcess
from milterd.lab.smtp import SendResult, client_context, make_message, send

RCPT = "ceo@contoso.test"

#: contoso.test's terms for two partners whose mail comes from the same hoster's MTA.
HOSTED_PARTNERS = """
# hosted.test's mail is sent by its hoster's MTA, whose certificate names mx.hoster.test,
# not hosted.test: certificate_names accepts that name, for this partner only.
[partners."hosted.test"]
receive = true
certificate_names = ["mx.hoster.test"]

# litware.test uses the same hoster, but its terms name no other certificate:
# its mail needs a certificate naming litware.test.
[partners."litware.test"]
receive = true
"""


def _say(text: str = "") -> None:
    print(text, flush=True)


def main(*, keep: bool = False, mta: str = "reference") -> int:
    if mta == "reference":
        return reference_demo(keep=keep)
    return postfix_demo(keep=keep)


def _metrics_lines(port: int, prefixes: tuple[str, ...]) -> list[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [line for line in text.splitlines() if line.startswith(prefixes)]


def _refusal_reason(r: SendResult) -> str:
    """`` (name_mismatch)`` from milterd's refusal text, else nothing."""
    if not r.accepted and r.text.endswith(")") and "(" in r.text:
        return " " + r.text[r.text.rindex("("):]
    return ""


def _show_partner_tables() -> None:
    _say("   contoso.test's milterd.toml: partner terms for two domains that mx.hoster.test "
         "hosts")
    for line in HOSTED_PARTNERS.strip().splitlines():
        if line and not line.startswith("#"):
            _say(f"      {line}")


def _stop_all(procs: list[MilterdProcess]) -> None:
    """SIGTERM every milterd first, then wait: libmilter takes seconds to exit, in parallel."""
    for p in procs:
        if p.proc is not None and p.proc.poll() is None:
            p.signal(signal.SIGTERM)
    for p in procs:
        p.stop()


def _wait(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def reference_demo(*, keep: bool = False) -> int:
    import email
    import email.policy

    from milterd.mta.__main__ import MtaThread
    from milterd.mta.config import MtaConfig

    base = Path(tempfile.mkdtemp(prefix="milterd-demo-"))
    os.chmod(base, 0o755)
    started = time.monotonic()
    procs: list[MilterdProcess] = []
    mtas: dict[str, MtaThread] = {}
    outbound: list[tuple[str, str, bool, str]] = []
    try:
        _say("== milterd demo: two organisations exchanging domain-secured mail on loopback")
        pki = TestPKI(base / "pki", "Demo Root CA")
        orgs = {"contoso.test": "woodgrovebank.test", "woodgrovebank.test": "contoso.test"}
        certs = {d: pki.issue(f"mx.{d}", f"mx.{d}") for d in orgs}
        hoster = pki.issue("mx.hoster", "mx.hoster.test")
        _say(f"   test PKI in {pki.dir}: one CA, mx.contoso.test, mx.woodgrovebank.test, "
             "mx.hoster.test")
        metrics_ports, sockets = {}, {}
        for domain, partner in orgs.items():
            d = base / domain
            d.mkdir()
            metrics_ports[domain] = free_port()
            sockets[domain] = d / "milter.sock"
            cfg = d / "milterd.toml"
            cfg.write_text(f"""
[milter]
listen = "unix:{sockets[domain]}"
group = ""
[metrics]
listen = "127.0.0.1:{metrics_ports[domain]}"
[domain_security]
receive_domains = ["{partner}"]
send_domains = ["{partner}"]
{HOSTED_PARTNERS if domain == "contoso.test" else ""}""")
            p = MilterdProcess(cfg, f"unix:{sockets[domain]}", log_path=d / "milterd.log")
            procs.append(p.start())
        ports = {d: free_port() for d in orgs}
        for domain, partner in orgs.items():
            d = base / domain
            cfg = MtaConfig(hostname=f"mx.{domain}", maildir_root=d / "maildir",
                            queue_dir=d / "queue", listen_port=ports[domain],
                            local_domains=(domain,), tls_cert=certs[domain].cert_path,
                            tls_key=certs[domain].key_path, ca_files=(pki.ca_path,),
                            milter=f"unix:{sockets[domain]}", send_domains=(partner,),
                            routes={partner: ("127.0.0.1", ports[partner])},
                            protocol_log=d / "protocol.log", retry_base=0.2)

            def record(dom: str, ok: bool, reason: str, _src: str = domain) -> None:
                outbound.append((_src, dom, ok, reason))

            mtas[domain] = MtaThread(cfg, on_outbound_result=record).start()
            _say(f"   {domain}: reference MTA on 127.0.0.1:{ports[domain]}, milterd "
                 f"(receive+send list: {partner}), /metrics on :{metrics_ports[domain]}")
        _show_partner_tables()
        _say()

        def mailbox(domain: str, user: str) -> list:
            new = base / domain / "maildir" / domain / user / "new"
            return [email.message_from_bytes(f.read_bytes(), policy=email.policy.default)
                    for f in sorted(new.iterdir())] if new.is_dir() else []

        ok = True
        _say(f"{'case':52} {'expected':9} reply at the receiving side")
        # 1+2: submitted locally, relayed over mutual TLS, checked by the partner's milterd.
        for src, dst, user in (("contoso.test", "woodgrovebank.test", "bob"),
                               ("woodgrovebank.test", "contoso.test", "alice")):
            sender, rcpt = f"{user}@{src}", f"{'alice' if user == 'bob' else 'bob'}@{dst}"
            r = send(ports[src], sender, [rcpt],
                     make_message(sender, rcpt, f"domain-secured {src} -> {dst}"))
            got = r.accepted and _wait(lambda: any(
                m["Subject"] == f"domain-secured {src} -> {dst}"
                for m in mailbox(dst, rcpt.split("@")[0])))
            ok &= bool(got)
            _say(f"{'domain-secured ' + src + ' -> ' + dst:52} {'deliver':9} "
                 f"{'delivered over mutual TLS' if got else 'NOT DELIVERED   <-- UNEXPECTED'}")
        # 3-6: direct connections to contoso; 5+6 are the hoster's MTA (STARTTLS with its
        # mx.hoster.test certificate) sending the same mail for two partners.
        hoster_tls = client_context(pki.ca_path, hoster.cert_path, hoster.key_path)
        cases = [("spoof: woodgrovebank.test sender, no TLS", "ceo@woodgrovebank.test", None,
                  False),
                 ("ordinary sender, opportunistic (no TLS)", "news@fabrikam.test", None, True),
                 ("hosted.test via mx.hoster.test (certificate_names)", "info@hosted.test",
                  hoster_tls, True),
                 ("litware.test via mx.hoster.test (no such term)", "info@litware.test",
                  hoster_tls, False)]
        accepted_titles = []
        for title, sender, tls, expect in cases:
            r = send(ports["contoso.test"], sender, ["alice@contoso.test"],
                     make_message(sender, "alice@contoso.test", title), tls=tls,
                     helo="mx.hoster.test" if tls is hoster_tls else "client.example.test")
            good = r.accepted == expect
            ok &= good
            if r.accepted:
                accepted_titles.append(title)
            reply = r.text if len(r.text) <= 70 else r.text[:69] + "…" + _refusal_reason(r)
            _say(f"{title:52} {'accept' if expect else 'refuse':9} {r.code} {reply}"
                 f"{'' if good else '   <-- UNEXPECTED'}")
        _wait(lambda: {m["Subject"] for m in mailbox("contoso.test", "alice")}
              >= set(accepted_titles), timeout=10)
        _say()
        _say("== trace headers of delivered mail")
        for domain, user in (("woodgrovebank.test", "alice"), ("contoso.test", "bob"),
                             ("contoso.test", "alice")):
            for msg in mailbox(domain, user):
                _say(f"   {msg['Subject']}:")
                for v in msg.get_all("X-Milterd-TLS") or []:
                    _say(f"      X-Milterd-TLS: {v}")
        _say()
        _say("== counters")
        for domain in orgs:
            for line in _metrics_lines(metrics_ports[domain], (
                    "milterd_domain_secured_messages_received_total",
                    "milterd_domain_security_failures_total", "milterd_messages_total")):
                _say(f"   {domain:20} {line}")
        for src, dst, sent_ok, reason in outbound:
            _say(f"   {src:20} outbound to {dst}: {'domain-secured sent' if sent_ok else 'FAILED'}"
                 f" ({reason})")
        ok &= sum(1 for o in outbound if o[2] and o[3] == "secured") == 2
        _say()
        _say("== protocol log of contoso.test's MTA (excerpt: the outbound mutual-TLS session)")
        plog = (base / "contoso.test" / "protocol.log").read_text(errors="replace").splitlines()
        for line in [l for l in plog if ",*," in l or ",>,STARTTLS" in l][:8]:
            _say("   " + line[:200])
        _say()
        _say(f"== {'all outcomes as expected' if ok else 'SOME OUTCOMES WERE UNEXPECTED'} "
             f"({time.monotonic() - started:.1f}s)")
        return 0 if ok else 1
    finally:
        for t in mtas.values():
            t.stop()
        _stop_all(procs)
        if keep:
            _say(f"   kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def postfix_demo(*, keep: bool = False) -> int:
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
        hoster = pki.issue("mx.hoster", "mx.hoster.test")
        _say(f"   test PKI in {pki.dir} (CA, server, partner, impostor, pinned self-signed, "
             "hoster)")

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
{HOSTED_PARTNERS}""")
        milterd_proc = MilterdProcess(cfg, f"unix:{sock}", log_path=base / "milterd.log")
        milterd_proc.start()
        _say(f"   milterd on unix:{sock}, /metrics on 127.0.0.1:{metrics_port}")
        postfix = PostfixLab(milter_socket=f"unix:{sock}",
                             tls=PostfixTLS(server.cert_path, server.key_path, pki.ca_path),
                             policy_service=f"inet:127.0.0.1:{policy_port}",
                             base=base / "postfix")
        postfix.start()
        _say(f"   private Postfix for contoso.test on 127.0.0.1:{postfix.port}")
        _show_partner_tables()
        _say()

        ca = pki.ca_path
        partner_tls = client_context(ca, partner.cert_path, partner.key_path)
        hoster_tls = client_context(ca, hoster.cert_path, hoster.key_path)
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
            ("hosted.test via mx.hoster.test", "info@hosted.test", None, hoster_tls, True),
            ("litware.test via mx.hoster.test", "info@litware.test", None, hoster_tls, False),
        ]
        ok = True
        _say(f"{'case':40} {'expected':9} {'SMTP reply'}")
        for title, sender, from_header, tls, expect in cases:
            data = make_message(sender, RCPT, title, from_header=from_header)
            r = send(postfix.port, sender, [RCPT], data, tls=tls)
            good = r.accepted == expect
            ok &= good
            reply = r.text if r.accepted else f"{r.text[:16]}… at {r.stage.upper()}"
            reply += _refusal_reason(r)
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
