"""Built-in plugin: the partner certificate watch, inbound (#18).

After each message Domain Security covered (``result.partner`` set) from a client that presented
a certificate (a fingerprint, a public-key fingerprint or a subject), the certificate is handed to
the watch (:meth:`milterd.watch.state.WatchState.observe`: O(1), no I/O, never waits for the
store).  ``trylast``: the counters and the log have run.  Nothing here may refuse mail: after the
message nothing is left to refuse, and an error is logged (rate-limited) and swallowed, never
raised into the dispatcher.  Without a running watch (``milterd.watch.service``) it does nothing.
"""

from __future__ import annotations

import logging
import time

from milterd.hookspecs import hookimpl
from milterd.policy import domain_security as ds
from milterd.watch import state as watch

log = logging.getLogger("milterd.watch")

_last_error = [0.0]


@hookimpl(trylast=True)
def milterd_message_done(app, connection, message):
    try:
        result = message.stash.get(ds.RESULT_KEY)
        if result is None or result.partner is None:
            return
        st = watch.current_state(app)
        if st is None:
            return
        tls = connection.tls
        subject = tls.subject_dn or tls.subject_cn
        if not (tls.fingerprint_sha256 or tls.pubkey_sha256 or subject):
            return
        st.observe(result.partner, watch.INBOUND, cert_sha256=tls.fingerprint_sha256,
                   pubkey_sha256=tls.pubkey_sha256, subject=subject, issuer=tls.issuer,
                   verify=tls.verify.value, result=result.status, reason=result.reason,
                   mta=connection.mta)
    except Exception:  # noqa: BLE001 - never into the milter
        now = time.monotonic()
        if now - _last_error[0] > 60:
            _last_error[0] = now
            log.exception("partner watch: recording a certificate failed (logged at most once "
                          "a minute; mail is not affected)")
