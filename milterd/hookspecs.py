"""Every hook a milterd plugin may implement, with its contract.

A plugin is any module or object with ``@hookimpl`` functions, registered through the
``milterd.plugins`` entry-point group (the built-ins in ``plugins/`` are registered exactly so).
Implementations may accept any subset of a hook's arguments, by name.

Arguments every SMTP-stage hook gets:

* ``app`` — the running daemon's shared objects (metrics, policy-view store, stash); they live
  as long as the process.
* ``config`` — the configuration **of this session**: the one in force when the MTA opened the
  connection.  A reload (SIGHUP) does not change it for a session already open, so every
  decision about one session is made under one policy.  Read configuration here, never from
  ``app.config`` (the live configuration, replaced by a reload).

How the core calls hooks (it matters for plugin authors):

* Each implementation is called on its own, in pluggy order (``tryfirst`` first, then the most
  recently registered, ``trylast`` last).  If one raises, runs longer than
  ``[milter] plugin_timeout`` or returns what its hook does not allow (a non-:class:`Verdict`
  from a verdict hook, anything but ``None`` from an observation hook), that is logged (the line
  names the connection id and the queue ID), counted in
  ``milterd_plugin_errors_total{plugin,hook}``, and turned into the ``[milter] on_error`` verdict
  (tempfail by default, ``451 4.3.0``); the other plugins still run and the daemon keeps serving.
  For an observation hook the MTA does not wait for (connect, HELO) the verdict is given at the
  next stage the MTA waits for, for every transaction of that connection; after
  :func:`milterd_message_done` and :func:`milterd_close` nothing is left to refuse, so there it
  is only logged and counted.
* Verdicts from all implementations compose: reject > tempfail > continue; the first of equal
  severity supplies the reply.  A non-continue verdict at MAIL FROM or RCPT TO ends the stage
  for the MTA; at end of message it decides the message.
* Header edits are only collected from :func:`milterd_header_edits`, after the final verdict is
  known to accept, and applied in one place.
* Per-connection and per-message plugin state belongs in ``connection.stash`` /
  ``message.stash`` under a module-level :class:`~milterd.session.StashKey`.
* A stage for which no plugin has a verdict hook is negotiated as "no reply" with the MTA, which
  is much faster; observation hooks never block the MTA.  An implementation that matters only
  for some configurations says so with :func:`only_if`, so that it is not even loaded otherwise
  (and its stage can be negotiated away).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from milterd.core.app import App
    from milterd.core.config import Config
    from milterd.session import Connection, Message
    from milterd.verdict import HeaderEdit, Verdict

PROJECT = "milterd"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


def only_if(predicate: Callable[[Config], bool]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a hook implementation as needed only when ``predicate(config)`` is true.

    The dispatcher built for a configuration leaves the implementation out when the predicate is
    false (evaluated once per configuration, at start and at each reload), e.g. a RCPT hook that
    only matters when certificate pins are configured::

        @hookimpl
        @only_if(lambda config: bool(config.peer_cert.pins))
        def milterd_rcpt_to(...): ...
    """

    def mark(function: Callable[..., Any]) -> Callable[..., Any]:
        function.milterd_only_if = predicate  # type: ignore[attr-defined]
        return function

    return mark


# -- lifecycle -------------------------------------------------------------------------------------

@hookspec
def milterd_configure(app: App, config: Config) -> None:
    """Called once when a plugin manager is built for ``config``: at start and after each
    successful reload (a reload builds a fresh manager; the old one keeps serving sessions that
    were already open).  Validate plugin-specific assumptions and precompute here, not per
    message.  Raising refuses the config (at start: exit 2; at reload: the old config stays).

    :param app: the running daemon's shared objects (metrics, policy-view store, stash).
    :param config: the validated configuration tree.
    :return: ignored.
    """


# -- SMTP stages -----------------------------------------------------------------------------------

@hookspec
def milterd_connect(app: App, config: Config, connection: Connection) -> None:
    """Called when the MTA reports a new SMTP connection (client address, port and name are set;
    TLS facts are not known yet).  Observation only: the MTA does not wait for it.  If it fails
    (``on_error = "tempfail"``), every transaction of this connection is tempfailed.

    :return: None.
    """


@hookspec
def milterd_helo(app: App, config: Config, connection: Connection) -> None:
    """Called for each HELO/EHLO (twice with STARTTLS: before and after the handshake).
    ``connection.helo`` is set.  Observation only; a failure tempfails the connection's later
    transactions, as for :func:`milterd_connect`.

    :return: None.
    """


@hookspec
def milterd_mail_from(app: App, config: Config, connection: Connection,
                      message: Message) -> Verdict | None:
    """Called at MAIL FROM with a fresh ``message`` (``sender`` set; ``queue_id`` usually not yet:
    Postfix assigns it after the first accepted RCPT).  ``connection.tls`` holds the TLS facts of
    this transaction.

    :return: a :class:`~milterd.verdict.Verdict` to refuse the transaction (the MTA answers
        MAIL FROM with its code), or ``None``/CONTINUE to go on.
    """


@hookspec
def milterd_rcpt_to(app: App, config: Config, connection: Connection, message: Message,
                    recipient: str) -> Verdict | None:
    """Called for each RCPT TO the MTA accepted itself; ``recipient`` is already appended to
    ``message.recipients``.  With Postfix, the policy-delegation request for this RCPT has been
    answered before this call (so facts from ``[policy]`` are available).

    :return: a verdict for this recipient only (reject/tempfail refuse this RCPT), or ``None``.
    """


@hookspec
def milterd_end_of_message(app: App, config: Config, connection: Connection,
                           message: Message) -> Verdict | None:
    """Called once the whole message was received: ``message.headers`` holds every header in
    arrival order (the MTA's own Received line excepted) and ``message.queue_id`` is set.

    :return: a verdict for the whole message, or ``None`` to accept it.
    """


@hookspec
def milterd_header_edits(app: App, config: Config, connection: Connection,
                         message: Message) -> list[HeaderEdit] | None:
    """Called at end of message, after all verdicts composed to *accept*.  The edits of all
    plugins are concatenated in hook-call order and applied deletions first, then additions.

    :return: a list of :class:`~milterd.verdict.AddHeader` / :class:`~milterd.verdict.DeleteHeader`,
        or ``None``.
    """


@hookspec
def milterd_message_done(app: App, config: Config, connection: Connection, message: Message,
                         verdict: Verdict) -> None:
    """Called exactly once per transaction that reached a verdict: refused at MAIL FROM or at
    every RCPT TO (then ``message.recipients`` is empty), or decided at end of message.  Not
    called for a transaction the client aborted (RSET, QUIT or disconnect before end of data).
    For counters and logs: counting here counts each message once.

    :param verdict: the final, composed verdict.
    :return: None.
    """


@hookspec
def milterd_close(app: App, config: Config, connection: Connection) -> None:
    """Called when the SMTP connection ends, whatever happened.  Release per-connection state.

    :return: None.
    """
