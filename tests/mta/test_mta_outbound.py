"""Outbound relay with per-domain TLS policy: two MTA instances on loopback."""

from __future__ import annotations

import pytest

from mta_helpers import OutboundEvents, maildir_messages, send_one
from milterd.lab.wait import wait_until
from mta_fixtures import (  # noqa: F401 - pytest fixtures, used by name
    allow_warnings, make_mta, no_unexpected_warnings, pki)

WG = "woodgrovebank.test"


def _pair(make_mta, pki, receiver_cert, *, secure: bool = True):  # type: ignore[no-untyped-def]
    if receiver_cert == "none":
        kw = {"tls_cert": None, "tls_key": None}
    else:
        kw = {"cert": getattr(pki, receiver_cert)}
    receiver = make_mta("receiver", hostname="mx.%s" % WG, local_domains=(WG,), **kw)
    events = OutboundEvents([])
    sender = make_mta("sender", routes={WG: ("127.0.0.1", receiver.port)},
                      send_domains=(WG,) if secure else (), on_outbound_result=events)
    return sender, receiver, events


def _submit(sender) -> None:  # type: ignore[no-untyped-def]
    conv, replies = send_one(sender.port, "carol@contoso.test", ["dave@%s" % WG])
    conv.close()
    assert replies[-1][0] == 250, replies


def test_good_certificate_is_delivered_and_counted_secured(make_mta, pki):
    sender, receiver, events = _pair(make_mta, pki, "woodgrove_server")
    _submit(sender)
    (raw,) = wait_until(lambda: maildir_messages(receiver.cfg.maildir_root, "dave@%s" % WG),
                      what="relay")
    assert events.events == [(WG, True, "secured")]
    assert sender.mta.delivery.stats.secured_sent == {WG: 1}
    assert b"by mx.woodgrovebank.test (milterd-mta) with ESMTPS" in raw
    assert b"verify=OK" in raw  # the receiver verified our (sender's) certificate
    wait_until(lambda: len(sender.mta.queue) == 0, what="queue to drain")
    log = sender.cfg.protocol_log.read_text()
    assert ",Send," in log and ",>,STARTTLS," in log
    assert '"CN=mx.woodgrovebank.test, O=Lab",Certificate subject' in log
    assert "message content" in log and "Hello Bob" not in log


@pytest.mark.parametrize("receiver_cert, reason", [
    ("wrongname_server", "name_mismatch"),
    ("untrusted_server", "untrusted_cert"),
    ("none", "starttls_not_offered"),
])
def test_failure_defers_and_never_sends_in_clear(make_mta, pki, receiver_cert, reason):
    sender, receiver, events = _pair(make_mta, pki, receiver_cert)
    _submit(sender)
    wait_until(lambda: events.events, what="an outbound attempt")
    assert events.events[0] == (WG, False, reason)
    assert sender.mta.delivery.stats.outbound_failures[(WG, reason)] >= 1
    # still queued, with the reason recorded, and retried (bounded backoff)
    qid = next(iter(sender.mta.queue.ids()))
    meta = wait_until(lambda: (lambda m: m if m.attempts >= 1 else None)(
        sender.mta.queue.load(qid)[0]), what="the queue file update")
    assert reason in meta.last_error
    wait_until(lambda: len(events.events) >= 2, what="a retry")
    assert all(e == (WG, False, reason) for e in events.events)
    # the receiver never saw a transaction
    assert receiver.mta.stats.accepted == 0
    assert maildir_messages(receiver.cfg.maildir_root, "dave@%s" % WG) == []
    rlog = receiver.cfg.protocol_log.read_text()
    assert ",<,MAIL" not in rlog and ",<,DATA" not in rlog


def test_opportunistic_tls_for_other_domains(make_mta, pki):
    sender, receiver, events = _pair(make_mta, pki, "wrongname_server", secure=False)
    _submit(sender)
    wait_until(lambda: maildir_messages(receiver.cfg.maildir_root, "dave@%s" % WG), what="relay")
    assert events.events == [(WG, True, "tls")]
    assert sender.mta.delivery.stats.secured_sent == {}


def test_opportunistic_plaintext_when_no_starttls(make_mta, pki):
    sender, receiver, events = _pair(make_mta, pki, "none", secure=False)
    _submit(sender)
    wait_until(lambda: maildir_messages(receiver.cfg.maildir_root, "dave@%s" % WG), what="relay")
    assert events.events == [(WG, True, "plaintext")]


def test_retries_are_bounded(make_mta, pki, allow_warnings):
    receiver = make_mta("receiver", hostname="mx.%s" % WG, local_domains=(WG,),
                        tls_cert=None, tls_key=None)
    events = OutboundEvents([])
    sender = make_mta("sender", routes={WG: ("127.0.0.1", receiver.port)}, send_domains=(WG,),
                      on_outbound_result=events, max_attempts=2, retry_base=0.05)
    _submit(sender)
    wait_until(lambda: len(sender.mta.queue) == 0 and any(sender.mta.queue.failed.iterdir()),
             what="give-up")
    assert len(events.events) == 2


def test_a_failure_that_is_not_tls_is_other_with_its_cause_kept(make_mta):
    """Outbound reasons are milterd's closed set: a refused connection is ``other`` (not a TLS
    failure), and the cause stays in the queue file."""
    from milterd.lab.net import free_port

    events = OutboundEvents([])
    sender = make_mta("sender", routes={WG: ("127.0.0.1", free_port())}, send_domains=(WG,),
                      on_outbound_result=events)
    _submit(sender)
    wait_until(lambda: events.events, what="an outbound attempt")
    assert events.events[0] == (WG, False, "other")
    assert sender.mta.delivery.stats.outbound_failures[(WG, "other")] >= 1
    qid = next(iter(sender.mta.queue.ids()))
    meta = wait_until(lambda: (lambda m: m if m.attempts >= 1 else None)(
        sender.mta.queue.load(qid)[0]), what="the queue file update")
    assert "%s: other (connect)" % WG in meta.last_error
