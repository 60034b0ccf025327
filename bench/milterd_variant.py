"""``milterd run -c CONFIG`` with experimental tweaks, for the benchmark's what-if runs.

    python bench/milterd_variant.py CONFIG [--profile OUT.txt] [--switch-interval S]
                                           [--queue-log] [--block-term] [--tcp-nodelay]

Nothing in milterd/ is changed; each option patches the running process from outside:

--profile OUT     cProfile around every libmilter → Python entry point (negotiate, connect, helo,
                  MAIL, RCPT, header, eom, abort, close), one profile per libmilter thread (cProfile
                  only sees the thread that enabled it), merged and written as pstats text at exit.
                  Times are wall-clock: they include waiting for the GIL and for locks.
                  (py-spy cannot attach here: "Failed to find python version from target process".)
--switch-interval sys.setswitchinterval(S) (CPython's default is 0.005 s).
--queue-log       the log handler milterd installs is moved behind a QueueHandler/QueueListener: the
                  libmilter threads only enqueue records, one thread formats and writes them.
--tcp-nodelay     set TCP_NODELAY on libmilter's listening inet socket right after opensocket();
                  Linux hands it on to every accepted socket, so milterd's replies are not held
                  back by Nagle's algorithm (libmilter writes e.g. addheader and the final reply
                  as separate small segments).
--block-term      block SIGTERM/SIGINT in every thread before milterd starts its side threads, so
                  libmilter's signal thread gets them (graceful stop) instead of a side thread whose
                  default action kills the process.  Implied by --profile (the dump needs an exit).
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
import os
import signal
import socket
import sys
import threading

import Milter
import milter

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


def _nodelay_listener(original):
    def opensocket(rmsock):
        result = original(rmsock)
        for fd in map(int, os.listdir("/proc/self/fd")):
            try:
                s = socket.socket(fileno=fd)
            except OSError:
                continue
            try:
                if (s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM
                        and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            finally:
                s.detach()
        return result
    return opensocket


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--profile")
    ap.add_argument("--switch-interval", type=float)
    ap.add_argument("--queue-log", action="store_true")
    ap.add_argument("--block-term", action="store_true")
    ap.add_argument("--tcp-nodelay", action="store_true")
    a = ap.parse_args()
    if a.block_term or a.profile:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    if a.switch_interval:
        sys.setswitchinterval(a.switch_interval)
    if a.tcp_nodelay:
        milter.opensocket = _nodelay_listener(milter.opensocket)
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
