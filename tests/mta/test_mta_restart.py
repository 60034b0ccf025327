"""Durability: kill -9 right after the 250, restart, the message is delivered."""

from __future__ import annotations

import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

from mta_helpers import MESSAGE, maildir_messages
from milterd.lab.wait import wait_until
from mta_fixtures import (  # noqa: F401 - pytest fixtures, used by name
    make_mta, no_unexpected_warnings, pki)

WG = "woodgrovebank.test"


def _toml(path: Path, **values: object) -> None:
    lines = []
    tables = []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append("[%s]\n" % key + "".join('"%s" = "%s"\n' % kv for kv in value.items()))
        elif isinstance(value, (list, tuple)):
            lines.append("%s = [%s]" % (key, ", ".join('"%s"' % v for v in value)))
        elif isinstance(value, (int, float)):
            lines.append("%s = %s" % (key, value))
        else:
            lines.append('%s = "%s"' % (key, value))
    path.write_text("\n".join(lines) + "\n" + "\n".join(tables))


def _start(config: Path) -> tuple[subprocess.Popen, int]:  # type: ignore[type-arg]
    proc = subprocess.Popen([sys.executable, "-m", "milterd.mta", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=str(Path(__file__).parents[2]))
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until READY (or EOF if it died)
    assert line.startswith("READY "), "MTA did not start: %r" % line
    return proc, int(line.split()[1])


def _stop(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    if proc.stdout is not None:
        proc.stdout.close()


def test_kill_9_after_250_then_restart_delivers(tmp_path, pki, make_mta):
    # The next hop is down during the first run (a bound, non-listening port
    # refuses connections), so the message can only survive in the queue.
    hold = socket.socket()
    hold.bind(("127.0.0.1", 0))
    next_hop_port = hold.getsockname()[1]
    base = tmp_path / "sender"
    config = tmp_path / "sender.toml"
    _toml(config, hostname="mx.contoso.test", listen_host="127.0.0.1", listen_port=0,
          local_domains=["contoso.test"], maildir_root=str(base / "maildir"),
          queue_dir=str(base / "queue"), protocol_log=str(base / "protocol.log"),
          tls_cert=str(pki.contoso_server.cert_path), tls_key=str(pki.contoso_server.key_path),
          ca_files=[str(pki.ca.cert_path)], retry_base=0.2, retry_max_delay=1.0,
          routes={WG: "127.0.0.1:%d" % next_hop_port})

    proc, port = _start(config)
    try:
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
        smtp.ehlo("client.test")
        smtp.mail("carol@contoso.test")
        smtp.rcpt("dave@%s" % WG)
        code, text = smtp.data(MESSAGE)
        assert code == 250
        proc.kill()  # SIGKILL right after the 250, by PID
        proc.wait(10)
        smtp.close()
    finally:
        _stop(proc)
    queued = list((base / "queue" / "active").iterdir())
    assert len(queued) == 1 and queued[0].name in text.decode()

    hold.close()
    receiver = make_mta("receiver", hostname="mx.%s" % WG, local_domains=(WG,),
                        listen_port=next_hop_port, cert=pki.woodgrove_server)
    proc, _ = _start(config)
    try:
        (raw,) = wait_until(lambda: maildir_messages(receiver.cfg.maildir_root, "dave@%s" % WG),
                          30, "delivery after restart")
        assert b"Subject: original subject" in raw
        wait_until(lambda: not any((base / "queue" / "active").iterdir()), 10, "queue to drain")
    finally:
        _stop(proc)
