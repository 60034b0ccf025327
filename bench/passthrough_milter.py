"""The floor for any pymilter milter: subclass ``Milter.Base``, accept everything.

``Milter.Base`` marks every optional callback ``@nocallback``, so libmilter negotiates them away;
what remains is connect negotiation, end-of-message (CONTINUE) and close — per message (smtp-source
opens a connection per message) the minimum round trips a pymilter milter can cost.

``--stages helo,mail,rcpt,header`` also subscribes to those stages with empty callbacks (no reply
for helo/rcpt/header, a reply for mail — the shape milterd negotiates with Domain Security on and
no pins): what each subscribed stage costs a pymilter milter, whatever it does inside.

    python bench/passthrough_milter.py unix:/path/to/sock [--stages ...]  (socket 0666, loopback lab)
    python bench/passthrough_milter.py inet:PORT@127.0.0.1

Not named ``milter.py`` (that would shadow pymilter's C module).
"""

from __future__ import annotations

import argparse
import os
import sys

import Milter

_STAGE_FLAGS = {  # stage -> (skip flag, no-reply flag or 0 when the stage replies)
    "helo": (Milter.P_NOHELO, Milter.P_NR_HELO),
    "mail": (Milter.P_NOMAIL, 0),
    "rcpt": (Milter.P_NORCPT, Milter.P_NR_RCPT),
    "header": (Milter.P_NOHDRS, Milter.P_NR_HDR),
}


class PassThrough(Milter.Base):
    pass


def staged(stages: set[str]) -> type[Milter.Base]:
    skip = Milter.P_NOCONNECT | Milter.P_NOBODY | Milter.P_NODATA | Milter.P_NOEOH | \
        Milter.P_NOUNKNOWN
    noreply = 0
    for name, (skip_flag, nr_flag) in _STAGE_FLAGS.items():
        if name in stages:
            noreply |= nr_flag
        else:
            skip |= skip_flag

    class Staged(Milter.Base):
        def negotiate(self, opts):
            opts[0] = 0
            opts[1] = opts[1] & (skip | noreply)
            opts[2] = opts[3] = 0
            return Milter.CONTINUE

        def hello(self, name):
            return Milter.NOREPLY

        def envfrom(self, *a):
            return Milter.CONTINUE

        def envrcpt(self, *a):
            return Milter.NOREPLY

        def header(self, name, value):
            return Milter.NOREPLY

    return Staged


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--stages", default="", help="comma list of helo,mail,rcpt,header")
    a = ap.parse_args()
    if a.spec.startswith("unix:") and os.path.exists(a.spec[5:]):
        os.unlink(a.spec[5:])
    stages = {s for s in a.stages.split(",") if s}
    unknown = stages - set(_STAGE_FLAGS)
    if unknown:
        ap.error(f"unknown stages: {sorted(unknown)}")
    Milter.factory = staged(stages) if stages else PassThrough
    Milter.set_flags(0)
    # The lab's Postfix runs smtpd as user "postfix": let it reach the unix socket.
    os.umask(0o111)
    Milter.runmilter("passthrough", a.spec, timeout=240)
    return 0


if __name__ == "__main__":
    sys.exit(main())
