"""Daemon behaviour that needs a real milterd process but no MTA."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from milterd.lab.net import free_port
from milterd.lab.metrics import scrape
from milterd.lab.wait import wait_until


def test_certificate_expiry_gauge_and_reload(milterd_factory, partners):
    port = free_port()
    cert = partners.partner
    m = milterd_factory(f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
                        f'[tls]\ncertificates = ["{cert.cert_path}"]\n')
    expected = cert.cert.not_valid_after_utc.timestamp()
    key, value = next((k, v) for k, v in scrape(port).items()
                      if k.startswith("milterd_certificate_expiry_timestamp_seconds{"))
    assert f'path="{cert.cert_path}"' in key and "mail.woodgrovebank.test" in key
    assert abs(value - expected) < 1
    # Reload with another certificate: the gauge follows the config.
    other = partners.other
    m.config_path.write_text(m.config_path.read_text().replace(str(cert.cert_path),
                                                               str(other.cert_path)))
    m.signal(signal.SIGHUP)
    wait_until(lambda: any(str(other.cert_path) in k for k in scrape(port)), 15,
               "the reloaded certificate in /metrics")
    assert not any(str(cert.cert_path) in k for k in scrape(port))
    assert scrape(port)['milterd_config_reloads_total{result="ok"}'] == 1.0


def test_tlsrpt_send_outcomes_are_exported_and_follow_the_state_dir(milterd_factory, tmp_path):
    """`milterd tlsrpt send` runs from a timer and leaves tlsrpt.prom in [outbound] state_dir;
    the daemon's /metrics passes its milterd_tlsrpt_* families on, from the reloaded dir too."""
    port = free_port()
    first, second = tmp_path / "a", tmp_path / "b"
    for d, n in ((first, 3), (second, 7)):
        d.mkdir()
        (d / "tlsrpt.prom").write_text(
            "# TYPE milterd_tlsrpt_reports_total counter\n"
            f'milterd_tlsrpt_reports_total{{domain="woodgrovebank.test",result="sent"}} {n}\n'
            "# TYPE other_metric gauge\nother_metric 1\n")
    m = milterd_factory(f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
                        f'[outbound]\nstate_dir = "{first}"\n')
    key = 'milterd_tlsrpt_reports_total{domain="woodgrovebank.test",result="sent"}'
    metrics = scrape(port)
    assert metrics[key] == 3 and "other_metric" not in metrics
    m.config_path.write_text(m.config_path.read_text().replace(str(first), str(second)))
    m.signal(signal.SIGHUP)
    wait_until(lambda: scrape(port).get(key) == 7, 15, "the reloaded state_dir's outcomes")
    (second / "tlsrpt.prom").write_text("garbage {{{\n")
    assert key not in scrape(port)   # a broken file exports nothing and breaks nothing
    assert scrape(port)['milterd_config_reloads_total{result="ok"}'] == 1.0


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
    wait_until(lambda: "serving" in m.log_text(), 15, "serving")
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
    wait_until(lambda: "configuration reloaded" in m.log_text(), 15, "configuration reloaded")
    assert m.proc.poll() is None, m.log_tail()
    assert wait_for_unix_socket(m.socket_spec.split(":", 1)[1], timeout=5)
    assert "stop requested" not in m.log_text()
    started = time.monotonic()
    assert m.stop() == 0
    assert time.monotonic() - started < 10  # graceful, not the SIGKILL fallback


# -- a socket that cannot be created: the error says what to do --------------------------------

NOBODY = 65534


