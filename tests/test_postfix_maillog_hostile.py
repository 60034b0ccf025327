"""The maillog follower against a real Postfix (#16 item 5): crafted recipients and a real
receiver answering with TLS words change no counter and no TLS-RPT record of another domain; one
session with several recipients is one TLS-RPT session; the follower started before Postfix's
maillog_file exists counts and records every delivery exactly once, also across a follower
restart and a ``postfix logrotate``."""

from __future__ import annotations

import gzip
import os
import re
import socket
from collections import Counter as Multiset
from pathlib import Path

import pytest

from milterd.core.app import App
from milterd.core.config import parse_config
from milterd.lab.postfix import PostfixLab, PostfixTLS
from milterd.lab.smtp import make_message, send
from milterd.lab.wait import wait_until
from milterd.outbound.maillog_follower import MaillogFollower
from milterd.outbound.service import count_result
from milterd.outbound.tlsrpt import build_report, load_sessions

from support import make_lab_dir

pytestmark = pytest.mark.postfix

WG, HOSTILE = "127.0.93.1", "127.0.93.2"
FAKE_RELAY = f"woodgrovebank.test[{WG}]:25"
# A recipient carrying a whole fake "relay=… status=sent" for the partner (issue #16).
CRAFTED = (f'"x@woodgrovebank.test>, relay={FAKE_RELAY}, delay=1, delays=0/0/0/0, dsn=2.0.0, '
           'status=sent (x"@other.example')
TLS_WORDS = (f"Server certificate not trusted; SSL_connect error to {FAKE_RELAY}; certificate "
             f"has expired; Verified TLS connection established to {FAKE_RELAY}")
SEND_LIST = ("woodgrovebank.test", "hostile.test", "other.example")


