"""Verdict composition and the hook contract (every hook documented, with its arguments)."""

from __future__ import annotations

import inspect

from milterd import hookspecs
from milterd.verdict import CONTINUE, Action, compose, reject, tempfail


def test_most_severe_wins_and_first_of_equals():
    r1 = reject("one", reason="a")
    r2 = reject("two", reason="b")
    t = tempfail("t", reason="c")
    assert compose([None, CONTINUE, t, r1, r2]) is r1
    assert compose([t, CONTINUE]) is t
    assert compose([]) is CONTINUE
    assert r1.code == "550" and r1.xcode == "5.7.1" and t.code == "450" and t.xcode == "4.7.1"
    assert reject("multi\r\nline", reason="x").text == "multi line"
    assert Action.REJECT > Action.TEMPFAIL > Action.CONTINUE


def test_every_hook_is_documented_with_its_return_meaning():
    specs = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if name.startswith("milterd_")]
    assert len(specs) >= 8
    for f in specs:
        doc = inspect.getdoc(f) or ""
        assert "Called" in doc and ":return:" in doc, f.__name__
        assert "app" in inspect.signature(f).parameters, f.__name__


def test_every_session_hook_gets_the_session_config():
    specs = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if name.startswith("milterd_")]
    for f in specs:
        params = inspect.signature(f).parameters
        assert "config" in params, f.__name__
    doc = inspect.getdoc(hookspecs) or ""
    assert "``config``" in doc and "never from" in doc and "app.config" in doc


def test_every_hook_is_exercised_by_a_builtin_or_test_plugin():
    # Which hooks the adapter calls, and with which config, is checked by running it:
    # tests/test_adapter_inprocess.py::test_every_hook_is_called_with_the_config_the_session_started_with
    import importlib

    used = set()
    for mod in ("milterd_plugins.domain_security", "milterd_plugins.stamp",
                "milterd_plugins.counters", "milterd_plugins.message_log",
                "testplugins.reject_sender", "testplugins.record_tls", "testplugins.raiser"):
        used |= {n for n in dir(importlib.import_module(mod)) if n.startswith("milterd_")}
    verdict_hooks = {"milterd_mail_from", "milterd_rcpt_to", "milterd_end_of_message",
                     "milterd_header_edits", "milterd_message_done"}
    assert verdict_hooks <= used, verdict_hooks - used


def test_only_if_leaves_out_implementations_a_config_does_not_need():
    from milterd.core.app import App, build_dispatcher
    from milterd.core.config import parse_config

    plain = parse_config("")
    partners = parse_config('[domain_security]\nreceive_domains = ["w.test"]\n')
    pinned = parse_config('[domain_security]\nreceive_domains = ["w.test"]\n'
                          '[peer_cert.pins]\n"w.test" = ["' + "AB" * 32 + '"]\n')
    d = {name: build_dispatcher(App(c), c) for name, c in
         (("plain", plain), ("partners", partners), ("pinned", pinned))}
    # No receive list: Domain Security needs no stage at all (MAIL/RCPT negotiated "no reply").
    assert not d["plain"].has_impls("milterd_mail_from")
    assert not d["plain"].has_impls("milterd_rcpt_to")
    # A receive list: MAIL FROM and end of message, but RCPT only when pins need the policy view.
    assert d["partners"].has_impls("milterd_mail_from")
    assert not d["partners"].has_impls("milterd_rcpt_to")
    assert d["pinned"].has_impls("milterd_rcpt_to")
