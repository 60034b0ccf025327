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


def test_every_hook_is_exercised_by_a_builtin_or_test_plugin():
    import importlib
    import pathlib

    used = set()
    for mod in ("milterd_plugins.domain_security", "milterd_plugins.stamp",
                "milterd_plugins.counters", "milterd_plugins.message_log",
                "testplugins.reject_sender", "testplugins.record_tls", "testplugins.raiser"):
        used |= {n for n in dir(importlib.import_module(mod)) if n.startswith("milterd_")}
    specs = {n for n in dir(hookspecs) if n.startswith("milterd_")}
    unused = specs - used
    # Hooks no plugin implements yet are at least called by the adapter.
    adapter = pathlib.Path(inspect.getfile(hookspecs)).with_name("adapter.py").read_text()
    app = pathlib.Path(inspect.getfile(hookspecs)).with_name("app.py").read_text()
    for name in unused:
        assert f'"{name}"' in adapter or f'"{name}"' in app, name
