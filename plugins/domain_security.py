"""Built-in plugin: inbound Domain Security (Exchange's TLSReceiveDomainSecureList).

Mail covered by ``receive_domains`` (any plausible reading of the envelope sender or of any
``From:`` field, :mod:`milterd.policy.coverage`) must have arrived over TLS at
the configured strength with a client certificate that is trusted and names the domain, or is
pinned for it.  In ``enforce`` mode a failure is refused (550 5.7.1, or 450 4.7.1 with
``failure_action = "tempfail"``); ``report`` mode never refuses.  The decision logic is the pure
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


def _refusal(config, result: ds.Result) -> Verdict | None:
    cfg = config.domain_security
    if result.status != ds.FAIL or cfg.mode != "enforce":
        return None
    text = ds.failure_text(result)
    if cfg.failure_action == "tempfail":
        return tempfail(text, reason=result.reason or "")
    return reject(text, reason=result.reason or "")


_ENVELOPE_DOMAINS: StashKey[tuple[str, ...]] = StashKey("domain_security.envelope_domains")


def _envelope_domains(config, message) -> tuple[str, ...]:
    # Computed once per message: MAIL FROM, RCPT and end of message all need it.
    domains = message.stash.get(_ENVELOPE_DOMAINS)
    if domains is None:
        domains = envelope_covered(message.sender, config.domain_security.receive_domains)
        message.stash[_ENVELOPE_DOMAINS] = domains
    return domains


def _receive_list(config) -> bool:
    return bool(config.domain_security.receive_domains)


def _evaluate(config, connection, domains) -> ds.Result:
    return ds.combine([ds.evaluate(connection.tls, d, config) for d in domains])


@hookimpl
@only_if(_receive_list)
def milterd_mail_from(config, connection, message):
    domains = _envelope_domains(config, message)
    if not domains:
        return None
    result = _evaluate(config, connection, domains)
    if result.status == ds.FAIL and ds.may_still_pass(connection.tls, result.domain, config):
        return None  # decided at RCPT, once Postfix's policy request brought the fingerprint
    message.stash[ds.RESULT_KEY] = result
    return _refusal(config, result)


@hookimpl
@only_if(lambda config: _receive_list(config) and bool(config.peer_cert.pins))
def milterd_rcpt_to(config, connection, message, recipient):
    # Pinned partners on Postfix are decided here, with the facts of the policy request Postfix
    # made for this very RCPT; every RCPT gets the same answer for the same facts.  Without pins,
    # Postfix need not wait for milterd at RCPT at all (one round trip less per recipient).
    domains = _envelope_domains(config, message)
    if not domains:
        return None
    result = _evaluate(config, connection, domains)
    message.stash[ds.RESULT_KEY] = result
    return _refusal(config, result)


@hookimpl
@only_if(_receive_list)
def milterd_end_of_message(config, connection, message):
    receive = config.domain_security.receive_domains
    domains = list(_envelope_domains(config, message))
    froms = [v for n, v in message.headers if is_from_field(n)]
    for d in from_covered(froms, receive):
        if d not in domains:
            domains.append(d)
    result = _evaluate(config, connection, domains)
    message.stash[ds.RESULT_KEY] = result
    return _refusal(config, result)
