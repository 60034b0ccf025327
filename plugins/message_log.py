"""Built-in plugin: one structured log line per message (the milter's verbose protocol log).

With ``--log-format json`` the fields are JSON keys; in text mode they are ``key=value`` pairs
(rendered by :class:`milterd.core.logs.TextFormatter`, which repr-quotes peer-supplied strings so
they cannot forge log lines).
"""

from __future__ import annotations

import logging

from milterd.policy import domain_security as ds
from milterd.hookspecs import hookimpl

log = logging.getLogger("milterd.message")


@hookimpl(trylast=True)
def milterd_message_done(connection, message, verdict):
    if not log.isEnabledFor(logging.INFO):
        return
    tls = connection.tls
    result = message.stash.get(ds.RESULT_KEY) or ds.NOT_COVERED
    fields = {
        "queue_id": message.queue_id,
        "conn": connection.id,
        "client": connection.client_address,
        "client_port": connection.client_port,
        "helo": connection.helo,
        "sender": message.sender,
        "recipients": len(message.recipients),
        "tls": tls.version or "none",
        "cipher": tls.cipher,
        "bits": tls.bits,
        "verify": tls.verify.value,
        "subject": tls.subject_dn or tls.subject_cn,
        "issuer": tls.issuer,
        "fingerprint": tls.fingerprint_sha256,
        "pubkey_fingerprint": tls.pubkey_sha256,
        "verdict": verdict.metric_name,
        "reply": f"{verdict.code} {verdict.reply_text()}".strip() if verdict.code else None,
        "plugin": verdict.plugin or None,
        "domain_secure": result.status,
        "domain": result.domain,
        "partner": result.partner,
        "match": result.match,
        "reason": result.reason or (verdict.reason or None),
    }
    # The formatter renders the fields (key=value in text mode, keys in JSON mode).  Built with
    # makeRecord+handle rather than log.info: a line per message should not pay for walking the
    # stack to find the caller's file and line, which this line does not print.
    log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, "message", (), None,
                              extra={"fields": fields}))
