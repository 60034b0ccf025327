"""Built-in plugin: inbound Domain Security (Exchange's TLSReceiveDomainSecureList).

Mail covered by ``receive_domains`` (envelope sender or ``From:``) must have arrived over TLS at
the configured strength with a client certificate that is trusted and names the domain, or is
pinned for it.  In ``enforce`` mode a failure is refused (550 5.7.1, or 450 4.7.1 with
``failure_action = "tempfail"``); ``report`` mode never refuses.  The decision logic is the pure
:mod:`milterd.domain_security`; this module only decides *when* to apply it:

* MAIL FROM: envelope coverage, refused as early as possible — except a pinned partner on
  Postfix, whose fingerprint only arrives with the RCPT-stage policy request;
* RCPT TO: that deferred case;
* end of message: ``From:`` coverage (the spoof of a partner's name from elsewhere), and the
  final result every other plugin reads from ``message.stash[RESULT_KEY]``.
"""

from __future__ import annotations

from milterd import domain_security as ds
from milterd.hookspecs import hookimpl, only_if
from milterd.names import address_domain
from milterd.session import StashKey
from milterd.verdict import Verdict, reject, tempfail


def _refusal(app, result: ds.Result) -> Verdict | None:
    cfg = app.config.domain_security
    if result.status != ds.FAIL or cfg.mode != "enforce":
        return None
    text = ds.failure_text(result)
    if cfg.failure_action == "tempfail":
        return tempfail(text, reason=result.reason or "")
    return reject(text, reason=result.reason or "")


_ENVELOPE_DOMAIN: StashKey[str | None] = StashKey("domain_security.envelope_domain")


def _envelope_domain(app, message) -> str | None:
    # Computed once per message: MAIL FROM, RCPT and end of message all need it.
    if _ENVELOPE_DOMAIN not in message.stash:
        message.stash[_ENVELOPE_DOMAIN] = ds.covered_domain(
            address_domain(message.sender), app.config.domain_security.receive_domains)
    return message.stash[_ENVELOPE_DOMAIN]


def _receive_list(config) -> bool:
    return bool(config.domain_security.receive_domains)


@hookimpl
@only_if(_receive_list)
def milterd_mail_from(app, connection, message):
    domain = _envelope_domain(app, message)
    if domain is None:
        return None
    result = ds.evaluate(connection.tls, domain, app.config)
    if result.status == ds.FAIL and ds.may_still_pass(connection.tls, domain, app.config):
        return None  # decided at RCPT, once Postfix's policy request brought the fingerprint
    message.stash[ds.RESULT_KEY] = result
    return _refusal(app, result)


@hookimpl
@only_if(lambda config: _receive_list(config) and bool(config.peer_cert.pins))
def milterd_rcpt_to(app, connection, message, recipient):
    # Only pinned partners on Postfix are decided here; without pins, Postfix need not wait for
    # milterd at RCPT at all (one round trip less per recipient).
    domain = _envelope_domain(app, message)
    if domain is None or ds.RESULT_KEY in message.stash:
        return None
    result = ds.evaluate(connection.tls, domain, app.config)
    if result.status == ds.FAIL:
        message.stash[ds.RESULT_KEY] = result
    return _refusal(app, result)


@hookimpl
@only_if(_receive_list)
def milterd_end_of_message(app, connection, message):
    receive = app.config.domain_security.receive_domains
    domains = []
    env = _envelope_domain(app, message)
    if env:
        domains.append(env)
    for d in ds.from_header_domains(message.header_values("From")):
        cd = ds.covered_domain(d, receive)
        if cd and cd not in domains:
            domains.append(cd)
    result = ds.combine([ds.evaluate(connection.tls, d, app.config) for d in domains])
    message.stash[ds.RESULT_KEY] = result
    return _refusal(app, result)
