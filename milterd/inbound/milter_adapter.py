"""The pymilter adapter: libmilter callbacks → session model → hooks → milter replies.

Kept thin on purpose: it builds :class:`~milterd.session.Connection` / :class:`~milterd.session.Message`
values, calls the :class:`~milterd.core.app.Dispatcher`, and turns verdicts and header edits into
libmilter calls.  No policy lives here.

Speed (see shared/notes/postfix.md): negotiation is most of a Python milter's cost, so it asks the
MTA to skip what it never uses (DATA, body, end-of-headers, unknown commands) and not to wait for
replies where no plugin can give a verdict (connect, HELO, headers; MAIL/RCPT when no plugin
has a verdict hook there).  Macros are requested per stage with ``ctx.setsymlist`` directly
(pymilter's ``@symlist``/``setsymlist`` are broken on Python 3).  TLS macros are requested at MAIL
FROM, not HELO, so every transaction sees the TLS state it really ran under, even from a client
that skips the second EHLO after STARTTLS.

Errors.  Every callback is an error boundary and runs with the connection id set in
:data:`milterd.core.logs.connection_id`, so every line logged meanwhile — the dispatcher's
plugin-error lines included — names the connection.  A failure (a plugin's, reported by the
dispatcher as its error verdict, or milterd's own: ``internal error``, counted as plugin
``milterd``) is answered at once where the MTA waits for a reply (MAIL, RCPT, end of message:
``451 4.3.0``); in a stage negotiated as "no reply" (connect, HELO, headers) the MTA would not
read a reply, so it is kept and given at the next stage the MTA waits for — for the rest of the
connection after connect/HELO, for the transaction after a header.  Nothing is ever accepted
unchecked because a step failed.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import re
import socket
import time
from typing import Any, Callable

import Milter
import milter
from Milter import (CONTINUE, NOREPLY, REJECT, TEMPFAIL, P_NOBODY, P_NOCONNECT, P_NODATA,
                    P_NOEOH, P_NOUNKNOWN, P_NR_CONN, P_NR_HDR, P_NR_HELO, P_NR_MAIL, P_NR_RCPT)

from milterd.core.app import App, Dispatcher
from milterd.core.logs import connection_id, install_connection_ids
from milterd.inbound.tlsfacts import TLS_MACROS, from_macros, merge_policy_facts
from milterd.policy.coverage import is_from_field
from milterd.session import PLAINTEXT, Connection, Message, TlsFacts
from milterd.verdict import CONTINUE as CONTINUE_VERDICT
from milterd.verdict import Action, AddHeader, DeleteHeader, HeaderEdit, Verdict, compose

log = logging.getLogger(__name__)

INTERNAL_ERROR = "internal_error"
#: milterd's own failure (a bug, never a policy outcome): always tempfail, whatever on_error says.
_INTERNAL_ERROR = Verdict(Action.TEMPFAIL, "451", "4.3.0",
                          "Temporary local problem, try again later", INTERNAL_ERROR)
# What a failed callback spoils: the rest of the connection, the transaction, or nothing left.
_CONNECTION, _TRANSACTION, _NOTHING = "connection", "transaction", "nothing"

# Macros milterd asks for, per Milter.M_* stage (one list replaces the MTA's list for that stage).
# The queue ID ("i") reaches later stages too: libmilter keeps earlier stages' macros readable.
# One tuple, read with one map() at MAIL FROM: TLS macros first, then the queue ID and the client.
_CLIENT_MACROS = ("{client_addr}", "{client_port}", "{client_name}")
_ENVFROM_MACROS = TLS_MACROS + ("i",) + _CLIENT_MACROS
_N_TLS = len(TLS_MACROS)
_SYMLISTS = {Milter.M_ENVFROM: " ".join(_ENVFROM_MACROS)}
_SKIP_STEPS = P_NOBODY | P_NODATA | P_NOEOH | P_NOUNKNOWN
_ids = itertools.count(1)
_PORT = re.compile(r"[0-9]{1,5}")
_MAX_HEADERS = 2000          # beyond this, headers are counted but not kept (memory bound)
_MAX_HEADER_VALUE = 16384    # a longer value is kept truncated for plugins (never for the MTA)
# Exceptions to both caps: every From: field is kept whole wherever it comes (coverage must see
# what a reader sees; the MTA's own size limits bound it), and copies of the trace header are
# recorded (empty) so that every forged copy is deleted.


def _libmilter_mode() -> str:
    """How the libmilter inside pymilter serves MTA connections.

    ``threads``: one thread per connection, blocking on its own socket (upstream's default; what
    scripts/build-libmilter.sh links in).  ``pool``: Debian's ``_FFR_WORKERS_POOL`` build, where a
    controller thread polls every idle connection and hands commands to workers — measured ~30%
    more CPU per message for milterd (README, "Performance").
    """
    try:
        lib = ctypes.CDLL(milter.__file__)  # already loaded: this only looks up symbols
    except OSError:
        return "unknown"
    return "pool" if hasattr(lib, "mi_pool_controller_init") else "threads"


LIBMILTER_MODE = _libmilter_mode()


def _escape_reply(text: str) -> str:
    # libmilter treats '%' as a format character and silently drops a reply with a single one.
    return text.replace("%", "%%")


def _callback(stage: str, nr_flag: int, scope: str) -> Callable[[Callable[..., int]],
                                                                 Callable[..., int]]:
    """A libmilter callback: runs with the connection id in the logging context; an exception
    is milterd's own error, answered per ``scope`` (see the module docstring)."""

    def wrap(method: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(method)
        def callback(self: "MilterSession", *args: Any) -> int:
            token = connection_id.set(self.connection.id)
            try:
                return method(self, *args)
            except Exception:
                return self._internal_error(stage, nr_flag, scope)
            finally:
                connection_id.reset(token)

        return callback

    return wrap


class MilterSession(Milter.Base):
    """One instance per SMTP connection, created by libmilter's negotiate callback."""

    app: App  # set on the subclass made by :func:`session_class`

    def __init__(self) -> None:
        self.dispatcher: Dispatcher = self.app.dispatcher  # snapshot: reloads don't change us
        self.connection = Connection(id=f"c{next(_ids)}")
        self.message: Message | None = None
        self._tls_raw: tuple[Any, ...] | None = None
        self._tls_macros: TlsFacts = PLAINTEXT  # TLS facts from the macros alone, before any join
        self._header_count = 0
        self._rcpt_refusal: Verdict | None = None
        # Failures kept for the next stage the MTA waits for (see the module docstring).
        self._connection_error: Verdict | None = None
        self._transaction_error: Verdict | None = None
        self._stamp_name = self.dispatcher.config.stamp.header.lower()
        # replies for stages where no plugin speaks (set per connection by negotiate())
        self._protocol = 0
        self._helo_ok = self._mail_ok = self._rcpt_ok = self._header_ok = CONTINUE
        has = self.dispatcher.has_impls
        self._helo_hooks = has("milterd_helo")
        self._mail_hooks = has("milterd_mail_from")
        self._rcpt_hooks = has("milterd_rcpt_to")
        self._close_hooks = has("milterd_close")
        self._closed = False
        self.app.session_opened()  # last: close() (which counts it closed) must follow

    # -- negotiation --------------------------------------------------------------------------
    def negotiate(self, opts: list[int]) -> int:
        token = connection_id.set(self.connection.id)
        actions = opts[0]
        try:
            return self._negotiate(opts)
        except Exception:
            # Carry on with every stage sent and every reply awaited, and tempfail each
            # transaction of this connection (an abort here would leave the MTA to its default).
            self.app.metrics.plugin_errors.labels(plugin="milterd", hook="negotiate").inc()
            log.exception("internal error in negotiate; tempfailing every transaction of this "
                          "connection")
            self._protocol = 0
            self._connection_error = _INTERNAL_ERROR
            self._helo_ok = self._mail_ok = self._rcpt_ok = self._header_ok = CONTINUE
            opts[0] = self._actions = actions & (Milter.ADDHDRS | Milter.CHGHDRS)
            opts[1] = opts[2] = opts[3] = 0
            return CONTINUE
        finally:
            connection_id.reset(token)

    def _negotiate(self, opts: list[int]) -> int:
        actions, offered, _f1, _f2 = opts
        want = _SKIP_STEPS | P_NR_CONN | P_NR_HELO | P_NR_HDR
        if not self.dispatcher.has_impls("milterd_connect"):
            # Nobody observes the connect stage: skip the callback (one C->Python crossing a
            # connection less); the client's address and port come as macros with MAIL FROM.
            want |= P_NOCONNECT
        if not self._mail_hooks:
            want |= P_NR_MAIL
        if not self._rcpt_hooks:
            want |= P_NR_RCPT
        self._protocol = offered & want
        # The "nothing to say" replies, worked out once per connection, not per callback.
        self._helo_ok = self._noreply(P_NR_HELO)
        self._mail_ok = self._noreply(P_NR_MAIL)
        self._rcpt_ok = self._noreply(P_NR_RCPT)
        self._header_ok = self._noreply(P_NR_HDR)
        self._actions = actions & (Milter.ADDHDRS | Milter.CHGHDRS | Milter.SETSYMLIST)
        opts[0] = self._actions
        opts[1] = self._protocol
        opts[2] = 0
        opts[3] = 0
        if self._actions & Milter.SETSYMLIST:
            for stage, macros in _SYMLISTS.items():
                self._ctx.setsymlist(stage, macros)
        return CONTINUE

    def _noreply(self, flag: int) -> int:
        return NOREPLY if self._protocol & flag else CONTINUE

    # -- callbacks ------------------------------------------------------------------------------
    @_callback("connect", P_NR_CONN, _CONNECTION)
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        start = time.perf_counter()
        c = self.connection
        c.client_name = hostname
        if family in (socket.AF_INET, socket.AF_INET6) and isinstance(hostaddr, tuple):
            c.client_address, c.client_port = hostaddr[0], int(hostaddr[1])
        failed = self.dispatcher.notify("milterd_connect", connection=c)
        self._observe("connect", start)
        if failed is not None:
            return self._refuse(failed, P_NR_CONN, _CONNECTION)
        return self._noreply(P_NR_CONN)

    # The callback latency histogram covers the stages where plugins run; a stage nobody hooks is
    # a few attribute stores, and timing it would cost more than it does.
    @_callback("helo", P_NR_HELO, _CONNECTION)
    def hello(self, heloname: str) -> int:
        self.connection.helo = heloname
        if self._helo_hooks:
            start = time.perf_counter()
            failed = self.dispatcher.notify("milterd_helo", connection=self.connection)
            self._observe("helo", start)
            if failed is not None:
                return self._refuse(failed, P_NR_HELO, _CONNECTION)
        return self._helo_ok

    # pymilter's *_bytes entry points look up a decoding strategy on every call; ours is fixed:
    # UTF-8 with surrogateescape (8-bit junk survives, round-trips, and never raises).
    def envfrom_bytes(self, *args: bytes) -> int:
        return self.envfrom(*[a.decode("utf-8", "surrogateescape") for a in args])

    def envrcpt_bytes(self, *args: bytes) -> int:
        return self.envrcpt(*[a.decode("utf-8", "surrogateescape") for a in args])

    def header_bytes(self, name: str, value: bytes) -> int:
        return self.header(name, value.decode("utf-8", "surrogateescape"))

    @_callback("envfrom", P_NR_MAIL, _TRANSACTION)
    def envfrom(self, mailfrom: str, *params: str) -> int:
        start = time.perf_counter()
        self._transaction_error = None
        self._finish_refused()
        # The transaction exists from here on, so that a failure below (kept for end of message
        # when the MTA does not wait at MAIL) is answered there, once.
        self.message = message = Message(sender=mailfrom)
        self._header_count = 0
        self._rcpt_refusal = None
        raw = tuple(map(self._symval, _ENVFROM_MACROS))
        message.queue_id = raw[_N_TLS] or None
        if self.connection.client_address is None:
            self._client_from_macros(raw[_N_TLS + 1:])
        self._refresh_tls(raw[:_N_TLS])
        pending = self._connection_error
        if not self._mail_hooks:
            if pending is None or self._protocol & P_NR_MAIL:
                return self._mail_ok  # a pending failure waits for a stage with a reply
            verdict = pending
        else:
            verdict = self.dispatcher.verdict("milterd_mail_from", self.connection, self.message)
            if pending is not None:
                verdict = compose((verdict, pending))
        if verdict.action is not Action.CONTINUE:
            self.dispatcher.notify("milterd_message_done", connection=self.connection,
                                   message=self.message, verdict=verdict)
            self.message = None
        self._observe("mail", start)
        return self._reply(verdict, P_NR_MAIL)

    @_callback("envrcpt", P_NR_RCPT, _TRANSACTION)
    def envrcpt(self, to: str, *params: str) -> int:
        m = self.message
        if m is None:  # cannot happen with a well-behaved MTA; never accept blindly
            raise RuntimeError("RCPT TO without a transaction (no MAIL FROM seen)")
        m.recipients.append(to)
        try:
            return self._rcpt(m, to)
        except Exception:
            if not self._protocol & P_NR_RCPT:
                m.recipients.pop()  # tempfailed now: the MTA does not take this recipient
            raise

    def _rcpt(self, m: Message, to: str) -> int:
        pending = self._connection_error or self._transaction_error
        if pending is not None and self._protocol & P_NR_RCPT:
            pending = None  # the MTA reads no reply here: end of message gives it
        if not self._rcpt_hooks and pending is None:
            return self._rcpt_ok
        start = time.perf_counter()
        if m.queue_id is None:
            m.queue_id = self._symval("i") or None
        verdict = pending or CONTINUE_VERDICT
        if self._rcpt_hooks:
            self._join_policy_view()
            verdict = self.dispatcher.verdict("milterd_rcpt_to", self.connection, m,
                                              recipient=to)
            if pending is not None:
                verdict = compose((verdict, pending))
        if verdict.action is not Action.CONTINUE:
            m.recipients.pop()
            self._rcpt_refusal = verdict
        self._observe("rcpt", start)
        return self._reply(verdict, P_NR_RCPT)

    @_callback("header", P_NR_HDR, _TRANSACTION)
    def header(self, name: str, value: str) -> int:
        m = self.message
        if m is not None:
            self._header_count += 1
            if is_from_field(name):
                m.headers.append((name, value))  # whole, wherever it comes (see _MAX_HEADERS)
            elif self._header_count <= _MAX_HEADERS:
                m.headers.append((name, value[:_MAX_HEADER_VALUE]))
            elif name.lower() == self._stamp_name:
                m.headers.append((name, ""))
        return self._header_ok

    @_callback("eom", 0, _TRANSACTION)
    def eom(self) -> int:
        start = time.perf_counter()
        try:
            m = self.message
            if m is None:
                raise RuntimeError("end of message without a transaction (no MAIL FROM seen)")
            m.queue_id = self._symval("i") or m.queue_id
            self._join_policy_view()
            if self._header_count > _MAX_HEADERS:
                log.warning("queue_id=%s: %d headers, only the first %d given to plugins",
                            m.queue_id, self._header_count, _MAX_HEADERS)
            verdict = self.dispatcher.verdict("milterd_end_of_message", self.connection, m)
            pending = self._connection_error or self._transaction_error
            if pending is not None:
                verdict = compose((verdict, pending))
            if verdict.action is Action.CONTINUE:
                edits = self.dispatcher.header_edits(self.connection, m)
                if edits is None:
                    verdict = self.dispatcher.error_verdict
                    edits = []
                if verdict.action is Action.CONTINUE:
                    self._apply(edits, m)
            self.dispatcher.notify("milterd_message_done", connection=self.connection,
                                   message=m, verdict=verdict)
            self.message = None
            self._transaction_error = None
            if verdict.action is Action.CONTINUE:
                return CONTINUE
            return self._reply(verdict, 0)
        finally:
            self._observe("eom", start)

    @_callback("abort", 0, _NOTHING)
    def abort(self) -> int:
        try:
            self._finish_refused()
        finally:
            self.message = None
            self._transaction_error = None
        return CONTINUE

    def _finish_refused(self) -> None:
        """A transaction whose every recipient milterd refused ends without end-of-message:
        report it once, as refused, so it is logged and counted like a MAIL FROM refusal."""
        m, refusal = self.message, self._rcpt_refusal
        self._rcpt_refusal = None
        if m is not None and refusal is not None and not m.recipients:
            self.message = None
            self.dispatcher.notify("milterd_message_done", connection=self.connection,
                                   message=m, verdict=refusal)

    @_callback("close", 0, _NOTHING)
    def close(self) -> int:
        try:
            self._finish_refused()
            c = self.connection
            metrics = self.app.metrics
            metrics.child(metrics.tls_sessions, c.tls.version or "none", c.tls.verify.value).inc()
            if self._close_hooks:
                self.dispatcher.notify("milterd_close", connection=c)
            self.app.policy_views.forget(c.client_address, c.client_port)
        finally:
            if not self._closed:
                self._closed = True
                self.app.session_closed()
        return CONTINUE

    # -- helpers -------------------------------------------------------------------------------
    def _symval(self, name: str) -> str | None:
        """A macro's value, or None: a value libmilter cannot hand over (e.g. invalid UTF-8)
        is logged and treated as absent, which fails closed for every TLS fact."""
        try:
            return self._ctx.getsymval(name)
        except Exception as e:
            log.warning("macro %s unreadable (%s); treated as absent", name, type(e).__name__)
            return None

    def _client_from_macros(self, values: tuple[str | None, ...]) -> None:
        c = self.connection
        addr, port, name = values
        c.client_address = addr or None
        c.client_port = int(port) if port and _PORT.fullmatch(port) else None
        c.client_name = c.client_name or name or None

    def _refresh_tls(self, raw: tuple[str | None, ...]) -> None:
        if raw == self._tls_raw:
            return  # same TLS state as the previous transaction on this connection
        self._tls_raw = raw
        facts, warnings = from_macros(dict(zip(TLS_MACROS, raw)))
        for w in warnings:
            log.warning("client=%s: %s", self.connection.client_address, w)
        self._tls_macros = facts
        self.connection.tls = facts
        self.connection.mta = facts.dialect if facts.dialect != "none" else self.connection.mta

    def _join_policy_view(self) -> None:
        # Always from the macros' facts: the newest policy request replaces what an older one
        # said (a later request without a fingerprint clears an earlier one's), and a request
        # whose TLS facts disagree with this session's is not this session's.
        c = self.connection
        base = self._tls_macros
        if base.dialect != "postfix":
            return
        view = self.app.policy_views.get(c.client_address, c.client_port)
        if view is not None and view.agrees_with(base):
            c.tls = merge_policy_facts(base, view.fingerprint, view.pubkey_fingerprint)
        else:
            c.tls = base

    def _reply(self, verdict: Verdict, nr_flag: int) -> int:
        if verdict.action is Action.CONTINUE:
            return self._noreply(nr_flag) if nr_flag else CONTINUE
        if verdict.code:
            self._ctx.setreply(verdict.code, verdict.xcode or None,
                               _escape_reply(verdict.text or "Refused by policy"))
        return REJECT if verdict.action is Action.REJECT else TEMPFAIL

    def _refuse(self, verdict: Verdict, nr_flag: int, scope: str) -> int:
        """Answer a failure's verdict now if the MTA waits for this stage's reply, else keep it
        for the next stage it waits for (the whole connection's, or this transaction's)."""
        if verdict.action is Action.CONTINUE:  # on_error = "accept"
            return self._noreply(nr_flag) if nr_flag else CONTINUE
        if scope == _CONNECTION:
            self._connection_error = self._connection_error or verdict
        elif nr_flag and self._protocol & nr_flag:
            self._transaction_error = self._transaction_error or verdict
        if nr_flag and self._protocol & nr_flag:
            return NOREPLY
        return self._reply(verdict, 0)

    def _apply(self, edits: list[HeaderEdit], m: Message) -> None:
        deletes = sorted((e for e in edits if isinstance(e, DeleteHeader)),
                         key=lambda e: e.occurrence, reverse=True)
        for d in deletes:  # highest index first: earlier deletions cannot shift later ones
            self._ctx.chgheader(d.name, d.occurrence, None)
        for a in edits:
            if isinstance(a, AddHeader):
                self._ctx.addheader(a.name, a.value, a.index)

    def _internal_error(self, stage: str, nr_flag: int, scope: str) -> int:
        """A bug in milterd itself (or a broken libmilter context): logged with its traceback
        and counted as plugin ``milterd``; fails closed (tempfail, now or at the next stage the
        MTA waits for), never accepts what policy covers."""
        qid = self.message.queue_id if self.message else None
        self.app.metrics.plugin_errors.labels(plugin="milterd", hook=stage).inc()
        if scope == _NOTHING:
            log.exception("internal error in %s (queue_id=%s)", stage, qid or "-")
            return CONTINUE
        later = bool(nr_flag and self._protocol & nr_flag)
        log.exception("internal error in %s (queue_id=%s); tempfailing %s", stage, qid or "-",
                      "at the next stage the MTA waits for" if later else "now")
        try:
            return self._refuse(_INTERNAL_ERROR, nr_flag, scope)
        except Exception:  # the context itself is broken: libmilter's default reply
            log.exception("cannot set the reply in %s", stage)
            return TEMPFAIL

    def _observe(self, stage: str, start: float) -> None:
        self.app.metrics.observe_callback(stage, time.perf_counter() - start)


def session_class(app: App) -> type[MilterSession]:
    """A MilterSession subclass bound to ``app`` (pymilter's factory takes no arguments)."""
    install_connection_ids()
    return type("BoundMilterSession", (MilterSession,), {"app": app})