class Lab:
    def __init__(self, partners) -> None:
        pki = partners.pki
        self.root = make_lab_dir("milterd-maillog-hostile-")
        wg = pki.issue("mlh-wg", "mx.woodgrovebank.test")
        ho = pki.issue("mlh-hostile", "mx.hostile.test")
        access = self.root / "access"
        access.write_text(
            "ok@hostile.test OK\n"
            f"temp@hostile.test 450 4.7.5 TLS is required, but was not offered by host "
            f"woodgrovebank.test[{WG}]\n"
            f"hostile.test 550 5.7.1 {TLS_WORDS}\n")
        os.chmod(access, 0o644)
        self.rx_wg = PostfixLab(milter_socket=None, tls=PostfixTLS(wg.cert_path, wg.key_path,
                                                                   pki.ca_path),
                                local_domains=("woodgrovebank.test", "other.example"),
                                hostname="mx.woodgrovebank.test", listen_address=WG, port=25)
        self.rx_hostile = PostfixLab(
            milter_socket=None, tls=PostfixTLS(ho.cert_path, ho.key_path, pki.ca_path),
            local_domains=("hostile.test",), hostname="mx.hostile.test",
            listen_address=HOSTILE, port=25,
            extra={"smtpd_recipient_restrictions": f"check_recipient_access texthash:{access}, "
                   "permit_mynetworks, reject_unauth_destination"})
        policy = self.root / "tls_policy"
        policy.write_text("woodgrovebank.test secure match=mx.woodgrovebank.test\n"
                          "other.example secure match=mx.woodgrovebank.test\n"
                          "hostile.test secure match=mx.hostile.test\n")
        os.chmod(policy, 0o644)
        self.sender = PostfixLab(
            milter_socket=None, hostname="mx.contoso.test",
            hosts={"woodgrovebank.test": WG, "other.example": WG, "hostile.test": HOSTILE},
            tls=PostfixTLS(partners.server.cert_path, partners.server.key_path, pki.ca_path),
            extra={"smtp_tls_security_level": "may", "smtp_tls_CAfile": str(pki.ca_path),
                   "smtp_tls_loglevel": "1", "smtp_tls_policy_maps": f"texthash:{policy}",
                   "smtp_connect_timeout": "5s"})
        send_list = ", ".join(f'"{d}"' for d in SEND_LIST)
        self.app = App(parse_config(f"[domain_security]\nsend_domains = [{send_list}]\n"))
        self.results: list = []
        self.state = self.root / "maillog.state"
        self.sessions = self.root / "tlsrpt-sessions.jsonl"
        self.handle = None

    def on_result(self, r) -> None:
        self.results.append(r)
        count_result(self.app, r)

    def start_follower(self) -> None:
        f = MaillogFollower(self.sender.maillog, self.state, self.on_result,
                            sessions_file=self.sessions)          # start_at="end", the default
        f.poll_once()
        self.handle = f.start_in_thread(poll_interval=0.05)

    def stop_follower(self) -> None:
        if self.handle is not None:
            self.handle.stop()
            assert not self.handle.thread.is_alive()
            self.handle = None

    def metric(self, name: str, **labels) -> float:
        return self.app.metrics.registry.get_sample_value(name, labels) or 0.0

    def secured(self, domain: str) -> float:
        return self.metric("milterd_domain_secured_messages_sent_total", domain=domain)

    def failures(self, domain: str) -> float:
        reg = self.app.metrics.registry
        return sum(s.value for m in reg.collect() for s in m.samples
                   if s.name == "milterd_domain_secured_outbound_session_failures_total"
                   and s.labels.get("domain") == domain)

    def send(self, rcpts: list[str], subject: str):
        r = send(self.sender.port, "alice@contoso.test", rcpts,
                 make_message("alice@contoso.test", rcpts[0], subject))
        assert r.accepted, r
        return r

    def wait_results(self, n: int, timeout: float = 60) -> None:
        wait_until(lambda: len(self.results) >= n, timeout,
                   lambda: f"{n} results, got {[(r.recipient, r.status) for r in self.results]}"
                   f"{self.sender.log_tail(20)}")

    def records(self) -> list[dict]:
        return load_sessions(self.sessions) if self.sessions.exists() else []

    def all_log_text(self) -> str:
        text = ""
        for p in sorted(Path(self.sender.maillog).parent.glob("maillog*")):
            data = p.read_bytes()
            text += (gzip.decompress(data) if p.suffix == ".gz" else data).decode(errors="replace")
        return text

    def cleanup(self) -> None:
        self.stop_follower()
        for lab in (self.sender, self.rx_wg, self.rx_hostile):
            lab.cleanup()
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(partners):
    for addr in (WG, HOSTILE):
        with socket.socket() as s:
            s.bind((addr, 25))      # fails loudly if another test holds the receiver address
    lab = Lab(partners)
    try:
        lab.rx_wg.start()
        lab.rx_hostile.start()
        assert not lab.sender.maillog.exists()
        lab.start_follower()              # before Postfix has created its maillog_file
        assert not lab.sender.maillog.exists()
        lab.sender.start()
        yield lab
    finally:
        lab.cleanup()


def test_follower_before_maillog_and_one_session_for_three_recipients(lab):
    lab.send([f"{u}@woodgrovebank.test" for u in "abc"], "three")
    lab.wait_results(3)
    assert sorted((r.recipient, r.status, r.tls_level) for r in lab.results) == [
        (f"{u}@woodgrovebank.test", "sent", "verified") for u in "abc"]
    assert lab.secured("woodgrovebank.test") == 3
    recs = lab.records()
    assert [(r["policy_domain"], r["result"], r["tls_level"]) for r in recs] == [
        ("woodgrovebank.test", "success", "verified")]     # one SMTP session, one record
    report = build_report(recs, recs[0]["ts"][:10], "O", "c@example.test", "id")
    assert report["policies"][0]["summary"] == {"total-successful-session-count": 1,
                                                "total-failure-session-count": 0}


