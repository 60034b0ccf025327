"""SIGHUP covers the side listeners: a changed ``[metrics]``/``[policy]``/``[socketmap]`` listen is
applied (the new one started, then the old one stopped), or — when the new one cannot start —
the whole reload is refused with an error naming the key, and the old listeners keep serving.
``[milter] listen`` needs a restart, and the log says so.  All with a real milterd process."""

from __future__ import annotations

import grp
import os
import signal
import socket
import urllib.error
from pathlib import Path

from milterd.lab.net import wait_for_unix_socket
from milterd.lab.metrics import scrape
from milterd.outbound.socketmap import encode_netstring
from milterd.lab.wait import wait_until

POLICY_REQUEST = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=127.0.0.1\n"
                  b"client_port=40000\nencryption_protocol=TLSv1.3\n\n")


def _ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held together while chosen, so never one twice)."""
    held = [socket.socket() for _ in range(n)]
    try:
        for s in held:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _metrics(port: int) -> dict[str, float] | None:
    """The /metrics samples, or None when nothing listens on ``port``."""
    try:
        return scrape(port)
    except urllib.error.URLError as exc:
        assert isinstance(exc.reason, ConnectionRefusedError), exc
        return None


def _policy(path: Path) -> bytes | None:
    """The policy service's answer on the unix socket ``path``, or None if none listens."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(POLICY_REQUEST)
            reply = b""
            while not reply.endswith(b"\n\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
            return reply
    except (FileNotFoundError, ConnectionRefusedError):
        return None


def _socketmap(port: int) -> bytes | None:
    """The socketmap's raw answer for one query, or None when nothing listens."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(encode_netstring("tlspolicy contoso.test"))
            return s.recv(4096)
    except ConnectionRefusedError:
        return None


def _reload(proc, text: str) -> str:
    """Write ``text`` as the config, SIGHUP, wait for the outcome: "ok" or "refused"."""
    log = proc.log_text()
    ok, refused = log.count("configuration reloaded"), log.count("reload refused")
    proc.config_path.write_text(text)
    proc.signal(signal.SIGHUP)
    def outcome() -> str | None:
        log = proc.log_text()
        if log.count("configuration reloaded") > ok:
            return "ok"
        return "refused" if log.count("reload refused") > refused else None
    return wait_until(outcome, 20, proc.log_tail)


def _config(proc, *, metrics: int | None = None, policy: Path | None = None,
            socketmap: int | None = None, extra: str = "") -> str:
    head = proc.config_path.read_text().split("[plugins]")[0]
    text = head + "[plugins]\nmodules = []\n"
    if metrics:
        text += f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n'
    if policy:
        text += f'[policy]\nlisten = "unix:{policy}"\n'
    if socketmap:
        text += f'[socketmap]\nlisten = "127.0.0.1:{socketmap}"\n'
    return text + extra


def _reloads(port: int, result: str) -> float:
    return (_metrics(port) or {}).get(f'milterd_config_reloads_total{{result="{result}"}}', 0.0)


def test_changed_listeners_move_on_reload_and_removed_ones_stop(milterd_factory):
    m1, s1, m2, s2 = _ports(4)
    proc = milterd_factory(f'[metrics]\nlisten = "127.0.0.1:{m1}"\n')
    d: Path = proc.dir
    p1, p2 = d / "policy-1" / "policy.sock", d / "policy-2" / "policy.sock"
    assert _reload(proc, _config(proc, metrics=m1, policy=p1, socketmap=s1)) == "ok"
    assert _policy(p1) == b"action=DUNNO\n\n"          # a listener added by a reload
    assert _socketmap(s1)

    assert _reload(proc, _config(proc, metrics=m2, policy=p2, socketmap=s2)) == "ok"
    assert _metrics(m1) is None and _reloads(m2, "ok") == 2
    assert _policy(p2) == b"action=DUNNO\n\n" and not p1.exists()
    assert _socketmap(s2) and _socketmap(s1) is None
    log = proc.log_text()
    for key in ("metrics.listen", "policy.listen", "socketmap.listen"):
        assert f"reload: {key} now on" in log

    assert _reload(proc, _config(proc)) == "ok"          # all three removed
    assert _metrics(m2) is None and not p2.exists() and _socketmap(s2) is None
    assert "reload: metrics.listen removed: stopped" in proc.log_text()
    assert _reload(proc, _config(proc, metrics=m1)) == "ok"
    assert _reloads(m1, "ok") == 4
    assert proc.proc.poll() is None and wait_for_unix_socket(proc.socket_spec[5:], timeout=5)


def test_a_listener_that_cannot_start_refuses_the_whole_reload(milterd_factory):
    m1, m2 = _ports(2)
    proc = milterd_factory(f'[metrics]\nlisten = "127.0.0.1:{m1}"\n')
    d: Path = proc.dir
    p1, p2 = d / "policy-1" / "policy.sock", d / "policy-2" / "policy.sock"
    assert _reload(proc, _config(proc, metrics=m1, policy=p1)) == "ok"
    with socket.socket() as squatter:                    # someone else holds the port
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        taken = squatter.getsockname()[1]
        # Metrics and policy could move, but the socketmap cannot start: nothing changes.
        new = _config(proc, metrics=m2, policy=p2, socketmap=taken,
                      extra='[domain_security]\nreceive_domains = ["woodgrovebank.test"]\n')
        assert _reload(proc, new) == "refused"
        line = next(l for l in proc.log_text().splitlines() if "reload refused" in l)
        assert f"socketmap.listen: cannot listen on 127.0.0.1:{taken}" in line
        assert "Address already in use" in line and "keeps serving" in line
        assert _metrics(m2) is None and not p2.exists()  # the new ones were closed again
        page = _metrics(m1)                              # the old ones serve on
        assert page is not None and _policy(p1) == b"action=DUNNO\n\n"
        assert _reloads(m1, "refused") == 1
        assert not any("woodgrovebank.test" in k for k in page)  # nor the rest of it applied
    # The port is free now: the same file applies whole.
    assert _reload(proc, new) == "ok"
    assert _metrics(m1) is None and _policy(p1) is None
    assert any('domain="woodgrovebank.test"' in k for k in _metrics(m2))
    assert _policy(p2) == b"action=DUNNO\n\n" and _socketmap(taken)


def test_policy_socket_group_changes_in_place(milterd_factory):
    other = next(g for g in ("nogroup", "daemon", "mail") if _group_exists(g))
    proc = milterd_factory()
    path: Path = proc.dir / "policy.sock"
    assert _reload(proc, _config(proc, policy=path)) == "ok"
    inode = os.stat(path).st_ino
    assert grp.getgrgid(os.stat(path).st_gid).gr_name == "postfix"
    assert _reload(proc, _config(proc, policy=path) + f'group = "{other}"\n') == "ok"
    st = os.stat(path)
    assert grp.getgrgid(st.st_gid).gr_name == other and st.st_ino == inode
    assert _policy(path) == b"action=DUNNO\n\n"


def test_milter_listen_change_waits_for_a_restart_and_says_so(milterd_factory):
    proc = milterd_factory()
    old = proc.socket_spec[len("unix:"):]
    new = str(proc.dir / "elsewhere.sock")
    text = proc.config_path.read_text().replace(f"unix:{old}", f"unix:{new}")
    text += '[log]\nformat = "json"\n'
    assert _reload(proc, text) == "ok"
    log = proc.log_text()
    assert (f"reload: milter.listen changed ('unix:{old}' -> 'unix:{new}'); it takes effect at "
            f"the next restart (until then: 'unix:{old}')") in log
    assert "reload: log.format changed ('text' -> 'json')" in log
    assert wait_for_unix_socket(old, timeout=5) and not os.path.exists(new)
    assert proc.proc.poll() is None


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def test_a_listener_moves_to_another_spelling_of_its_own_address(milterd_factory):
    """The new address is the one the old listener holds (127.0.0.1 = localhost here): the old
    one is stopped first; if the new one still cannot start, the old one is brought back."""
    (port,) = _ports(1)
    proc = milterd_factory(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    text = proc.config_path.read_text()
    assert _reload(proc, text.replace(f'"127.0.0.1:{port}"', f'"localhost:{port}"')) == "ok"
    assert f"reload: metrics.listen now on localhost:{port}" in proc.log_text()
    if {a[4][0] for a in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)} \
            == {"127.0.0.1"}:  # then the old listener really held the new address
        assert "reload: metrics.listen: stopping the running listener first" in proc.log_text()
    assert _reloads(port, "ok") == 1
    # An address this host does not have: refused, and the running listener serves on.
    bad = text.replace(f'"127.0.0.1:{port}"', f'"[2001:db8::1]:{port}"')
    assert _reload(proc, bad) == "refused"
    line = next(l for l in proc.log_text().splitlines() if "reload refused" in l)
    assert f"metrics.listen: cannot listen on [2001:db8::1]:{port}" in line
    assert _reloads(port, "refused") == 1
    assert "could not be restarted" not in proc.log_text()


H = "Nov 24 08:25:01 mail postfix/smtp"


def _delivery(pid: int, queue_id: str) -> str:
    """A verified TLS delivery to the send-list domain partner.test, as Postfix logs it."""
    return (f"{H}[{pid}]: Verified TLS connection established to mx1.partner.test[192.0.2.10]:25:"
            " TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)\n"
            f"{H}[{pid}]: {queue_id}: to=<alice@partner.test>, relay=mx1.partner.test"
            "[192.0.2.10]:25, delay=0.4, delays=0/0/0.2/0.2, dsn=2.0.0, status=sent (250 ok)\n")


def _sent(port: int) -> float:
    return (_metrics(port) or {}).get(
        'milterd_domain_secured_messages_sent_total{domain="partner.test"}', 0.0)


def _wait_sent(port: int, count: float) -> None:
    wait_until(lambda: _sent(port) >= count, 20, f"{count:g} secured sends counted")


def test_maillog_follower_follows_the_reloaded_file(milterd_factory):
    (port,) = _ports(1)
    proc = milterd_factory()
    d: Path = proc.dir
    first, second = d / "first.log", d / "second.log"
    first.touch()
    second.touch()

    def config(maillog: Path) -> str:
        return _config(proc, metrics=port, extra=(
            '[domain_security]\nsend_domains = ["partner.test"]\n'
            f'[outbound]\nmaillog = "{maillog}"\nstate_dir = "{d / maillog.stem}"\n'))

    assert _reload(proc, config(first)) == "ok"
    with open(first, "a") as f:
        f.write(_delivery(100, "1A0001"))
    _wait_sent(port, 1)
    assert _reload(proc, config(second)) == "ok"
    assert f"reload: outbound.maillog now follows {second}" in proc.log_text()
    with open(first, "a") as f:               # no longer followed ...
        f.write(_delivery(101, "1A0002"))
    with open(second, "a") as f:              # ... this one is
        f.write(_delivery(102, "1A0003"))
    _wait_sent(port, 2)
    # The old follower was stopped at the reload, before either line was written: exactly 2.
    assert _sent(port) == 2
    # A follower that cannot start (its state directory cannot be made): refused, and the
    # running one, stopped to make way, follows on.
    bad = config(second).replace(f'state_dir = "{d / "second"}"',
                                 f'state_dir = "{first}/state"')
    assert _reload(proc, bad) == "refused"
    line = next(l for l in proc.log_text().splitlines() if "reload refused" in l)
    assert f"outbound.maillog: cannot follow {second} (state in {first}/state)" in line
    with open(second, "a") as f:
        f.write(_delivery(103, "1A0004"))
    _wait_sent(port, 3)