def _lab_dir() -> Path:
    """A directory other users can traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="milterd-sock-"))
    os.chmod(d, 0o755)
    return d


def _config(d: Path, listen: str, group: str = "") -> Path:
    cfg = d / "milterd.toml"
    cfg.write_text(f'[milter]\nlisten = "{listen}"\ngroup = "{group}"\n')
    os.chmod(cfg, 0o644)
    return cfg


def _start_fails(cfg: Path, *, user: int | None = None) -> str:
    """``milterd run`` that must refuse to start (exit 2); its ``cannot start`` line."""
    kwargs = {"user": user, "group": user, "extra_groups": []} if user is not None else {}
    r = subprocess.run([sys.executable, "-m", "milterd", "run", "-c", str(cfg)],
                       capture_output=True, text=True, timeout=60, cwd="/", **kwargs)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "opensocket" not in r.stderr, r.stderr
    return next(l for l in r.stderr.splitlines() if "cannot start" in l)


def test_milter_socket_in_a_directory_the_user_may_not_write():
    d = _lab_dir()
    try:
        locked = d / "locked"
        locked.mkdir(mode=0o755)                         # root's
        path = locked / "milter.sock"
        line = _start_fails(_config(d, f"unix:{path}"), user=NOBODY)
        assert (f"milter.listen: cannot create the socket {path}: permission denied for user "
                f"nobody (uid 65534): it needs write and search permission on {locked} "
                "(mode 0755, owner root:root)") in line
        assert (f"Fix (as root): give the socket a directory of its own: install -d -o nobody "
                f'-m 0750 {locked}/milterd and set milter.listen = "unix:{locked}/milterd/'
                f"milter.sock\" (or, if {locked} is milterd's alone: chown nobody {locked})"
                ) in line
        # In a directory of milterd's own, the fix is for that directory.
        own = d / "milterd"
        own.mkdir(mode=0o755)
        line = _start_fails(_config(d, f"unix:{own}/milter.sock", group="postfix"), user=NOBODY)
        assert line.endswith(f"Fix (as root): install -d -o nobody -g postfix -m 0750 {own}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_missing_socket_directory_names_the_parent_and_the_install_command():
    d = _lab_dir()
    try:
        locked = d / "spool"
        locked.mkdir(mode=0o755)
        path = locked / "milterd" / "milter.sock"
        line = _start_fails(_config(d, f"unix:{path}", group="postfix"), user=NOBODY)
        assert (f"milter.listen: cannot create the directory {locked}/milterd for the socket "
                f"{path}: permission denied for user nobody (uid 65534): it needs write and "
                f"search permission on {locked} (mode 0755, owner root:root). Fix (as root): "
                f"install -d -o nobody -g postfix -m 0750 {locked}/milterd") in line
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _stale_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))  # what a milterd run as root leaves (libmilter keeps root's socket)
    s.close()


def test_stale_socket_left_by_root_is_explained():
    d = _lab_dir()
    try:
        locked = d / "run"
        locked.mkdir(mode=0o755)
        path = locked / "milter.sock"
        _stale_socket(path)
        line = _start_fails(_config(d, f"unix:{path}"), user=NOBODY)
        assert (f"milter.listen: a stale socket {path} left by root (uid 0) (an earlier milterd "
                "started as root? libmilter leaves its socket behind when it runs as root) is "
                "in the way, and user nobody (uid 65534) cannot remove it: that needs write "
                f"permission on {locked} (mode 0755, owner root:root). Fix (as root): rm {path}"
                ) in line
        assert path.exists()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_stale_socket_of_another_user_in_its_own_directory_is_replaced():
    from milterd.lab.net import wait_for_unix_socket

    d = _lab_dir()
    try:
        own = d / "run"
        own.mkdir(mode=0o755)
        os.chown(own, NOBODY, NOBODY)
        path = own / "milter.sock"
        _stale_socket(path)
        log = d / "milterd.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "milterd", "run", "-c",
                                     str(_config(d, f"unix:{path}"))], stdout=out,
                                    stderr=subprocess.STDOUT, cwd="/", user=NOBODY,
                                    group=NOBODY, extra_groups=[])
        try:
            assert wait_for_unix_socket(path, timeout=20), log.read_text()
            assert os.stat(path).st_uid == NOBODY
            assert (f"milter.listen: removed a stale socket {path} left by root (uid 0)"
                    in log.read_text())
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_socket_in_use_is_not_taken_over(milterd_factory):
    from milterd.lab.net import wait_for_unix_socket

    m = milterd_factory()
    path = m.socket_spec.split(":", 1)[1]
    line = _start_fails(m.config_path)
    assert (f"milter.listen: {path} is in use: another process accepts connections on it "
            "(another milterd?); stop it first, or choose another path") in line
    assert wait_for_unix_socket(path, timeout=5) and m.proc.poll() is None


def test_inet_port_in_use_says_so():
    d = _lab_dir()
    try:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", 0))
            squatter.listen(1)
            port = squatter.getsockname()[1]
            line = _start_fails(_config(d, f"inet:{port}@127.0.0.1"))
        assert (f"milter.listen: cannot listen on 'inet:{port}@127.0.0.1': Address already in "
                "use") in line
    finally:
        shutil.rmtree(d, ignore_errors=True)
