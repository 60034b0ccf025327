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
--stage-cpu OUT   CPU time (time.thread_time) of every libmilter → Python entry point, summed per
                  entry point over all threads and written at exit as "name calls total_s": what
                  each stage costs in CPU, GIL waits excluded.
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
import time

import Milter

from milterd.inbound import milter_adapter as adapter

from milterd.core import app, daemon

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


_cpu: dict[str, list[float]] = {}


def _cpu_timed(name, fn, by_hook=False):
    def wrapper(*args, **kwargs):
        t0 = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            dt = time.thread_time() - t0
            key = f"{name}({args[1]})" if by_hook else name
            acc = _cpu.get(key)
            if acc is None:
                acc = _cpu.setdefault(key, [0, 0.0])
            acc[0] += 1      # under the GIL: no lost updates between bytecodes that matter here
            acc[1] += dt
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
    ap.add_argument("--stage-cpu")
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
    if a.stage_cpu:
        for name in ("connect_callback", "close_callback", "negotiate_callback"):
            setattr(Milter, name, _cpu_timed(name, getattr(Milter, name)))
        for name in ("hello", "envfrom_bytes", "envrcpt_bytes", "header_bytes", "eom", "abort"):
            setattr(adapter.MilterSession, name,
                    _cpu_timed(name, getattr(adapter.MilterSession, name)))
        # inside the callbacks (nested: these are part of the totals above), prefixed "  "
        for name in ("_apply", "getsymval", "_observe", "_refresh_tls", "_client_from_macros",
                     "_join_policy_view", "__init__"):
            setattr(adapter.MilterSession, name,
                    _cpu_timed("  " + name, getattr(adapter.MilterSession, name)))
        for name in ("verdict", "notify"):
            setattr(app.Dispatcher, name,
                    _cpu_timed("  " + name, getattr(app.Dispatcher, name), by_hook=True))
        app.Dispatcher.header_edits = _cpu_timed("  header_edits", app.Dispatcher.header_edits)
    try:
        return daemon.run(a.config)
    finally:
        if a.stage_cpu:
            with open(a.stage_cpu, "w") as f:
                for name, (calls, total) in sorted(_cpu.items()):
                    f.write(f"{name} {calls} {total:.6f}\n")
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
