"""Maillog follower: real Postfix smtp(8) line formats, rotation, truncation, restart."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import replace
from datetime import datetime, timezone

import pytest

from milterd.lab.wait import wait_until
from milterd.outbound.maillog_follower import MaillogFollower
from milterd.outbound.maillog_parser import MaillogParser, OutboundResult
from milterd.outbound.tlsrpt import session_record
from milterd.outbound.tlspolicy import PolicyAnswer

UTC = timezone.utc


def parser() -> MaillogParser:
    return MaillogParser(now=lambda: datetime(2026, 11, 24, 12, 0, tzinfo=UTC), tz=UTC)


H = "Nov 24 08:25:01 mail postfix/smtp"
VERIFIED = (f"{H}[4711]: Verified TLS connection established to mx1.partner.test[192.0.2.10]:25: "
            "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 "
            "server-signature RSA-PSS (2048 bits) server-digest SHA256")
SENT = (f"{H}[4711]: 4B1C52A0F3: to=<alice@partner.test>, relay=mx1.partner.test[192.0.2.10]:25, "
        "delay=0.42, delays=0.05/0.01/0.2/0.16, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 9F1E2)")


def test_verified_sent():
    p = parser()
    assert p.feed(VERIFIED) is None
    r = p.feed(SENT)
    assert r.session_key.endswith(":4B1C52A0F3:partner.test")  # opens the TLS-RPT session
    assert replace(r, session_key="") == OutboundResult(
        "4B1C52A0F3", "partner.test", "mx1.partner.test[192.0.2.10]:25", "sent", "verified", None,
        datetime(2026, 11, 24, 8, 25, 1, tzinfo=UTC), "alice@partner.test", "2.0.0",
        "250 2.0.0 Ok: queued as 9F1E2")
    assert (r.relay_host, r.relay_ip, r.tls_failure) == ("mx1.partner.test", "192.0.2.10", False)


@pytest.mark.parametrize("tls_line,level", [
    ("Trusted TLS connection established to mx1.partner.test[192.0.2.10]:25: TLSv1.2 with "
     "cipher ECDHE-RSA-AES256-GCM-SHA384 (256/256 bits)", "trusted"),
    ("Untrusted TLS connection established to mx1.partner.test[192.0.2.10]:25: TLSv1.3 with "
     "cipher TLS_AES_256_GCM_SHA384 (256/256 bits)", "untrusted"),
    ("Anonymous TLS connection established to mx1.partner.test[192.0.2.10]:25: TLSv1.2 with "
     "cipher ECDHE-RSA-AES256-GCM-SHA384 (256/256 bits)", "anonymous"),
])
def test_tls_levels(tls_line, level):
    p = parser()
    p.feed(f"{H}[4711]: {tls_line}")
    assert p.feed(SENT).tls_level == level


def test_no_tls_is_none_and_other_process_does_not_leak():
    p = parser()
    p.feed(VERIFIED.replace("mx1.partner.test[192.0.2.10]", "mx9.other.test[192.0.2.99]"))
    assert p.feed(SENT).tls_level == "none"


def test_connection_cache_reuse_by_another_process():
    # Postfix (smtp_session.c) logs "... TLS connection reused to ..." in the process that
    # takes a cached TLS connection; without that line the connection is not a TLS one.
    p = parser()
    p.feed(VERIFIED)
    reused = SENT.replace("[4711]", "[4712]").replace("delay=0.42", "conn_use=2, delay=0.42")
    r = p.feed(reused)
    assert (r.tls_level, r.session_key) == ("none", "")   # cached plain-text connection
    p.feed(VERIFIED.replace("[4711]", "[4713]").replace("established", "reused"))
    r = p.feed(reused.replace("[4712]", "[4713]"))
    # verified, but the TLS-RPT session was the first use's: no second record
    assert (r.tls_level, r.session_key) == ("verified", "")


@pytest.mark.parametrize("lines,reason,level", [
    ([f"{H}[5000]: 5C2D: to=<bob@partner.test>, relay=mx1.partner.test[192.0.2.10]:25, delay=1.1, "
      "delays=0.01/0/1.1/0, dsn=4.7.4, status=deferred (TLS is required, but was not offered by "
      "host mx1.partner.test[192.0.2.10])"], "starttls_not_offered", "none"),
    ([f"{H}[5000]: certificate verification failed for mx1.partner.test[192.0.2.10]:25: "
      "untrusted issuer /C=US/O=Evil/CN=Evil CA",
      f"{H}[5000]: Untrusted TLS connection established to mx1.partner.test[192.0.2.10]:25: "
      "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
      f"{H}[5000]: 5C2D: to=<bob@partner.test>, relay=mx1.partner.test[192.0.2.10]:25, delay=1.1, "
      "delays=0.01/0/1.1/0, dsn=4.7.5, status=deferred (Server certificate not trusted)"],
     "untrusted_cert", "untrusted"),
    ([f"{H}[5000]: Untrusted TLS connection established to mx1.partner.test[192.0.2.10]:25: "
      "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
      f"{H}[5000]: 5C2D: to=<bob@partner.test>, relay=mx1.partner.test[192.0.2.10]:25, delay=1.1, "
      "delays=0.01/0/1.1/0, dsn=4.7.5, status=deferred (Server certificate not verified)"],
     "untrusted_cert", "untrusted"),
    ([f"{H}[5000]: Trusted TLS connection established to mx1.partner.test[192.0.2.10]:25: "
      "TLSv1.2 with cipher ECDHE-RSA-AES256-GCM-SHA384 (256/256 bits)",
      f"{H}[5000]: 5C2D: to=<bob@partner.test>, relay=mx1.partner.test[192.0.2.10]:25, delay=8.4, "
      "delays=0.02/0/8.4/0, dsn=4.7.5, status=deferred (Server certificate not verified)"],
     "name_mismatch", "trusted"),
    ([f"{H}[5000]: 5C2D: to=<bob@partner.test>, relay=mx1.partner.test[192.0.2.10]:25, delay=1, "
      "delays=0/0/1/0, dsn=4.7.5, status=bounced (certificate name mismatch)"],
     "name_mismatch", "none"),
    ([f"{H}[5000]: SSL_connect error to mx1.partner.test[192.0.2.10]:25: -1",
      f"{H}[5000]: 5C2D: to=<bob@partner.test>, relay=mx1.partner.test[192.0.2.10]:25, delay=3634, "
      "delays=3633/0.04/0.37/0, dsn=4.7.5, status=deferred (Cannot start TLS: handshake failure)"],
     "handshake_failed", "none"),
    ([f"{H}[5000]: Verified TLS connection established to mx1.partner.test[192.0.2.10]:25: "
      "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
      f"{H}[5000]: 5C2D: to=<bob@partner.test>, relay=mx1.partner.test[192.0.2.10]:25, delay=1, "
      "delays=0/0/1/0, dsn=4.2.2, status=deferred (host mx1.partner.test[192.0.2.10] said: 452 "
      "4.2.2 Mailbox full (in reply to RCPT TO command))"], "other", "verified"),
])
def test_failures(lines, reason, level):
    p = parser()
    results = [p.feed(line) for line in lines]
    assert results[:-1] == [None] * (len(lines) - 1)
    r = results[-1]
    assert (r.reason, r.tls_level, r.status != "sent") == (reason, level, True)
    assert r.tls_failure == (reason != "other")


def test_untrusted_detail_keeps_certificate_problem():
    p = parser()
    p.feed(f"{H}[5000]: server certificate verification failed for mx1.partner.test[192.0.2.10]:25: "
           "certificate has expired")
    p.feed(f"{H}[5000]: Untrusted TLS connection established to mx1.partner.test[192.0.2.10]:25: "
           "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)")
    r = p.feed(f"{H}[5000]: 5C2D: to=<bob@partner.test>, relay=mx1.partner.test[192.0.2.10]:25, "
               "delay=1, delays=0/0/1/0, dsn=4.7.5, status=deferred (Server certificate not trusted)")
    assert "certificate has expired" in r.detail


def test_prefix_variants_and_ignored_lines():
    p = parser()
    iso = ("2026-11-24T08:25:01.123456+01:00 mail postfix-out/smtp[77]: 1A2B: to=<x@Partner.Test>, "
           "orig_to=<y@alias.test>, relay=mx.partner.test[2001:db8::25]:25, delay=0.1, "
           "delays=0/0/0/0.1, dsn=2.0.0, status=sent (250 ok)")
    r = p.feed(iso)
    assert r.timestamp == datetime(2026, 11, 24, 7, 25, 1, 123456, tzinfo=UTC)
    assert (r.recipient_domain, r.relay_ip) == ("partner.test", "2001:db8::25")
    frac = ("Nov 24 08:25:01.000042 mail postfix/smtp[77]: 1A2C: to=<x@partner.test>, "
            "relay=mx.partner.test[192.0.2.1]:25, delay=0.1, delays=0/0/0/0.1, dsn=2.0.0, status=sent (250 ok)")
    assert p.feed(frac).queue_id == "1A2C"
    lmtp = ("Nov 24 08:25:01 mail postfix/lmtp[78]: 1A2D: to=<x@local.test>, relay=local[private/dovecot-lmtp], "
            "delay=0.1, delays=0/0/0/0.1, dsn=2.0.0, status=sent (250 ok)")
    assert p.feed(lmtp).service == "lmtp"
    for junk in ["Nov 24 08:25:01 mail postfix/smtpd[1]: connect from x[1.2.3.4]",
                 "Nov 24 08:25:01 mail postfix/qmgr[2]: 1A2B: removed", "garbage", "",
                 f"{H}[5000]: 5C2D: to=<b@p.test>, relay=none, delay=1, delays=0/0/1/0, dsn=4.4.1, "
                 "status=expired (x)"]:
        assert p.feed(junk) is None


def test_year_rollover():
    p = MaillogParser(now=lambda: datetime(2027, 1, 1, 0, 5, tzinfo=UTC), tz=UTC)
    r = p.feed(SENT.replace("Nov 24", "Dec 31"))
    assert r.timestamp.year == 2026


# -- session records -----------------------------------------------------------------------------
def test_session_records():
    p = parser()
    p.feed(VERIFIED)
    ok = p.feed(SENT)
    sts = PolicyAnswer("secure", "secure match=.partner.test", "mta-sts", "partner.test",
                       tlsrpt_policy_type="sts", policy_strings=("version: STSv1", "mode: enforce"),
                       mx_patterns=("*.partner.test",))
    rec = session_record(ok, sts)
    assert rec["result"] == "success" and rec["policy_type"] == "sts"
    assert rec["mx_host"] == ["*.partner.test"] and rec["receiving_ip"] == "192.0.2.10"
    p.feed(f"{H}[5000]: Trusted TLS connection established to mx1.partner.test[192.0.2.10]:25: TLSv1.2 "
           "with cipher X (256/256 bits)")
    bad = p.feed(f"{H}[5000]: 5C2D: to=<bob@partner.test>, relay=mx1.partner.test[192.0.2.10]:25, "
                 "delay=1, delays=0/0/1/0, dsn=4.7.5, status=deferred (Server certificate not verified)")
    rec = session_record(bad, None)
    assert (rec["result"], rec["result_type"], rec["policy_type"]) == \
        ("failure", "certificate-host-mismatch", "no-policy-found")
    none_relay = OutboundResult("Q", "p.test", "none", "deferred", "none", "other", ok.timestamp)
    assert session_record(none_relay, None) is None


# -- follower ------------------------------------------------------------------------------------
def line(qid: str, rcpt: str = "alice@partner.test", status: str = "sent") -> str:
    return (f"Nov 24 08:25:01 mail postfix/smtp[4711]: {qid}: to=<{rcpt}>, "
            f"relay=mx1.partner.test[192.0.2.10]:25, delay=0.4, delays=0/0/0.2/0.2, dsn=2.0.0, "
            f"status={status} (250 ok)\n")


class Collector:
    def __init__(self) -> None:
        self.results: list[OutboundResult] = []

    def __call__(self, r: OutboundResult) -> None:
        self.results.append(r)

    @property
    def ids(self) -> list[str]:
        return [r.queue_id for r in self.results]


def follower(tmp_path, sink, **kw) -> MaillogFollower:
    return MaillogFollower(tmp_path / "mail.log", tmp_path / "state.json", sink,
                           start_at="beginning", parser=parser(), **kw)


def append(path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def test_follow_partial_lines_and_dedup(tmp_path):
    log_path = tmp_path / "mail.log"
    sink = Collector()
    f = follower(tmp_path, sink)
    assert f.poll_once() == 0  # no file yet
    append(log_path, VERIFIED + "\n" + line("A1"))
    partial = line("A2")
    append(log_path, partial[:40])  # half a line: not consumed yet
    assert f.poll_once() == 2 and sink.ids == ["A1"]
    assert sink.results[0].tls_level == "verified"
    append(log_path, partial[40:])
    f.poll_once()
    assert sink.ids == ["A1", "A2"]
    append(log_path, line("A1"))  # the same (queue id, recipient, status) again
    append(log_path, line("A1", rcpt="carol@partner.test"))
    append(log_path, line("A1", status="deferred"))
    f.poll_once()
    assert [(r.queue_id, r.recipient, r.status) for r in sink.results[2:]] == [
        ("A1", "carol@partner.test", "sent"), ("A1", "alice@partner.test", "deferred")]
    f.close()


def test_restart_resumes_without_double_counting(tmp_path):
    log_path = tmp_path / "mail.log"
    sink = Collector()
    f = follower(tmp_path, sink)
    append(log_path, line("B1") + line("B2"))
    f.poll_once()
    f.close()
    append(log_path, line("B3"))
    f2 = follower(tmp_path, sink)  # "restart": new object, same state file
    f2.poll_once()
    assert sink.ids == ["B1", "B2", "B3"]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["offset"] == log_path.stat().st_size and state["inode"] == log_path.stat().st_ino
    f2.close()


def test_restart_with_lost_offset_is_deduplicated_by_saved_keys(tmp_path):
    log_path = tmp_path / "mail.log"
    sink = Collector()
    f = follower(tmp_path, sink)
    append(log_path, line("C1") + line("C2"))
    f.poll_once()
    f.close()
    state_path = tmp_path / "state.json"
    st = json.loads(state_path.read_text())
    st["offset"] = 0  # as if the state save after the callbacks had been lost
    state_path.write_text(json.dumps(st))
    f2 = follower(tmp_path, sink)
    f2.poll_once()
    assert sink.ids == ["C1", "C2"]
    f2.close()


def test_rotation_while_running(tmp_path):
    log_path = tmp_path / "mail.log"
    sink = Collector()
    f = follower(tmp_path, sink)
    append(log_path, line("D1"))
    f.poll_once()
    append(log_path, line("D2"))          # written before rotation, not yet read
    os.rename(log_path, tmp_path / "mail.log.1")
    f.poll_once()                         # file gone: keeps reading the old one
    append(tmp_path / "mail.log.1", line("D3"))
    append(log_path, line("D4"))          # new file
    f.poll_once()
    assert sink.ids == ["D1", "D2", "D3", "D4"]
    append(log_path, line("D5"))
    f.poll_once()
    assert sink.ids[-1] == "D5" and len(sink.ids) == 5
    f.close()


def test_rotation_while_stopped(tmp_path):
    log_path = tmp_path / "mail.log"
    sink = Collector()
    f = follower(tmp_path, sink)
    append(log_path, line("E1"))
    f.poll_once()
    f.close()
    append(log_path, line("E2"))
    os.rename(log_path, tmp_path / "mail.log.1")
    append(log_path, line("E3"))
    f2 = follower(tmp_path, sink)
    f2.poll_once()
    assert sink.ids == ["E1", "E2", "E3"]
    f2.close()


def test_truncation(tmp_path):
    log_path = tmp_path / "mail.log"
    sink = Collector()
    f = follower(tmp_path, sink)
    append(log_path, line("F1") + line("F2"))
    f.poll_once()
    with open(log_path, "w", encoding="utf-8") as fh:  # copytruncate
        fh.write(line("F3"))
    f.poll_once()
    assert sink.ids == ["F1", "F2", "F3"]
    f.close()


def test_start_at_end_skips_history(tmp_path):
    log_path = tmp_path / "mail.log"
    append(log_path, line("G1"))
    sink = Collector()
    f = MaillogFollower(log_path, tmp_path / "state.json", sink, parser=parser())
    f.poll_once()
    append(log_path, line("G2"))
    f.poll_once()
    assert sink.ids == ["G2"]
    f.close()


def test_callback_errors_do_not_stop_following(tmp_path):
    log_path = tmp_path / "mail.log"
    seen = []

    def flaky(r):
        seen.append(r.queue_id)
        if r.queue_id == "H1":
            raise RuntimeError("boom")
    f = MaillogFollower(log_path, tmp_path / "state.json", flaky, start_at="beginning",
                        parser=parser())
    append(log_path, line("H1") + line("H2"))
    f.poll_once()
    assert seen == ["H1", "H2"]
    f.close()


def test_sessions_file_and_thread(tmp_path):
    log_path = tmp_path / "mail.log"
    sessions = tmp_path / "sessions.jsonl"
    sink = Collector()
    answer = PolicyAnswer("dane-only", "dane-only", "dane", "partner.test",
                          tlsrpt_policy_type="tlsa", policy_strings=("3 1 1 ab",),
                          mx_patterns=("mx1.partner.test",))
    f = follower(tmp_path, sink, sessions_file=sessions, policy_lookup=lambda d: answer)
    # two delivery requests, each its own TLS connection (an identical TLS line: same second)
    append(log_path, VERIFIED + "\n" + line("J1") + VERIFIED + "\n" + line("J2", status="deferred"))
    handle = f.start_in_thread(poll_interval=0.02)
    try:
        with contextlib.suppress(AssertionError):   # asserted below, after the stop
            wait_until(lambda: len(sink.results) >= 2, 5, "two results", interval=0.02)
    finally:
        handle.stop()
    assert sink.ids == ["J1", "J2"] and not handle.thread.is_alive()
    recs = [json.loads(x) for x in sessions.read_text().splitlines()]
    assert [r["queue_id"] for r in recs] == ["J1", "J2"]
    assert recs[0]["policy_type"] == "tlsa" and recs[0]["result"] == "success"


def test_real_postfix_37_hostname_mismatch_is_name_mismatch():
    # Captured from the private Postfix 3.7 of tests/test_postfix_outbound.py.
    p = parser()
    lines = [
        "Nov 24 08:45:13 mx postfix/smtp[24818]: server certificate verification failed for "
        "wrongname.test[127.0.71.2]:25: num=62:hostname mismatch",
        "Nov 24 08:45:13 mx postfix/smtp[24818]: Untrusted TLS connection established to "
        "wrongname.test[127.0.71.2]:25: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
        "Nov 24 08:45:13 mx postfix/smtp[24818]: 0FF642105A2: to=<bob@wrongname.test>, "
        "relay=wrongname.test[127.0.71.2]:25, delay=0.01, delays=0/0/0/0, dsn=4.7.5, "
        "status=deferred (Server certificate not verified)",
    ]
    results = [r for r in (p.feed(l) for l in lines) if r is not None]
    assert [(r.reason, r.status, r.recipient_domain) for r in results] == [
        ("name_mismatch", "deferred", "wrongname.test")]


def test_outbound_reasons_are_one_closed_set():
    """The metric label values are public: the set, its spelling and its typing agree."""
    from typing import get_args

    from milterd.policy import reasons

    assert reasons.OUTBOUND_TLS_FAILURES == ("starttls_not_offered", "untrusted_cert",
                                             "name_mismatch", "handshake_failed")
    assert reasons.OUTBOUND_ALL == reasons.OUTBOUND_TLS_FAILURES + ("other",)
    assert get_args(reasons.OutboundReason) == reasons.OUTBOUND_ALL
    assert set(reasons.OUTBOUND_DESCRIPTIONS) == set(reasons.OUTBOUND_ALL)
