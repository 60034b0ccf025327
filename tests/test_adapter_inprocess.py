"""The milter adapter and the dispatcher in-process, with a fake libmilter context: no root, no MTA.

Each failure — a plugin that raises, overruns ``plugin_timeout`` or returns what its hook does
not allow, and milterd's own internal error — is injected in each stage (connect, HELO, MAIL,
RCPT, header, end of message, close).  Every one ends as a 4xx with milterd's reply at the first
stage where the MTA waits for an answer (never accepted unchecked), is counted in
``milterd_plugin_errors_total``, is logged on a line naming the connection, and leaves the
session and the daemon serving.  pymilter's own callbacks drive the adapter, as libmilter does.
"""

from __future__ import annotations

import functools
import logging
import operator
import socket
import time
from typing import Any

import Milter
import pytest

from milterd.core.app import App, build_dispatcher
from milterd.core.config import parse_config
from milterd.core.logs import TextFormatter
from milterd.hookspecs import hookimpl
from milterd.inbound import milter_adapter
from milterd.inbound.milter_adapter import session_class
from milterd.verdict import reject

# What Postfix offers: every action, every protocol option.
ALL_PROTOCOL = functools.reduce(operator.or_, (getattr(Milter, n) for n in dir(Milter)
                                               if n.startswith("P_")))
ALL_ACTIONS = 0x1FF
MACROS = {"{tls_version}": "TLSv1.3", "{cipher}": "TLS_AES_256_GCM_SHA384",
          "{cipher_bits}": "256", "i": "4XyZQ1", "{client_addr}": "192.0.2.7",
          "{client_port}": "40007"}
POLICY_FAILURE = ("451", "4.3.0", "Temporary local policy failure, try again later")
LOCAL_PROBLEM = ("451", "4.3.0", "Temporary local problem, try again later")
STAMP = "X-Milterd-TLS"
PLUGIN_TIMEOUT = 0.05


class FaultyPluginError(Exception):
    pass


class FakeContext:
    """libmilter's per-connection context, as pymilter's ``milterContext`` presents it."""

    def __init__(self, macros: dict[str, str]):
        self.macros = macros
        self.priv: Any = None
        self.replies: list[tuple[str, str | None, str]] = []
        self.added: list[tuple[str, str, int]] = []
        self.changed: list[tuple[str, int, str | None]] = []
        self.symlists: dict[int, str] = {}

    def setpriv(self, priv: Any) -> None:
        self.priv = priv

    def getpriv(self) -> Any:
        return self.priv

    def getsymval(self, name: str) -> str | None:
        return self.macros.get(name)

    def setreply(self, code: str, xcode: str | None, text: str) -> None:
        self.replies.append((code, xcode, text))

    def addheader(self, name: str, value: str, index: int) -> None:
        self.added.append((name, value, index))

    def chgheader(self, name: str, index: int, value: str | None) -> None:
        self.changed.append((name, index, value))

    def setsymlist(self, stage: int, macros: str) -> None:
        self.symlists[stage] = macros


class Mta:
    """One MTA connection: calls pymilter's callbacks in protocol order, as libmilter does,
    and, like an MTA, skips waiting where "no reply" was negotiated."""

    def __init__(self, app: App, monkeypatch: pytest.MonkeyPatch):
        self.ctx = FakeContext(dict(MACROS))
        monkeypatch.setattr(Milter, "factory", session_class(app))
        opts = [ALL_ACTIONS, ALL_PROTOCOL, 0, 0]
        assert Milter.negotiate_callback(self.ctx, opts) == Milter.CONTINUE
        self.protocol = opts[1]
        self.session: milter_adapter.MilterSession = self.ctx.getpriv()

    @property
    def conn(self) -> str:
        return self.session.connection.id

    def connect(self) -> int:
        return Milter.connect_callback(self.ctx, "client.test", socket.AF_INET,
                                       ("192.0.2.7", 40007))

    def helo(self) -> int:
        return self.ctx.getpriv().hello("client.test")

    def mail(self, sender: str = "<alice@fabrikam.test>") -> int:
        return self.ctx.getpriv().envfrom_bytes(sender.encode())

    def rcpt(self, rcpt: str = "<bob@contoso.test>") -> int:
        return self.ctx.getpriv().envrcpt_bytes(rcpt.encode())

    def header(self, name: str, value: str) -> int:
        return self.ctx.getpriv().header_bytes(name, value.encode())

    def eom(self) -> int:
        return self.ctx.getpriv().eom()

    def close(self) -> int:
        return Milter.close_callback(self.ctx)

    def transaction(self, subject: str = "hello") -> tuple[str, int]:
        """MAIL, RCPT, headers, end of message; (the stage that answered last, its code)."""
        self.ctx.added.clear()
        for stage, call in (("mail", self.mail), ("rcpt", self.rcpt),
                            ("header", lambda: self.header("From", "alice@fabrikam.test")),
                            ("header", lambda: self.header("Subject", subject)),
                            ("eom", self.eom)):
            rc = call()
            if rc in (Milter.TEMPFAIL, Milter.REJECT):
                return stage, rc
        return "eom", rc

    def stamped(self) -> bool:
        return any(name == STAMP for name, _value, _index in self.ctx.added)


