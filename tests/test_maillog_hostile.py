"""The maillog follower believes only Postfix's own words (#16 item 5): generated hostile
recipients and remote replies, sessions vs recipients, exactly-once records across crashes,
the per-process TLS view across restarts, new files, copytruncate with regrowth."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timedelta, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milterd.outbound.maillog_follower import MaillogFollower
from milterd.outbound.maillog_parser import MaillogParser
from milterd.outbound.tlsrpt import build_report, load_sessions, session_record

UTC = timezone.utc
T0 = datetime(2026, 11, 24, 8, 25, 1, tzinfo=UTC)


def parser() -> MaillogParser:
    return MaillogParser(now=lambda: datetime(2026, 11, 24, 12, 0, tzinfo=UTC), tz=UTC)


def stamp(t: datetime) -> str:
    return t.strftime("%b %d %H:%M:%S")


def quote_822_local(addr: str) -> str:
    """Postfix's quote_822_local (external form for info logging), for the test's lines."""
    local, at, domain = addr.rpartition("@")
    if not at:
        local, domain = addr, ""
    specials = set('()<>@,;:\\"[] ')
    dot = (local and local[0] != "." and local[-1] != "." and ".." not in local
           and not any(c in specials or ord(c) < 32 for c in local))
    if not dot:
        local = '"' + "".join("\\" + c if c in '"\\\r' else c for c in local) + '"'
    return local + (("@" + domain) if at else "")


def tls(pid: int, peer: str, level: str = "Verified", t: datetime = T0, use="established") -> str:
    return (f"{stamp(t)} mail postfix/smtp[{pid}]: {level} TLS connection {use} to {peer}: "
            "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)")


def delivery(pid: int, qid: str, rcpt_internal: str, relay: str, status: str = "sent",
             text: str = "250 2.0.0 Ok", dsn: str = "2.0.0", t: datetime = T0,
             delays: str = "0.01/0/0.2/0.2") -> str:
    return (f"{stamp(t)} mail postfix/smtp[{pid}]: {qid}: to=<{quote_822_local(rcpt_internal)}>, "
            f"relay={relay}, delay=0.4, delays={delays}, dsn={dsn}, status={status} ({text})")


PARTNER_MX = "mx.woodgrovebank.test[192.0.2.10]:25"
OTHER_MX = "mx.other.example[192.0.2.20]:25"

# Text Postfix writes when it delivers or fails, and TLS words: what a forger would echo.
FORGERY = st.sampled_from([
    f">, relay={PARTNER_MX}, delay=1, delays=0/0/0/0, dsn=2.0.0, status=sent (x",
    f"x@woodgrovebank.test>, relay={PARTNER_MX}, conn_use=2, delay=1, delays=0/0/0/0, "
    "dsn=4.7.5, status=deferred (Server certificate not verified",
    "Server certificate not trusted", "Server certificate not verified",
    "Cannot start TLS: handshake failure", "ssl_connect", "SSL_connect error to "
    f"{PARTNER_MX}: -1", "certificate has expired", "TLS is required, but was not offered by host "
    "mx.woodgrovebank.test[192.0.2.10]", f"Verified TLS connection established to {PARTNER_MX}",
    "certificate verification failed for mx.other.example[192.0.2.20]:25: certificate has expired",
    "@woodgrovebank.test", ">", "\"", "\\", ", ", ")", "(", "woodgrovebank.test", "num=62:"])
HOSTILE = st.lists(st.one_of(FORGERY, st.text(alphabet=st.characters(
    blacklist_categories=("Cs", "Cc")), max_size=12)), min_size=1, max_size=6).map("".join)


def assert_only_other_example(results, recs):
    for r in results:
        assert r.recipient_domain == "other.example", r
        assert r.relay == OTHER_MX
    for rec in recs:
        assert rec["policy_domain"] == "other.example"
        assert rec["receiving_mx_hostname"] == "mx.other.example"


@settings(max_examples=300, deadline=None)
@given(local=HOSTILE, reply=HOSTILE, level=st.sampled_from(["Verified", "Untrusted", "Trusted"]),
       status=st.sampled_from([("sent", "2.0.0"), ("deferred", "4.7.5"), ("bounced", "5.7.1")]))
def test_hostile_recipient_and_reply_change_no_attribution(local, reply, level, status):
    """A real Verified session to the partner's MX nearby; a hostile recipient at other.example
    and a remote reply full of TLS words: nothing is attributed to the partner, and the TLS
    outcome is the one of other.example's own TLS line, never from the reply."""
    p = parser()
    p.feed(tls(100, PARTNER_MX))
    partner = p.feed(delivery(100, "AAA1", "bob@woodgrovebank.test", PARTNER_MX))
    p.feed(tls(200, OTHER_MX, level))
    text = f"host mx.other.example[192.0.2.20] said: 550 5.7.1 {reply} (in reply to RCPT TO command)"
    st_, dsn = status
    line = delivery(200, "BBB2", f"{local}@other.example", OTHER_MX, st_,
                    text if st_ != "sent" else f"250 {reply}", dsn)
    r = p.feed(line)
    assert partner.recipient_domain == "woodgrovebank.test"
    if r is None:     # refused as ambiguous: fail closed, nothing attributed at all
        assert p.refused
        return
    assert_only_other_example([r], [x for x in [session_record(r, None)] if x])
    assert r.tls_level == level.lower()
    assert not r.tls_failure        # a remote reply is never a TLS failure
    assert r.recipient == quote_822_local(f"{local}@other.example")
    rec = session_record(r, None)
    if rec is not None:
        assert rec["result"] == "success" and rec["failure_reason_code"] is None


