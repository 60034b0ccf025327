"""Loopback helpers: ephemeral ports and bounded readiness checks (no fixed sleeps)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable, Optional

from milterd.lab.wait import wait_until


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    """Could a listener bind ``host:port`` now (nothing else holds it)?"""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def port_accepts(host: str, port: int) -> bool:
    """True if a TCP connection to ``host``:``port`` succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def unix_socket_accepts(path: str | Path) -> bool:
    """True if a connection to the unix stream socket at ``path`` succeeds now."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(str(path))
            return True
    except OSError:
        return False


class _Gone(Exception):
    pass


def _ready(check: Callable[[], bool], alive: Optional[Callable[[], bool]]) -> Callable[[], bool]:
    def probe() -> bool:
        if check():
            return True
        if alive is not None and not alive():
            raise _Gone
        return False
    return probe


def _wait(check: Callable[[], bool], timeout: float, what: str,
          alive: Optional[Callable[[], bool]]) -> bool:
    try:
        return wait_until(_ready(check, alive), timeout, what)
    except (AssertionError, _Gone):
        return False


def wait_for_port(host: str, port: int, timeout: float = 15.0, *,
                  alive: Optional[Callable[[], bool]] = None) -> bool:
    """Wait (bounded) until ``host``:``port`` accepts; False on timeout or once ``alive()`` is
    false (the process that should listen has gone)."""
    return _wait(lambda: port_accepts(host, port), timeout, f"{host}:{port}", alive)


def wait_for_unix_socket(path: str | Path, timeout: float = 15.0, *,
                         alive: Optional[Callable[[], bool]] = None) -> bool:
    """Wait (bounded) until the unix socket at ``path`` accepts; False on timeout or once
    ``alive()`` is false."""
    return _wait(lambda: unix_socket_accepts(path), timeout, str(path), alive)


def listen_inodes(address: str, port: int) -> set[str]:
    """Inodes of the sockets LISTENing on address:port (/proc/net/tcp[6]; no connection)."""
    if ":" in address:
        raw = socket.inet_pton(socket.AF_INET6, address)
        host = "".join(raw[i:i + 4][::-1].hex().upper() for i in range(0, 16, 4))
        table = "/proc/net/tcp6"
    else:
        host = socket.inet_aton(address)[::-1].hex().upper()
        table = "/proc/net/tcp"
    want = f"{host}:{port:04X}"
    found = set()
    try:
        with open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1] == want and parts[3] == "0A":
                    found.add(parts[9])
    except OSError:
        pass
    return found


def pid_listens(pid: int, address: str, port: int) -> bool:
    """True if process ``pid`` itself holds the LISTEN socket on address:port."""
    inodes = listen_inodes(address, port)
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False