def test_crafted_recipient_and_tls_words_change_no_other_domain(lab):
    before_wg = (lab.secured("woodgrovebank.test"), lab.failures("woodgrovebank.test"))
    n_results, n_recs = len(lab.results), len(lab.records())
    lab.send([CRAFTED], "crafted")
    lab.send(['"Server certificate not trusted"@hostile.test', "ssl_connect@hostile.test",
              "temp@hostile.test", "ok@hostile.test"], "tls words")
    lab.wait_results(n_results + 5)
    log_text = lab.sender.log_text()
    assert f"to=<{CRAFTED}>" in log_text           # Postfix logged the fake fields verbatim
    assert TLS_WORDS in log_text                    # and the receiver's TLS words
    new = lab.results[n_results:]
    assert sorted((r.recipient_domain, r.status, r.tls_level, r.reason) for r in new) == [
        ("hostile.test", "bounced", "verified", "other"),
        ("hostile.test", "bounced", "verified", "other"),
        ("hostile.test", "deferred", "verified", "other"),
        ("hostile.test", "sent", "verified", None),
        ("other.example", "sent", "verified", None)]
    assert {r.relay for r in new if r.recipient_domain == "other.example"} == {
        f"other.example[{WG}]:25"}
    # nothing for the partner; no TLS failure anywhere; one session each
    assert (lab.secured("woodgrovebank.test"), lab.failures("woodgrovebank.test")) == before_wg
    assert lab.failures("hostile.test") == 0 and lab.failures("other.example") == 0
    assert lab.secured("hostile.test") == 1 and lab.secured("other.example") == 1
    recs = lab.records()[n_recs:]
    assert sorted((r["policy_domain"], r["result"], r["receiving_mx_hostname"]) for r in recs) == [
        ("hostile.test", "success", "hostile.test"), ("other.example", "success", "other.example")]


def test_exactly_once_across_follower_restart_and_logrotate(lab):
    lab.stop_follower()
    n = len(lab.results)
    lab.send(["d@woodgrovebank.test"], "while stopped")
    wait_until(lambda: "to=<d@woodgrovebank.test>" in lab.sender.log_text(), 60,
               lambda: "d delivered" + lab.sender.log_tail(10))
    lab.start_follower()                     # resumes from its saved state
    lab.wait_results(n + 1)
    lab.sender.postfix("logrotate")          # mv, HUP, sleep 1, gzip
    lab.send(["e@woodgrovebank.test", "f@woodgrovebank.test"], "after rotation")
    lab.wait_results(n + 3)
    lab.stop_follower()
    lab.start_follower()                     # and once more: nothing is read twice
    lab.send(["g@woodgrovebank.test"], "after second restart")
    lab.wait_results(n + 4)
    lab.stop_follower()
    assert list(Path(lab.sender.maillog).parent.glob("maillog.*.gz")), "logrotate rotated"
    # every delivery line Postfix wrote, counted exactly once
    got = Multiset((r.queue_id, r.recipient, r.status) for r in lab.results)
    assert all(c == 1 for c in got.values()), got
    text = lab.all_log_text()
    for r in lab.results:
        assert f"{r.queue_id}: to=<{r.recipient}>" in text
    sent_wg = [r for r in lab.results
               if r.recipient_domain == "woodgrovebank.test" and r.status == "sent"]
    plain_wg = re.findall(r"postfix/smtp\[\d+\]: \w+: to=<[a-z]@woodgrovebank\.test>, "
                          rf"relay=woodgrovebank\.test\[{re.escape(WG)}\]:25, .*status=sent", text)
    assert len(sent_wg) == len(plain_wg) == 3 + 4, [
        line for line in text.splitlines() if "@woodgrovebank.test>" in line]
    assert lab.secured("woodgrovebank.test") == 7
    # TLS-RPT: one record per session, none twice
    recs = lab.records()
    keys = [r["key"] for r in recs]
    assert len(keys) == len(set(keys))
    wg = [r for r in recs if r["policy_domain"] == "woodgrovebank.test"]
    assert len(wg) == 4     # sessions: abc, d, ef, g
    assert {r["queue_id"] for r in wg} == {r.queue_id for r in sent_wg}