@settings(max_examples=200, deadline=None)
@given(cn=HOSTILE)
def test_issuer_name_does_not_steer_the_failure_type(cn):
    p = parser()
    p.feed(f"{stamp(T0)} mail postfix/smtp[300]: certificate verification failed for "
           f"{OTHER_MX}: untrusted issuer /O=Evil/CN={cn}")
    p.feed(tls(300, OTHER_MX, "Untrusted"))
    r = p.feed(delivery(300, "CCC3", "bob@other.example", OTHER_MX, "deferred",
                        "Server certificate not verified", "4.7.5"))
    rec = session_record(r, None)
    assert (r.reason, r.cert_error) == ("untrusted_cert", "untrusted_issuer")
    assert rec["result_type"] == "certificate-not-trusted"
    assert rec["failure_reason_code"] == "Server certificate not verified: untrusted issuer"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(locals_=st.lists(HOSTILE, min_size=1, max_size=4))
def test_follower_hostile_recipients_counts_and_records(tmp_path_factory, locals_):
    d = tmp_path_factory.mktemp("hostile")
    lines = [tls(100, PARTNER_MX), delivery(100, "AAA1", "bob@woodgrovebank.test", PARTNER_MX),
             tls(200, OTHER_MX)]
    lines += [delivery(200, "BBB2", f"{loc}@other.example", OTHER_MX) for loc in locals_]
    (d / "mail.log").write_text("\n".join(lines) + "\n")
    got = []
    f = MaillogFollower(d / "mail.log", d / "state.json", got.append, start_at="beginning",
                        sessions_file=d / "s.jsonl", parser=parser())
    f.poll_once()
    f.close()
    recs = load_sessions(d / "s.jsonl")
    partner = [r for r in got if r.recipient_domain == "woodgrovebank.test"]
    assert len(partner) == 1 and partner[0].recipient == "bob@woodgrovebank.test"
    assert_only_other_example([r for r in got if r not in partner],
                              [r for r in recs if r["policy_domain"] != "woodgrovebank.test"])
    assert [r["policy_domain"] for r in recs] == ["woodgrovebank.test", "other.example"]
    assert all(r["result"] == "success" for r in recs)


