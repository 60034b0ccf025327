"""Run the reference MTA: ``python -m milterd.mta --config FILE.toml``.

Readiness: once listening, prints ``READY <port>`` on stdout (flushed) and
writes ``ready_file`` when configured — tests wait for either, never sleep.
SIGTERM/SIGINT stop it cleanly; ``kill -9`` is survivable by design (the
queue is durable, a restart delivers what was accepted).

In-process use (tests, demos)::

    with MtaThread(cfg) as mta:      # starts, waits until listening
        smtplib.SMTP("127.0.0.1", mta.port)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from .config import MtaConfig, load_mta_config
from .delivery import OutboundCallback
from .server import Mta

log = logging.getLogger("milterd.mta")


async def _serve(cfg: MtaConfig, announce: bool) -> None:
    mta = Mta(cfg)
    await mta.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if announce:
        print("READY %d" % mta.port, flush=True)
    try:
        await stop.wait()
    finally:
        await mta.stop()


def run_mta(cfg: MtaConfig, *, announce: bool = True) -> None:
    """Run in the foreground until SIGTERM/SIGINT."""
    asyncio.run(_serve(cfg, announce))


class MtaThread:
    """Run an :class:`Mta` on its own event loop in a daemon thread."""

    def __init__(self, cfg: MtaConfig, *,
                 on_outbound_result: Optional[OutboundCallback] = None) -> None:
        self.cfg = cfg
        self._callback = on_outbound_result
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mta", daemon=True)
        self.mta: Optional[Mta] = None

    @property
    def port(self) -> int:
        assert self.mta is not None
        return self.mta.port

    def start(self, timeout: float = 10.0) -> "MtaThread":
        self._thread.start()

        async def boot() -> Mta:
            mta = Mta(self.cfg, on_outbound_result=self._callback)
            await mta.start()
            return mta

        self.mta = asyncio.run_coroutine_threadsafe(boot(), self._loop).result(timeout)
        return self

    def call(self, coro_fn, timeout: float = 30.0):  # type: ignore[no-untyped-def]
        """Run ``coro_fn(mta)`` on the MTA's loop and return its result."""
        assert self.mta is not None
        return asyncio.run_coroutine_threadsafe(coro_fn(self.mta), self._loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self.mta is not None:
            asyncio.run_coroutine_threadsafe(self.mta.stop(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> "MtaThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m milterd.mta",
                                     description="milterd reference MTA (tests and demos)")
    parser.add_argument("--config", "-c", type=Path, required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # aiosmtpd logs every command line (AUTH arguments included) at INFO on
    # "mail.log"; our protocol log is the redacted record of the dialogue.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    try:
        cfg = load_mta_config(args.config)
    except (OSError, ValueError) as exc:
        print("config error: %s" % exc, file=sys.stderr)
        return 2
    run_mta(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
