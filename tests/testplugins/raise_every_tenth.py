"""Raises at end of message on exactly one message in ten (the 10th, 20th, … it sees).

Decided by a process-wide counter (thread-safe: libmilter calls hooks from several threads), not
by content, so the test cannot tell in advance which messages fail: every message it raised on is
appended (its Subject, one per line) to the file named by ``MILTERD_TEST_RECORD``.
"""

import os
import threading

from milterd.hookspecs import hookimpl

_lock = threading.Lock()
_seen = 0


@hookimpl
def milterd_end_of_message(message):
    global _seen
    with _lock:
        _seen += 1
        fire = _seen % 10 == 0
        if fire:
            path = os.environ.get("MILTERD_TEST_RECORD")
            if path:
                subject = (message.header_values("Subject") or [""])[0]
                with open(path, "a") as f:
                    f.write(subject + "\n")
    if fire:
        raise RuntimeError("test plugin exploded (every tenth message)")
    return None
