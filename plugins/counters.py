"""Built-in plugin: the secure-mail counters (each message counted once, at its verdict).

``milterd_messages_total{verdict}``, ``milterd_domain_secured_messages_received_total{domain}``
and ``milterd_domain_security_failures_total{domain,reason}`` (counted in enforce and report
mode alike).  Domains are always configured list entries, so label sets stay bounded.
"""

from __future__ import annotations

from milterd.policy import domain_security as ds
from milterd.hookspecs import hookimpl
from milterd.verdict import Action


@hookimpl
def milterd_message_done(app, message, verdict):
    m = app.metrics
    m.child(m.messages, verdict.metric_name).inc()
    result = message.stash.get(ds.RESULT_KEY)
    if result is None or result.domain is None:
        return
    if result.status == ds.FAIL:
        m.child(m.domain_security_failures, result.domain, result.reason).inc()
    elif result.status == ds.PASS and verdict.action is Action.CONTINUE:
        m.child(m.domain_secured_received, result.domain).inc()
