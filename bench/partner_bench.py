"""Per-message cost of the Domain Security decision with partner terms (#15), in one run.

    .venv/bin/python bench/partner_bench.py [--messages N] [--rounds R]

The built-in plugin's three hooks (MAIL FROM, end of message; what a covered message costs on
milterd's hot path, without the MTA) on generated messages, every sender distinct, for:

* ``uncovered`` — mail from a non-partner (the common case: the decision is not even reached);
* ``list`` — a partner from ``receive_domains`` with the global terms (what every partner cost
  before partner tables);
* ``table`` — a partner table with everything that costs: ``certificate_names`` (the certificate
  matches the second name), ``client_networks`` (IPv6, the client in the last network), key and
  certificate pins that do not match, a per-partner TLS minimum.

and, with the partner certificate watch (#18) on, ``list+watch`` / ``table+watch``: the same plus
the ``partner_watch`` plugin's ``milterd_message_done`` (a known certificate: the common case —
the sighting updates last_seen and is queued for the store; a queue put like the store spool's
never-blocking submit, with the full :func:`milterd.store.service.submit` lookup path), and
``uncovered+watch`` (the plugin's early return).

Prints microseconds per message (median of rounds) and the ratio to ``list``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from milterd.core.config import parse_config
from milterd.session import CertVerify, Connection, Message, TlsFacts
from milterd_plugins import domain_security as plugin
from milterd_plugins import partner_watch

CONFIG = parse_config("""
[domain_security]
receive_domains = ["woodgrovebank.test", ".contoso.test"]
[partners."hosted.test"]
receive = true
certificate_names = ["mx1.hoster.test", "mx.hoster.test"]
client_networks = ["192.0.2.0/24", "2001:db8:1::/48", "2001:db8::/32"]
pins = ["key-sha256:""" + "AB" * 32 + """", "cert-sha256:""" + "CD" * 32 + """"]
min_version = "TLSv1.3"
""")

CASES = {
    "uncovered": ("fabrikam.test", "mail.fabrikam.test", "192.0.2.7"),
    "list": ("woodgrovebank.test", "mail.woodgrovebank.test", "192.0.2.7"),
    "table": ("hosted.test", "mx.hoster.test", "IPv6:2001:db8::25"),
    "uncovered+watch": ("fabrikam.test", "mail.fabrikam.test", "192.0.2.7"),
    "list+watch": ("woodgrovebank.test", "mail.woodgrovebank.test", "192.0.2.7"),
    "table+watch": ("hosted.test", "mx.hoster.test", "IPv6:2001:db8::25"),
}


def _watch_app():
    """An app with a running watch state (history known) whose store submit is the real
    :func:`milterd.store.service.submit` into a spool-like never-blocking queue."""
    import queue

    from milterd.core.app import App
    from milterd.store import service as store_service
    from milterd.watch import state as st

    app = App(CONFIG)

    class _Spool:                        # Spool.submit: a bounded queue's put_nowait
        def __init__(self) -> None:
            self.q: queue.Queue = queue.Queue()

        def submit(self, item: dict) -> bool:
            self.q.put_nowait(item)
            return True

    class _Service:
        spools = {st.SPOOL: _Spool()}

    store_service._SERVICES[app] = _Service()  # type: ignore[assignment]
    state = st.WatchState(st.watch_metrics(app), CONFIG,
                          submit=lambda item: store_service.submit(app, st.SPOOL, item),
                          host="bench")
    state.merge_history([])
    st.set_current_state(app, state)
    return app, _Service.spools[st.SPOOL].q


WATCH_APP = None


def run(case: str, n: int, salt: int) -> float:
    global WATCH_APP
    domain, cn, client = CASES[case]
    watch = case.endswith("+watch")
    if watch and WATCH_APP is None:
        WATCH_APP = _watch_app()
    tls = TlsFacts(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", bits=256,
                   verify=CertVerify.OK, subject_cn=cn, issuer="Lab CA",
                   fingerprint_sha256="EF" * 32, pubkey_sha256="01" * 32, dialect="postfix")
    conn = Connection(id="bench", tls=tls, client_address=client)
    msgs = []
    for i in range(n):
        m = Message(sender=f"<u{salt}x{i}@{domain}>")
        m.headers.append(("From", f"User {i} <u{salt}x{i}@{domain}>"))
        msgs.append(m)
    if watch:
        app, q = WATCH_APP
        done = partner_watch.milterd_message_done
        start = time.perf_counter()
        for m in msgs:
            plugin.milterd_mail_from(config=CONFIG, connection=conn, message=m)
            plugin.milterd_end_of_message(config=CONFIG, connection=conn, message=m)
            done(app=app, connection=conn, message=m)
        elapsed = time.perf_counter() - start
        with q.mutex:                    # the spool's writer thread drains it (not timed)
            q.queue.clear()
    else:
        start = time.perf_counter()
        for m in msgs:
            plugin.milterd_mail_from(config=CONFIG, connection=conn, message=m)
            plugin.milterd_end_of_message(config=CONFIG, connection=conn, message=m)
        elapsed = time.perf_counter() - start
    last = msgs[-1].stash.get(plugin.ds.RESULT_KEY)
    expect = "none" if case.startswith("uncovered") else "pass"
    status = last.status if last is not None else "none"
    assert status == expect, (case, last)
    return elapsed / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    results: dict[str, list[float]] = {c: [] for c in CASES}
    for r in range(args.rounds):
        order = list(CASES)[r % len(CASES):] + list(CASES)[:r % len(CASES)]  # rotate the start
        for case in order:
            results[case].append(run(case, args.messages, r))
    base = statistics.median(results["list"])
    print(f"Domain Security decision per message ({args.messages} messages x {args.rounds} "
          "rounds, median):")
    for case, values in results.items():
        med = statistics.median(values)
        print(f"  {case:<16} {med:7.2f} µs   x{med / base:.2f} of list")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
