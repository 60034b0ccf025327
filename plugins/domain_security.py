"""Built-in plugin: inbound Domain Security (Exchange's TLSReceiveDomainSecureList).

Mail covered by a receive partner (``receive_domains`` or ``[partners]`` with ``receive``; any plausible reading of the envelope sender or of any
``From:`` field, :mod:`milterd.policy.coverage`) must have arrived over TLS at
the partner's strength with a client certificate that is trusted and names the domain (or one of
the partner's ``certificate_names``), or is pinned for it (certificate or public key), from the
partner's ``client_networks`` when it has them.  A partner in ``enforce`` mode has a failure
refused (550 5.7.1, or 450 4.7.1 with ``failure_action = "tempfail"``); ``report`` never refuses.  The decision logic is the pure
:mod:`milterd.policy.domain_security`; this module only decides *when* to apply it:

* MAIL FROM: envelope coverage, refused as early as possible — except a pinned partner on
  Postfix, whose fingerprint only arrives with the RCPT-stage policy request;
* RCPT TO: that deferred case;
* end of message: ``From:`` coverage (the spoof of a partner's name from elsewhere), and the
  final result every other plugin reads from ``message.stash[RESULT_KEY]``.

Every decision reads the session's ``config`` (the one the connection started under), never the
live ``app.config``: a reload does not change the policy of a session already open.
"""

from __future__ import annotations

from milterd.policy import domain_security as ds
from milterd.hookspecs import hookimpl, only_if
from milterd.policy.coverage import envelope_covered, from_covered, is_from_field
from milterd.session import StashKey
from milterd.verdict import Verdict, reject, tempfail


def _refusal(result: ds.Result) -> Verdict | None:
    # The partner's own mode and failure action travel with its result (ds.combine lets an
    # enforce partner's failure win over a report partner's).
    if not result.refuses:
        return None
    text = ds.failure_text(result)
    if result.failure_action == "tempfail":
        return tempfail(text, reason=result.reason or "")
    return reject(text, reason=result.reason or "")


_ENVELOPE_ENTRIES: StashKey[tuple[str, ...]] = StashKey("domain_security.envelope_entries")


def _envelope_entries(config, message) -> tuple[str, ...]:
    # Computed once per message: MAIL FROM, RCPT and end of message all need it.
    entries = message.stash.get(_ENVELOPE_ENTRIES)
    if entries is None:
        entries = envelope_covered(message.sender, config.receive_entries, keep_dot=True)
        message.stash[_ENVELOPE_ENTRIES] = entries
    return entries


def _receive_list(config) -> bool:
    return bool(config.receive_entries)


def _pinned_receive_partner(config) -> bool:
    return any(p.receive and p.pinned for p in config.partners)


def _evaluate(config, connection, entries) -> ds.Result:
    return ds.combine([ds.evaluate(connection.tls, config.partner(e),
                                   client_address=connection.client_address) for e in entries])


@hookimpl
@only_if(_receive_list)
def milterd_mail_from(config, connection, message):
    entries = _envelope_entries(config, message)
    if not entries:
        return None
    result = _evaluate(config, connection, entries)
    if result.status == ds.FAIL and ds.may_still_pass(connection.tls,
                                                       config.partner(result.partner)):
        return None  # decided at RCPT, once Postfix's policy request brought the fingerprints
    message.stash[ds.RESULT_KEY] = result
    return _refusal(result)


@hookimpl
@only_if(lambda config: _receive_list(config) and _pinned_receive_partner(config))
def milterd_rcpt_to(config, connection, message, recipient):
    # Pinned partners on Postfix are decided here, with the facts of the policy request Postfix
    # made for this very RCPT; every RCPT gets the same answer for the same facts.  Without pins,
    # Postfix need not wait for milterd at RCPT at all (one round trip less per recipient).
    entries = _envelope_entries(config, message)
    if not entries:
        return None
    result = _evaluate(config, connection, entries)
    message.stash[ds.RESULT_KEY] = result
    return _refusal(result)


@hookimpl
@only_if(_receive_list)
def milterd_end_of_message(config, connection, message):
    entries = list(_envelope_entries(config, message))
    froms = [v for n, v in message.headers if is_from_field(n)]
    for e in from_covered(froms, config.receive_entries, keep_dot=True):
        if e not in entries:
            entries.append(e)
    result = _evaluate(config, connection, entries)
    message.stash[ds.RESULT_KEY] = result
    return _refusal(result)
