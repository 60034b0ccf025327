"""Daemon behaviour that needs a real milterd process but no MTA."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.request

from milterd.lab.net import free_port


def _metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _wait_for(predicate, timeout=15):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_certificate_expiry_gauge_and_reload(milterd_factory, partners):
    port = free_port()
    cert = partners.partner
    m = milterd_factory(f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
                        f'[tls]\ncertificates = ["{cert.cert_path}"]\n')
    text = _metrics(port)
    expected = cert.cert.not_valid_after_utc.timestamp()
    line = next(l for l in text.splitlines()
                if l.startswith("milterd_certificate_expiry_timestamp_seconds{"))
    assert f'path="{cert.cert_path}"' in line and "mail.woodgrovebank.test" in line
    assert abs(float(line.rsplit(" ", 1)[1]) - expected) < 1
    # Reload with another certificate: the gauge follows the config.
    other = partners.other
    m.config_path.write_text(m.config_path.read_text().replace(str(cert.cert_path),
                                                               str(other.cert_path)))
    m.signal(signal.SIGHUP)
    _wait_for(lambda: str(other.cert_path) in _metrics(port))
    assert str(cert.cert_path) not in _metrics(port)
    assert 'milterd_config_reloads_total{result="ok"} 1.0' in _metrics(port)


def test_metrics_bind_loopback_and_socket_is_0660(milterd_factory):
    import os
    import stat

    port = free_port()
    m = milterd_factory(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    path = m.socket_spec.split(":", 1)[1]
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o660
    import grp

    assert grp.getgrgid(st.st_gid).gr_name == "postfix"
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


def test_json_log_format(milterd_factory):
    m = milterd_factory("", extra_args=("--log-format", "json"))
    _wait_for(lambda: "serving" in m.log_text())
    first = next(l for l in m.log_text().splitlines() if "serving" in l)
    entry = json.loads(first)
    assert entry["level"] == "info" and "serving" in entry["msg"]


def test_bad_config_refuses_to_start(milterd_factory, tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.toml"
    bad.write_text('[milter]\nlisten = "unix:relative.sock"\n')
    r = subprocess.run([sys.executable, "-m", "milterd", "run", "-c", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "milter.listen" in r.stderr


def test_sighup_storm_never_stops_the_daemon(milterd_factory):
    """libmilter's own signal thread treats SIGHUP as "stop"; milterd must never let it see one."""
    from milterd.lab.net import wait_for_unix_socket

    m = milterd_factory()
    for _ in range(40):
        m.signal(signal.SIGHUP)
        time.sleep(0.01)
    _wait_for(lambda: "configuration reloaded" in m.log_text())
    assert m.proc.poll() is None, m.log_tail()
    assert wait_for_unix_socket(m.socket_spec.split(":", 1)[1], timeout=5)
    assert "stop requested" not in m.log_text()
    started = time.monotonic()
    assert m.stop() == 0
    assert time.monotonic() - started < 10  # graceful, not the SIGKILL fallback