class Faulty:
    """A plugin implementing every hook; fails once, in ``hook``, the ``kind`` way."""

    def __init__(self, hook: str, kind: str):
        self.hook, self.kind, self.fired = hook, kind, 0

    def _act(self, hook: str) -> Any:
        if hook != self.hook or self.fired:
            return [] if hook == "milterd_header_edits" else None
        self.fired += 1
        if self.kind == "raise":
            raise FaultyPluginError(f"test plugin exploded in {hook}")
        if self.kind == "timeout":
            time.sleep(PLUGIN_TIMEOUT * 3)
            return None
        assert self.kind == "wrong_type"
        if hook in OBSERVATION_HOOKS:  # the likely mistake: refusing from an observer
            return reject("I meant to refuse this", reason="test")
        return "X-Not-A-Verdict: yes"

    @hookimpl
    def milterd_connect(self, connection):
        return self._act("milterd_connect")

    @hookimpl
    def milterd_helo(self, connection):
        return self._act("milterd_helo")

    @hookimpl
    def milterd_mail_from(self, message):
        return self._act("milterd_mail_from")

    @hookimpl
    def milterd_rcpt_to(self, recipient):
        return self._act("milterd_rcpt_to")

    @hookimpl
    def milterd_end_of_message(self, message):
        return self._act("milterd_end_of_message")

    @hookimpl
    def milterd_header_edits(self, message):
        return self._act("milterd_header_edits")

    @hookimpl
    def milterd_message_done(self, verdict):
        return self._act("milterd_message_done")

    @hookimpl
    def milterd_close(self, connection):
        return self._act("milterd_close")


OBSERVATION_HOOKS = ("milterd_connect", "milterd_helo", "milterd_message_done", "milterd_close")

# stage -> (hook, where the MTA hears the failure, whether later transactions still fail)
STAGES = {
    "connect": ("milterd_connect", "mail", True),
    "helo": ("milterd_helo", "mail", True),
    "mail": ("milterd_mail_from", "mail", False),
    "rcpt": ("milterd_rcpt_to", "rcpt", False),
    "header": ("milterd_header_edits", "eom", False),
    "eom": ("milterd_end_of_message", "eom", False),
    "close": ("milterd_close", None, False),
}


def make_app(config_text: str = "", *plugins: tuple[str, object]) -> App:
    config = parse_config(f"[milter]\nplugin_timeout = {PLUGIN_TIMEOUT}\n" + config_text)
    app = App(config)
    app.dispatcher = build_dispatcher(app, config, extra_plugins=plugins)
    return app


def errors(app: App, plugin: str, hook: str) -> float:
    value = app.metrics.registry.get_sample_value("milterd_plugin_errors_total",
                                                  {"plugin": plugin, "hook": hook})
    return value or 0.0


