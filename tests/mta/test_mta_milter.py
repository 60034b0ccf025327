"""The reference MTA against a real pymilter milter (subprocess, unix socket)."""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import compat32

from mta_helpers import MESSAGE, converse, maildir_messages, send_one
from milterd.lab.wait import wait_until
from mta_fixtures import (  # noqa: F401 - pytest fixtures, used by name
    allow_warnings, make_mta, milter, no_unexpected_warnings, pki, short_dir, symlist_milter)


def _parse(raw: bytes):  # type: ignore[no-untyped-def]
    return BytesParser(policy=compat32).parsebytes(raw)


def test_milter_rejects_sender_with_its_own_reply(make_mta, milter):
    mta = make_mta(milter=milter.spec)
    conv, replies = send_one(mta.port, "reject@woodgrovebank.test", ["bob@contoso.test"])
    try:
        code, text = replies[0]
        assert code == 550
        assert text == b"5.7.1 Sender <reject@woodgrovebank.test> rejected by test milter"
        # the connection stays usable: the next sender is accepted
        assert conv.cmd("MAIL FROM:<ok@woodgrovebank.test>")[0] == 250
    finally:
        conv.close()
    assert mta.mta.stats.rejected == 1
    assert len(mta.mta.queue) == 0


def test_milter_tempfail_sender(make_mta, milter):
    mta = make_mta(milter=milter.spec)
    conv, replies = send_one(mta.port, "tempfail@woodgrovebank.test", ["bob@contoso.test"])
    conv.close()
    assert replies[0] == (451, b"4.7.1 Try again later, says the test milter")


def test_milter_rejects_one_recipient_only(make_mta, milter):
    mta = make_mta(milter=milter.spec)
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test",
                             ["norcpt@contoso.test", "bob@contoso.test"])
    conv.close()
    assert replies[1] == (550, b"5.1.1 No such user here")
    assert replies[2][0] == 250 and replies[3][0] == 250
    wait_until(lambda: maildir_messages(mta.cfg.maildir_root, "bob@contoso.test"), what="delivery")
    assert maildir_messages(mta.cfg.maildir_root, "norcpt@contoso.test") == []


def test_header_changes_are_applied_to_the_delivered_message(make_mta, milter):
    mta = make_mta(milter=milter.spec)
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test", ["bob@contoso.test"])
    port = conv.client_port
    conv.close()
    assert replies[-1][0] == 250 and b"queued as" in replies[-1][1]
    (raw,) = wait_until(lambda: maildir_messages(mta.cfg.maildir_root, "bob@contoso.test"),
                      what="delivery")
    msg = _parse(raw)
    names = [k for k, _ in msg.items()]
    # X-Test-Top was inserted at index 0: above our Received, as with Postfix
    assert names[:2] == ["X-Test-Top", "Received"]
    assert msg["X-Test-Added"] == "yes" and names[-1] == "X-Test-Added"
    assert msg["Subject"] == "changed by milter"
    assert "X-Delete-Me" not in msg
    assert msg["X-Folded"] == "first\r\n\tsecond"
    assert msg.get_payload() == "Hello Bob.\r\n.leading dot\r\n"
    received = msg["Received"]
    assert "by mx.contoso.test (milterd-mta) with ESMTP id" in received
    # what the milter saw: the client's headers (not our Received), body skipped
    eom = [e for e in milter.events(port) if e["stage"] == "eom"]
    assert len(eom) == 1
    assert [h[0] for h in eom[0]["headers"]] == ["From", "To", "Subject", "X-Delete-Me",
                                                 "X-Folded"]
    assert eom[0]["macros"]["i"] in replies[-1][1].decode()


def test_connect_and_helo_macros(make_mta, milter):
    mta = make_mta(milter=milter.spec)
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test", ["bob@contoso.test"])
    port = conv.client_port
    conv.close()
    events = milter.events(port)
    connect = next(e for e in events if e["stage"] == "connect")
    assert connect["hostname"] == "[127.0.0.1]"
    assert connect["hostaddr"] == ["127.0.0.1", port]
    macros = connect["macros"]
    assert macros["j"] == "mx.contoso.test"
    assert macros["{client_addr}"] == "127.0.0.1"
    assert macros["{daemon_name}"] == "milterd-mta"
    mail = next(e for e in events if e["stage"] == "mail")
    assert mail["sender"] == "<alice@woodgrovebank.test>"
    assert mail["macros"]["i"] and mail["macros"]["{mail_addr}"] == "alice@woodgrovebank.test"
    rcpt = next(e for e in events if e["stage"] == "rcpt")
    assert rcpt["macros"]["{rcpt_addr}"] == "bob@contoso.test"


def test_milter_symbol_list_is_respected(make_mta, symlist_milter):
    mta = make_mta(milter=symlist_milter.spec)
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test", ["bob@contoso.test"])
    port = conv.client_port
    conv.close()
    mail = next(e for e in symlist_milter.events(port) if e["stage"] == "mail")
    # the milter asked for "{verify} {cert_fp}" at MAIL: no queue id, no mail_addr
    assert "i" not in mail["macros"]
    assert "{mail_addr}" not in mail["macros"]
    # connect-stage macros still come from the default list
    assert mail["macros"]["{client_addr}"] == "127.0.0.1"


