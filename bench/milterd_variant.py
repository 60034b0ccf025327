"""``milterd run -c CONFIG`` with experimental tweaks, for the benchmark's what-if runs.

    python bench/milterd_variant.py CONFIG [--profile OUT.txt] [--switch-interval S]
                                           [--queue-log]

Nothing in milterd/ is changed; each option patches the running process from outside:

--profile OUT     cProfile around every libmilter → Python entry point (negotiate, connect, helo,
                  MAIL, RCPT, header, eom, abort, close), one profile per libmilter thread (cProfile
                  only sees the thread that enabled it), merged and written as pstats text at exit.
                  Times are wall-clock: they include waiting for the GIL and for locks.
                  (py-spy cannot attach here: "Failed to find python version from target process".)
--switch-interval sys.setswitchinterval(S) (CPython's default is 0.005 s).
--queue-log       the log handler milterd installs is moved behind a QueueHandler/QueueListener: the
                  libmilter threads only enqueue records, one thread formats and writes them.
(TCP_NODELAY on inet listeners and the graceful SIGTERM stop are in milterd itself now.)
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import logging
import logging.handlers
import pstats
import queue
import sys
import threading

import Milter

from milterd import adapter, daemon

_local = threading.local()
_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()


def _profiled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        p = getattr(_local, "p", None)
        if p is None:
            p = _local.p = cProfile.Profile()
            with _lock:
                _profiles.append(p)
        p.enable()
        try:
            return fn(*args, **kwargs)
        finally:
            p.disable()
    return wrapper


def _queue_logging(original):
    def setup(config, log_format=None):
        original(config, log_format)
        root = logging.getLogger()
        handlers = list(root.handlers)
        q: queue.SimpleQueue = queue.SimpleQueue()
        listener = logging.handlers.QueueListener(q, *handlers, respect_handler_level=True)
        listener.start()
        root.handlers[:] = [logging.handlers.QueueHandler(q)]
    return setup


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--profile")
    ap.add_argument("--switch-interval", type=float)
    ap.add_argument("--queue-log", action="store_true")
    a = ap.parse_args()
    if a.switch_interval:
        sys.setswitchinterval(a.switch_interval)
    if a.queue_log:
        daemon.setup_logging = _queue_logging(daemon.setup_logging)
    if a.profile:
        for name in ("connect_callback", "close_callback", "negotiate_callback"):
            setattr(Milter, name, _profiled(getattr(Milter, name)))
        for name in ("hello", "envfrom_bytes", "envrcpt_bytes", "header_bytes", "eom", "abort"):
            setattr(adapter.MilterSession, name, _profiled(getattr(adapter.MilterSession, name)))
    try:
        return daemon.run(a.config)
    finally:
        if a.profile:
            with _lock:
                profiles = list(_profiles)
            buf = io.StringIO()
            if profiles:
                st = pstats.Stats(profiles[0], stream=buf)
                for p in profiles[1:]:
                    st.add(p)
                st.sort_stats("tottime").print_stats(25)
                st.sort_stats("cumulative").print_stats(35)
            with open(a.profile, "w") as f:
                f.write(buf.getvalue())


if __name__ == "__main__":
    sys.exit(main())
