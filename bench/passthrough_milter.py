"""The floor for any pymilter milter: subclass ``Milter.Base``, accept everything.

``Milter.Base`` marks every optional callback ``@nocallback``, so libmilter negotiates them away;
what remains is connect negotiation, end-of-message (CONTINUE) and close — per message (smtp-source
opens a connection per message) the minimum round trips a pymilter milter can cost.

    python bench/passthrough_milter.py unix:/path/to/sock     (socket created 0666, loopback lab)
    python bench/passthrough_milter.py inet:PORT@127.0.0.1

Not named ``milter.py`` (that would shadow pymilter's C module).
"""

from __future__ import annotations

import os
import sys

import Milter


class PassThrough(Milter.Base):
    pass


def main() -> int:
    spec = sys.argv[1]
    if spec.startswith("unix:") and os.path.exists(spec[5:]):
        os.unlink(spec[5:])
    Milter.factory = PassThrough
    Milter.set_flags(0)
    # The lab's Postfix runs smtpd as user "postfix": let it reach the unix socket.
    os.umask(0o111)
    Milter.runmilter("passthrough", spec, timeout=240)
    return 0


if __name__ == "__main__":
    sys.exit(main())