def test_issue_example_fake_relay_in_recipient():
    """The exact line of issue #16 (captured from a real Postfix 3.7)."""
    p = parser()
    p.feed(tls(2092, "other.example[127.0.72.1]:25"))
    r = p.feed(f"{stamp(T0)} mx postfix/smtp[2092]: 8A88B2162D3: to=<\"x@woodgrovebank.test>, "
               "relay=mx.woodgrovebank.test[127.0.72.1]:25, delay=1, delays=0/0/0/0, dsn=2.0.0, "
               "status=sent (x\"@other.example>, relay=other.example[127.0.72.1]:25, delay=0.11, "
               "delays=0/0.02/0.08/0.01, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as A38E6)")
    assert (r.recipient_domain, r.relay, r.tls_level) == (
        "other.example", "other.example[127.0.72.1]:25", "verified")


def test_remote_reply_with_tls_words_is_not_a_tls_failure():
    p = parser()
    p.feed(tls(2094, "hostile.test[127.0.72.2]:25"))
    for rcpt, st_, dsn, code in [('"Server certificate not trusted"@hostile.test', "bounced",
                                  "5.7.1", "550 5.7.1"),
                                 ("ssl_connect@hostile.test", "bounced", "5.7.1", "550 5.7.1"),
                                 ("temp@hostile.test", "deferred", "4.7.5", "452 4.7.5")]:
        r = p.feed(f"{stamp(T0)} mx postfix/smtp[2094]: 8B50D: to=<{rcpt}>, "
                   f"relay=hostile.test[127.0.72.2]:25, delay=0.05, delays=0.01/0.02/0.01/0.02, "
                   f"dsn={dsn}, status={st_} (host hostile.test[127.0.72.2] said: {code} Server "
                   "certificate not trusted; SSL_connect error; certificate has expired; TLS is "
                   "required, but was not offered by host hostile.test[127.0.72.2] "
                   "(in reply to RCPT TO command))")
        assert (r.reason, r.tls_level, r.tls_failure) == ("other", "verified", False)


def test_one_session_three_recipients_is_one_record(tmp_path):
    lines = [tls(2091, PARTNER_MX)] + [
        delivery(2091, "879F5", f"{u}@woodgrovebank.test", PARTNER_MX) for u in "abc"]
    # the next delivery request of the same process: a new connection, a new session
    lines += [tls(2091, PARTNER_MX), delivery(2091, "97AB1", "d@woodgrovebank.test", PARTNER_MX)]
    (tmp_path / "mail.log").write_text("\n".join(lines) + "\n")
    got = []
    f = MaillogFollower(tmp_path / "mail.log", tmp_path / "st", got.append, start_at="beginning",
                        sessions_file=tmp_path / "s.jsonl", parser=parser())
    f.poll_once()
    f.close()
    assert len(got) == 4
    recs = load_sessions(tmp_path / "s.jsonl")
    assert [r["queue_id"] for r in recs] == ["879F5", "97AB1"]
    rep = build_report(recs, "2026-11-24", "O", "c", "id")
    assert rep["policies"][0]["summary"]["total-successful-session-count"] == 2


def test_slow_delivery_long_after_tls_line_and_across_restart(tmp_path):
    """A large message on a slow link: the delivery line 2 h after the TLS line, with a
    follower restart between the two, is still the verified session."""
    log_path = tmp_path / "mail.log"
    log_path.write_text(tls(4711, PARTNER_MX) + "\n")
    got = []
    f = MaillogFollower(log_path, tmp_path / "st", got.append, start_at="beginning",
                        sessions_file=tmp_path / "s.jsonl", parser=parser())
    f.poll_once()
    f.close()
    later = T0 + timedelta(hours=2)
    with open(log_path, "a") as fh:
        fh.write(delivery(4711, "BIG1", "bob@woodgrovebank.test", PARTNER_MX, t=later,
                          delays="0.01/0/0.2/7200") + "\n")
    f = MaillogFollower(log_path, tmp_path / "st", got.append, start_at="beginning",
                        sessions_file=tmp_path / "s.jsonl", parser=parser())
    f.poll_once()
    f.close()
    assert [(r.queue_id, r.tls_level) for r in got] == [("BIG1", "verified")]
    (rec,) = load_sessions(tmp_path / "s.jsonl")
    assert rec["result"] == "success" and rec["result_type"] is None