def assert_serves(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new connection on the same daemon is served normally: accepted, stamped."""
    mta = Mta(app, monkeypatch)
    mta.connect()
    mta.helo()
    assert mta.transaction("after") == ("eom", Milter.CONTINUE)
    assert mta.stamped() and not mta.ctx.replies
    assert mta.close() == Milter.CONTINUE
    assert app.open_sessions == 0


def run_session(app: App, monkeypatch: pytest.MonkeyPatch, stage: str,
                before_stage=lambda: None) -> tuple[Mta, tuple[str, int] | None, int]:
    """connect, HELO, one transaction, close — with ``before_stage()`` run just before
    ``stage``'s callback.  Returns the MTA, the transaction's outcome and close's code."""
    mta = Mta(app, monkeypatch)
    if stage == "connect":
        before_stage()
    assert mta.connect() == Milter.NOREPLY  # the MTA does not wait at connect ...
    if stage == "helo":
        before_stage()
    assert mta.helo() == Milter.NOREPLY     # ... nor at HELO
    outcome = None
    if stage in ("mail", "rcpt", "header", "eom"):
        calls = [("mail", mta.mail), ("rcpt", mta.rcpt),
                 ("header", lambda: mta.header("From", "alice@fabrikam.test")),
                 ("eom", mta.eom)]
        for name, call in calls:
            if name == stage:
                before_stage()
            rc = call()
            if rc in (Milter.TEMPFAIL, Milter.REJECT):
                outcome = (name, rc)
                break
        else:
            outcome = ("eom", rc)
    else:
        outcome = mta.transaction()
    if stage == "close":
        before_stage()
    return mta, outcome, mta.close()


def check_failure(app: App, mta: Mta, outcome, close_rc: int, stage: str,
                  reply: tuple[str, str, str]) -> None:
    _hook, heard_at, _sticky = STAGES[stage]
    assert close_rc == Milter.CONTINUE
    assert app.open_sessions == 0
    if heard_at is None:  # after close nothing is left to refuse: the transaction went through
        assert outcome == ("eom", Milter.CONTINUE) and mta.stamped()
        return
    assert outcome == (heard_at, Milter.TEMPFAIL), outcome
    assert mta.ctx.replies == [reply]
    assert not mta.stamped()  # never accepted, never stamped


@pytest.mark.parametrize("kind", ["raise", "timeout", "wrong_type"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_plugin_failure_is_a_tempfail_counted_logged_with_the_connection(
        stage, kind, monkeypatch, caplog):
    hook, heard_at, sticky = STAGES[stage]
    plugin = Faulty(hook, kind)
    app = make_app("", ("faulty", plugin))
    caplog.set_level(logging.INFO)
    mta, outcome, close_rc = run_session(app, monkeypatch, stage)
    assert plugin.fired == 1
    check_failure(app, mta, outcome, close_rc, stage, POLICY_FAILURE)
    assert errors(app, "faulty", hook) == 1
    assert errors(app, "milterd", stage) == 0  # not an internal error
    line = {"raise": f"plugin faulty failed in {hook}",
            "timeout": f"plugin faulty overran plugin_timeout in {hook}",
            "wrong_type": f"plugin faulty returned "}[kind]
    mine = [r for r in caplog.records if line in r.getMessage()]
    assert len(mine) == 1, [r.getMessage() for r in caplog.records]
    assert mine[0].conn == mta.conn  # the line names the connection
    assert "on_error=tempfail" in mine[0].getMessage()
    if kind == "raise":
        assert mine[0].exc_info is not None  # with its traceback
    # No exception text ever reaches the MTA.
    assert all("exploded" not in text for _c, _x, text in mta.ctx.replies)
    assert_serves(app, monkeypatch)


@pytest.mark.parametrize("stage", ["connect", "helo"])
def test_an_observer_failure_tempfails_every_transaction_of_its_connection(stage, monkeypatch):
    hook, _heard_at, _sticky = STAGES[stage]
    app = make_app("", ("faulty", Faulty(hook, "raise")))
    mta = Mta(app, monkeypatch)
    mta.connect()
    mta.helo()
    for _ in range(3):  # the plugin failed once, but its connection state may be missing
        assert mta.transaction() == ("mail", Milter.TEMPFAIL)
    assert mta.ctx.replies == [POLICY_FAILURE] * 3
    mta.close()
    assert errors(app, "faulty", hook) == 1
    assert_serves(app, monkeypatch)


@pytest.mark.parametrize("stage", ["mail", "rcpt", "header", "eom"])
def test_after_a_transaction_failed_the_next_one_on_the_connection_is_served(stage,
                                                                             monkeypatch):
    hook, heard_at, _sticky = STAGES[stage]
    app = make_app("", ("faulty", Faulty(hook, "raise")))
    mta = Mta(app, monkeypatch)
    mta.connect()
    mta.helo()
    assert mta.transaction("first") == (heard_at, Milter.TEMPFAIL)
    assert mta.transaction("second") == ("eom", Milter.CONTINUE)
    assert mta.stamped()
    mta.close()
    assert app.open_sessions == 0


def test_message_done_failure_is_counted_and_changes_no_verdict(monkeypatch, caplog):
    app = make_app("", ("faulty", Faulty("milterd_message_done", "raise")))
    mta = Mta(app, monkeypatch)
    mta.connect()
    mta.helo()
    assert mta.transaction() == ("eom", Milter.CONTINUE) and mta.stamped()
    mta.close()
    assert errors(app, "faulty", "milterd_message_done") == 1
    assert [r.conn for r in caplog.records
            if "failed in milterd_message_done" in r.getMessage()] == [mta.conn]


@pytest.mark.parametrize("stage", ["connect", "mail", "header", "eom"])
def test_on_error_accept_lets_the_message_through(stage, monkeypatch):
    hook, _heard_at, _sticky = STAGES[stage]
    accept = parse_config(f'[milter]\nplugin_timeout = {PLUGIN_TIMEOUT}\n'
                          'on_error = "accept"\n')
    app = App(accept)
    app.dispatcher = build_dispatcher(app, accept,
                                      extra_plugins=(("faulty", Faulty(hook, "raise")),))
    mta = Mta(app, monkeypatch)
    mta.connect()
    mta.helo()
    assert mta.transaction() == ("eom", Milter.CONTINUE)
    assert not mta.ctx.replies
    # the stamp plugin's edits are lost only when header_edits itself failed
    assert mta.stamped() == (stage != "header")
    mta.close()
    assert errors(app, "faulty", hook) == 1


class Boom(Exception):
    pass


def _arm(monkeypatch: pytest.MonkeyPatch, target: object, name: str, after: int = 0) -> None:
    """Make ``target.name`` raise once, after ``after`` good calls (a broken dependency inside
    milterd's own code)."""
    original = getattr(target, name)
    calls = [0]

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] <= after:
            return original(*args, **kwargs)
        monkeypatch.setattr(target, name, original)
        raise Boom(f"internal failure in {name}")

    monkeypatch.setattr(target, name, broken)


# stage -> where milterd's own code is broken, just before that stage's callback
INTERNAL = {
    "connect": lambda app: (app.metrics, "observe_callback"),
    "helo": lambda app: (app.metrics, "observe_callback"),
    "mail": lambda app: (milter_adapter, "from_macros"),
    "rcpt": lambda app: (app.policy_views, "get"),
    "header": lambda app: (milter_adapter, "is_from_field"),
    "eom": lambda app: (app.policy_views, "get"),
    "close": lambda app: (app.policy_views, "forget"),
}
INTERNAL_HOOK = {"mail": "envfrom", "rcpt": "envrcpt"}


@pytest.mark.parametrize("stage", list(INTERNAL))
def test_internal_error_is_a_tempfail_counted_logged_with_the_connection(stage, monkeypatch,
                                                                         caplog):
    # A helo and a rcpt hook, so that those callbacks do their full work.
    app = make_app('[domain_security]\nreceive_domains = ["woodgrovebank.test"]\n'
                   '[peer_cert.pins]\n"woodgrovebank.test" = ["' + "AB" * 32 + '"]\n',
                   ("observer", Faulty("none", "raise")))
    target, name = INTERNAL[stage](app)
    mta, outcome, close_rc = run_session(app, monkeypatch, stage,
                                         lambda: _arm(monkeypatch, target, name))
    check_failure(app, mta, outcome, close_rc, stage, LOCAL_PROBLEM)
    hook = INTERNAL_HOOK.get(stage, stage)
    assert errors(app, "milterd", hook) == 1
    mine = [r for r in caplog.records if f"internal error in {hook}" in r.getMessage()]
    assert len(mine) == 1 and mine[0].exc_info is not None
    assert mine[0].conn == mta.conn
    assert_serves(app, monkeypatch)


def test_internal_error_in_negotiate_tempfails_the_connection(monkeypatch):
    app = make_app()
    _arm(monkeypatch, app.dispatcher, "has_impls", after=4)  # the session's own four pass
    ctx = FakeContext(dict(MACROS))
    monkeypatch.setattr(Milter, "factory", session_class(app))
    opts = [ALL_ACTIONS, ALL_PROTOCOL, 0, 0]
    assert Milter.negotiate_callback(ctx, opts) == Milter.CONTINUE
    assert opts[1] == 0  # every stage sent, every reply awaited
    session = ctx.getpriv()
    assert session.envfrom_bytes(b"<a@fabrikam.test>") == Milter.TEMPFAIL
    assert ctx.replies == [LOCAL_PROBLEM]
    Milter.close_callback(ctx)
    assert errors(app, "milterd", "negotiate") == 1 and app.open_sessions == 0
    assert_serves(app, monkeypatch)


def test_rcpt_without_mail_and_eom_without_mail_are_tempfailed(monkeypatch):
    app = make_app()
    mta = Mta(app, monkeypatch)
    mta.connect()
    # No RCPT hook: the MTA does not wait at RCPT; end of message gives the answer.
    assert mta.rcpt() == Milter.NOREPLY
    assert mta.eom() == Milter.TEMPFAIL
    assert mta.ctx.replies == [LOCAL_PROBLEM]
    mta.close()
    assert errors(app, "milterd", "envrcpt") == 1 and errors(app, "milterd", "eom") == 1


def test_text_lines_name_the_connection():
    fmt = TextFormatter()
    record = logging.LogRecord("milterd.core.app", logging.ERROR, __file__, 1,
                               "plugin %s failed", ("x",), None)
    record.conn = "c42"
    assert fmt.format(record).endswith("milterd.core.app: conn=c42 plugin x failed")
    record.conn = None
    assert fmt.format(record).endswith("milterd.core.app: plugin x failed")


def test_internal_error_where_the_mta_does_not_wait_is_answered_once_at_end_of_message(
        monkeypatch, caplog):
    app = make_app()  # no MAIL or RCPT hook: both negotiated "no reply"
    mta = Mta(app, monkeypatch)
    assert mta.protocol & Milter.P_NR_MAIL and mta.protocol & Milter.P_NR_RCPT
    mta.connect()
    mta.helo()
    _arm(monkeypatch, milter_adapter, "from_macros")
    assert mta.mail() == Milter.NOREPLY
    assert mta.rcpt() == Milter.NOREPLY
    assert mta.header("Subject", "x") == Milter.NOREPLY
    assert mta.eom() == Milter.TEMPFAIL
    assert mta.ctx.replies == [LOCAL_PROBLEM] and not mta.stamped()
    assert errors(app, "milterd", "envfrom") == 1
    assert errors(app, "milterd", "envrcpt") == errors(app, "milterd", "eom") == 0
    assert [r.conn for r in caplog.records if "internal error in envfrom" in r.getMessage()] \
        == [mta.conn]
    assert "at the next stage the MTA waits for" in caplog.text
    # The next transaction on the connection is served.
    assert mta.transaction() == ("eom", Milter.CONTINUE) and mta.stamped()
    mta.close()
    assert app.open_sessions == 0


class Recorder:
    """Implements every hook; records which were called and the config each one got."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    @hookimpl
    def milterd_configure(self, config):
        self.calls.append(("milterd_configure", config))

    @hookimpl
    def milterd_connect(self, config):
        self.calls.append(("milterd_connect", config))

    @hookimpl
    def milterd_helo(self, config):
        self.calls.append(("milterd_helo", config))

    @hookimpl
    def milterd_mail_from(self, config):
        self.calls.append(("milterd_mail_from", config))

    @hookimpl
    def milterd_rcpt_to(self, config):
        self.calls.append(("milterd_rcpt_to", config))

    @hookimpl
    def milterd_end_of_message(self, config):
        self.calls.append(("milterd_end_of_message", config))

    @hookimpl
    def milterd_header_edits(self, config):
        self.calls.append(("milterd_header_edits", config))
        return []

    @hookimpl
    def milterd_message_done(self, config):
        self.calls.append(("milterd_message_done", config))

    @hookimpl
    def milterd_close(self, config):
        self.calls.append(("milterd_close", config))


def test_every_hook_is_called_with_the_config_the_session_started_with(monkeypatch):
    from milterd import hookspecs

    recorder = Recorder()
    app = make_app("", ("recorder", recorder))
    started_with = app.dispatcher.config
    mta = Mta(app, monkeypatch)
    mta.connect()
    mta.helo()
    # A reload replaces the live configuration and the dispatcher for new sessions ...
    new = parse_config('[stamp]\nheader = "X-Other"\n')
    app.config = new
    app.dispatcher = build_dispatcher(app, new, extra_plugins=(("recorder", Recorder()),))
    # ... this session keeps its own, down to every hook's config argument.
    assert mta.transaction() == ("eom", Milter.CONTINUE) and mta.stamped()
    mta.close()
    specs = {n for n in dir(hookspecs) if n.startswith("milterd_")}
    assert {name for name, _config in recorder.calls} == specs
    assert all(config is started_with for _name, config in recorder.calls)
