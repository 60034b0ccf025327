"""Built-in plugin: the TLS trace header that cannot be forged.

Every accepted message leaves with exactly one ``[stamp] header``: all copies that arrived with
the message are deleted first — whatever their case, folding or number — then milterd's own is
added at the top.  The value's grammar and quoting live in :mod:`milterd.policy.stamp`.
"""

from __future__ import annotations

from milterd.policy import domain_security as ds
from milterd.hookspecs import hookimpl
from milterd.policy.stamp import stamp_value
from milterd.verdict import AddHeader, DeleteHeader


@hookimpl
def milterd_header_edits(config, connection, message):
    name = config.stamp.header  # the session's: the adapter records copies of this very name
    lname = name.lower()
    copies = sum(1 for n, _ in message.headers if n.lower() == lname)
    edits: list = [DeleteHeader(name, i) for i in range(1, copies + 1)]
    result = message.stash.get(ds.RESULT_KEY) or ds.NOT_COVERED
    edits.append(AddHeader(name, stamp_value(connection.tls, result.status, result.domain,
                                             result.reason, partner=result.partner,
                                             match=result.match), 0))
    return edits