def test_many_processes_bounded_by_count_not_age():
    p = MaillogParser(now=lambda: datetime(2026, 11, 24, 12, 0, tzinfo=UTC), tz=UTC, max_procs=50)
    p.feed(tls(1, PARTNER_MX))
    for pid in range(2, 50):   # 48 other processes: process 1 is still remembered
        p.feed(tls(pid, OTHER_MX))
    r = p.feed(delivery(1, "Q1", "a@woodgrovebank.test", PARTNER_MX, t=T0 + timedelta(days=1)))
    assert r.tls_level == "verified"
    for pid in range(100, 160):  # more than max_procs: the least recently active go
        p.feed(tls(pid, OTHER_MX))
    assert len(p.snapshot()["procs"]) == 50


def test_unknown_process_after_skipped_history_is_not_a_starttls_failure(tmp_path):
    """start_at=end skips a TLS line; the delivery line after it is in doubt: no TLS-RPT record
    (no false starttls-not-supported) and not counted as secured."""
    log_path = tmp_path / "mail.log"
    now = datetime.now(UTC).replace(microsecond=0)
    log_path.write_text(tls(7, PARTNER_MX, t=now - timedelta(seconds=30)) + "\n")
    got = []
    f = MaillogFollower(log_path, tmp_path / "st", got.append, sessions_file=tmp_path / "s.jsonl",
                        parser=MaillogParser(tz=UTC))
    f.poll_once()
    with open(log_path, "a") as fh:
        fh.write(delivery(7, "Q7", "a@woodgrovebank.test", PARTNER_MX, t=now + timedelta(seconds=5),
                          delays="0/0/0.5/40") + "\n")
        # a process that connects after the start, in clear: a real plain-text session
        fh.write(delivery(8, "Q8", "b@woodgrovebank.test", PARTNER_MX,
                          t=now + timedelta(seconds=9), delays="0/0/0.5/1") + "\n")
    f.poll_once()
    f.close()
    assert [(r.queue_id, r.tls_level) for r in got] == [("Q7", "none"), ("Q8", "none")]
    assert [(r["queue_id"], r["result_type"]) for r in load_sessions(tmp_path / "s.jsonl")] == [
        ("Q8", "starttls-not-supported")]


# -- follower: files, crashes ---------------------------------------------------------------------
def sent(qid: str, pid: int = 4711, rcpt: str = "alice@woodgrovebank.test") -> str:
    return tls(pid, PARTNER_MX) + "\n" + delivery(pid, qid, rcpt, PARTNER_MX) + "\n"


def mk(tmp_path, got, **kw):
    kw.setdefault("parser", parser())
    return MaillogFollower(tmp_path / "mail.log", tmp_path / "state.json", got.append,
                           sessions_file=tmp_path / "s.jsonl", **kw)


def test_file_absent_at_start_is_read_from_its_first_byte(tmp_path):
    got = []
    f = mk(tmp_path, got)          # start_at="end" (the daemon's default)
    assert f.poll_once() == 0
    (tmp_path / "mail.log").write_text(sent("N1") + sent("N2", pid=4712))
    f.poll_once()
    assert [r.queue_id for r in got] == ["N1", "N2"]
    assert [r["queue_id"] for r in load_sessions(tmp_path / "s.jsonl")] == ["N1", "N2"]
    f.close()


