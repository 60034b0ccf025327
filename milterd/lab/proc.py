"""Running milterd as a real subprocess (as an admin would), for tests, demo and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from milterd.lab.net import wait_for_port, wait_for_unix_socket


class MilterdProcess:
    """``milterd run -c CONFIG`` in the background; ``start()`` returns once the socket answers."""

    def __init__(self, config_path: Path, socket_spec: str, *, log_path: Path,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 python: str = sys.executable):
        self.config_path = config_path
        self.python = python
        self.socket_spec = socket_spec
        self.log_path = log_path
        self.extra_args = extra_args
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> "MilterdProcess":
        log = open(self.log_path, "ab")
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        self.proc = subprocess.Popen(
            [self.python, "-m", "milterd", "run", "-c", str(self.config_path),
             *self.extra_args], stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        if not self.wait_ready(timeout):
            rc = self.proc.poll()
            self.stop()
            raise RuntimeError(f"milterd did not become ready (exit={rc}):\n{self.log_tail()}")
        return self

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        spec = self.socket_spec
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            left = max(0.1, deadline - time.monotonic())
            if spec.startswith(("unix:", "local:")):
                if wait_for_unix_socket(spec.split(":", 1)[1], timeout=min(left, 0.5)):
                    return True
            else:
                port_s, _, host = spec.split(":", 1)[1].partition("@")
                if wait_for_port(host or "127.0.0.1", int(port_s), timeout=min(left, 0.5)):
                    return True
        return False

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait for the PID (libmilter takes seconds to exit), SIGKILL as a last resort."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