def test_milter_down_tempfails_and_delivers_nothing(make_mta, short_dir, allow_warnings):
    mta = make_mta(milter="unix:%s" % (short_dir / "nobody-listens.sock"))
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test", ["bob@contoso.test"])
    conv.close()
    assert replies == [(451, b"4.7.1 Service unavailable - try again later")]
    assert len(mta.mta.queue) == 0
    assert maildir_messages(mta.cfg.maildir_root, "bob@contoso.test") == []


def test_milter_down_with_default_accept_delivers(make_mta, allow_warnings):
    mta = make_mta(milter="inet:1@127.0.0.1", milter_default_action="accept")
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test", ["bob@contoso.test"])
    conv.close()
    assert replies[-1][0] == 250
    (raw,) = wait_until(lambda: maildir_messages(mta.cfg.maildir_root, "bob@contoso.test"),
                      what="delivery")
    assert b"Subject: original subject" in raw


def test_relay_is_refused_for_unknown_domains(make_mta, milter):
    mta = make_mta(milter=milter.spec)
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test", ["eve@elsewhere.test"])
    conv.close()
    assert replies[1] == (554, b"5.7.1 <eve@elsewhere.test>: Relay access denied")


def test_rset_sends_abort_to_the_milter(make_mta, milter):
    mta = make_mta(milter=milter.spec)
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test", [])
    port = conv.client_port
    assert conv.cmd("RSET")[0] == 250
    conv.close()
    stages = [e["stage"] for e in milter.events()]
    assert "abort" in stages
    del port


def test_message_without_milter_is_delivered_with_received(make_mta):
    mta = make_mta()
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test", ["bob@contoso.test"])
    conv.close()
    (raw,) = wait_until(lambda: maildir_messages(mta.cfg.maildir_root, "bob@contoso.test"),
                      what="delivery")
    assert raw.startswith(b"Received: from client.woodgrovebank.test ([127.0.0.1])")
    assert raw.endswith(MESSAGE.split(b"\r\n\r\n", 1)[1])


def test_milter_discard_answers_250_and_delivers_nothing(make_mta, milter):
    mta = make_mta(milter=milter.spec)
    conv, replies = send_one(mta.port, "discard@woodgrovebank.test", ["bob@contoso.test"])
    conv.close()
    assert replies[-1][0] == 250
    assert mta.mta.stats.discarded == 1 and len(mta.mta.queue) == 0
    assert maildir_messages(mta.cfg.maildir_root, "bob@contoso.test") == []


def test_milter_quarantine_is_recorded(make_mta, milter):
    mta = make_mta(milter=milter.spec)
    conv, replies = send_one(mta.port, "quarantine@woodgrovebank.test", ["bob@contoso.test"])
    conv.close()
    qid = replies[-1][1].decode().rsplit(" ", 1)[1]
    assert mta.mta.stats.quarantined == [(qid, "test quarantine")]


def test_internal_error_is_451_without_exception_text(make_mta, allow_warnings):
    import shutil

    mta = make_mta()
    tmp = mta.cfg.queue_dir / "tmp"
    shutil.rmtree(tmp)
    tmp.write_text("not a directory")  # the queue write now fails
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test", ["bob@contoso.test"])
    conv.close()
    assert replies[-1] == (451, b"4.3.0 Error: internal error, try again later")
    assert maildir_messages(mta.cfg.maildir_root, "bob@contoso.test") == []


def test_ready_file_announces_the_port(make_mta, tmp_path):
    ready = tmp_path / "ready"
    mta = make_mta(ready_file=ready)
    assert ready.read_text() == "%d\n" % mta.port


def test_two_messages_in_one_session_both_get_milter_edits(make_mta, milter):
    mta = make_mta(milter=milter.spec)
    conv, replies = send_one(mta.port, "alice@woodgrovebank.test", ["bob@contoso.test"])
    try:
        assert replies[-1][0] == 250
        assert conv.cmd("MAIL FROM:<reject@woodgrovebank.test>")[0] == 550
        assert conv.cmd("MAIL FROM:<alice@woodgrovebank.test>")[0] == 250
        assert conv.cmd("RCPT TO:<bob@contoso.test>")[0] == 250
        assert conv.data(MESSAGE)[0] == 250
    finally:
        conv.close()
    msgs = wait_until(lambda: (lambda m: m if len(m) == 2 else None)(
        maildir_messages(mta.cfg.maildir_root, "bob@contoso.test")), what="two deliveries")
    for raw in msgs:
        assert b"Subject: changed by milter" in raw and b"X-Delete-Me" not in raw


def test_inet_milter_socket(make_mta, short_dir):
    import socket as _socket

    from mta_helpers import start_milter, stop_milter

    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = start_milter(short_dir, "inet", spec="inet:%d@127.0.0.1" % port)
    try:
        mta = make_mta(milter=m.spec)
        conv, replies = send_one(mta.port, "reject@woodgrovebank.test", ["bob@contoso.test"])
        conv.close()
        assert replies[0][0] == 550
    finally:
        stop_milter(m)


def test_help_lists_the_commands(make_mta):
    mta = make_mta()
    conv = converse(mta.port)
    code, text = conv.cmd("HELP")
    conv.close()
    assert code == 250
    assert set(text.decode().split(": ", 1)[1].split()) >= {
        "DATA", "EHLO", "HELO", "MAIL", "NOOP", "QUIT", "RCPT", "RSET", "STARTTLS", "VRFY"}