def test_crash_after_append_before_state_save_writes_no_record_twice(tmp_path):
    log_path = tmp_path / "mail.log"
    log_path.write_text(sent("K1"))
    got = []
    f = mk(tmp_path, got, start_at="beginning")
    f.poll_once()
    f.close()
    saved = (tmp_path / "state.json").read_bytes()
    with open(log_path, "a") as fh:
        fh.write(sent("K2", pid=4712) + sent("K3", pid=4713))
    f = mk(tmp_path, got)
    f.poll_once()                  # appends K2, K3 and saves
    f.close()
    (tmp_path / "state.json").write_bytes(saved)   # ... as if it crashed before the save
    with open(tmp_path / "s.jsonl", "a") as fh:
        fh.write('{"ts":"2026-11-24T08:25:01Z","key":"torn')   # and mid-append of a next one
    f = mk(tmp_path, got)
    f.poll_once()
    f.close()
    recs = load_sessions(tmp_path / "s.jsonl")
    assert [r["queue_id"] for r in recs] == ["K1", "K2", "K3"]
    assert (tmp_path / "s.jsonl").read_bytes().endswith(b"\n")
    assert len({r["key"] for r in recs}) == 3


def test_failed_append_is_retried_not_skipped(tmp_path):
    log_path = tmp_path / "mail.log"
    log_path.write_text(sent("W1"))
    got = []
    f = mk(tmp_path, got, start_at="beginning")
    os.mkdir(tmp_path / "s.jsonl")          # cannot append: a directory in the way
    f.poll_once()
    assert not (tmp_path / "s.jsonl").is_file()
    os.rmdir(tmp_path / "s.jsonl")
    f.poll_once()
    f.close()
    assert [r["queue_id"] for r in load_sessions(tmp_path / "s.jsonl")] == ["W1"]
    assert [r.queue_id for r in got] == ["W1"]   # the callback ran once


def test_copytruncate_then_regrowth_past_old_offset_loses_nothing(tmp_path):
    log_path = tmp_path / "mail.log"
    got = []
    f = mk(tmp_path, got, start_at="beginning")
    log_path.write_text(sent("C1"))
    f.poll_once()
    with open(log_path, "a") as fh:
        fh.write(sent("C2", pid=4712))          # written, not yet read
    shutil.copyfile(log_path, tmp_path / "mail.log.1")   # logrotate copytruncate
    with open(log_path, "r+") as fh:
        fh.truncate(0)
    with open(log_path, "a") as fh:              # regrows past the old offset before the poll
        for i in range(3, 9):
            fh.write(sent(f"C{i}", pid=4700 + i))
    assert log_path.stat().st_size > len(sent("C1")) + len(sent("C2", pid=4712))
    f.poll_once()
    f.close()
    assert [r.queue_id for r in got] == [f"C{i}" for i in range(1, 9)]
    assert [r["queue_id"] for r in load_sessions(tmp_path / "s.jsonl")] == [
        f"C{i}" for i in range(1, 9)]


def test_copytruncate_while_stopped(tmp_path):
    log_path = tmp_path / "mail.log"
    got = []
    log_path.write_text(sent("S1"))
    f = mk(tmp_path, got, start_at="beginning")
    f.poll_once()
    f.close()
    with open(log_path, "a") as fh:
        fh.write(sent("S2", pid=4712))
    shutil.copyfile(log_path, tmp_path / "mail.log.1")
    with open(log_path, "w") as fh:
        fh.write(sent("S3", pid=4713) * 1 + sent("S4", pid=4714) + sent("S5", pid=4715))
    f = mk(tmp_path, got)
    f.poll_once()
    f.close()
    assert [r.queue_id for r in got] == ["S1", "S2", "S3", "S4", "S5"]


def test_state_format(tmp_path):
    log_path = tmp_path / "mail.log"
    got = []
    log_path.write_text(sent("F1"))
    f = mk(tmp_path, got, start_at="beginning")
    f.poll_once()
    f.close()
    st_ = json.loads((tmp_path / "state.json").read_text())
    assert st_["version"] == 2 and st_["offset"] == log_path.stat().st_size
    assert set(st_) >= {"dev", "inode", "offset", "head", "tail", "recent", "records",
                        "parser", "sessions"}
    assert st_["sessions"]["size"] == (tmp_path / "s.jsonl").stat().st_size
    (proc,) = st_["parser"]["procs"]
    assert proc[0] == "postfix/smtp[4711]" and proc[1]["level"] == "verified"
