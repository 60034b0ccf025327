"""Policy delegation (``[policy]``): who can post Direct Trust facts, hostile requests, IPv6.

Real parts only: milterd processes (or the real :class:`PolicyServer` on real sockets), a real
local user (``nobody``) as the forger, and a real Postfix for the end-to-end forgery cases.
Everything stays on loopback (127.0.0.1, ::1).
"""

from __future__ import annotations

import grp
import os
import shutil
import smtplib
import socket
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from milterd.lab.net import free_port
from milterd.lab.metrics import scrape
from milterd.lab.proc import MilterdProcess
from milterd.lab.smtp import make_message
from milterd.lab.wait import wait_until
from milterd.inbound.policy_server import REPLY, PolicyServer
from milterd.inbound.policy_views import PolicyViews, normalize_address
from milterd.session import TlsFacts

from support import MilterdFactory, make_lab_dir
from ds_table import PARTNER, client_tls, ds_config

# The forger runs with the system interpreter and the standard library only (as any local user
# could); the venv's interpreter would do as well.
SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
NOBODY = 65534
RCPT = "user@contoso.test"
UNCOVERED = "bob@fabrikam.test"


# -- helpers ------------------------------------------------------------------------------------

def policy_request(**attrs: str | bytes) -> bytes:
    """A request as Postfix sends it (``name=value`` lines, an empty line)."""
    lines = []
    for name, value in attrs.items():
        lines.append(name.encode() + b"=" + (value if isinstance(value, bytes) else value.encode()))
    return b"\n".join(lines) + b"\n\n"


def session_attrs(address: str = "127.0.0.1", port: int = 40000, **extra: str | bytes) -> dict:
    attrs: dict[str, str | bytes] = {
        "request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
        "client_address": address, "client_port": str(port), "client_name": "localhost",
        "helo_name": "client.example.test", "sender": "alice@woodgrovebank.test",
        "recipient": RCPT, "queue_id": "", "ccert_subject": "", "ccert_issuer": "",
        "ccert_fingerprint": "AB:" * 31 + "AB", "ccert_pubkey_fingerprint": "CD:" * 31 + "CD",
        "encryption_protocol": "TLSv1.3", "encryption_cipher": "TLS_AES_256_GCM_SHA384",
        "encryption_keysize": "256",
    }
    attrs.update(extra)
    return attrs


def _read_reply(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def connect(target: str | tuple[str, int], timeout: float = 10) -> socket.socket:
    if isinstance(target, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(target)
        return s
    return socket.create_connection(target, timeout=timeout)


def ask(target: str | tuple[str, int], payload: bytes) -> bytes:
    with connect(target) as s:
        s.sendall(payload)
        return _read_reply(s)


def free_port6() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


FORGER = textwrap.dedent("""
    import errno, socket, sys
    kind, where = sys.argv[1], sys.argv[2]
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = where
    else:
        host, port = where.rsplit(":", 1)
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        target = (host.strip("[]"), int(port))
    s.settimeout(10)
    try:
        s.connect(target)
    except OSError as e:
        print("CONNECT", errno.errorcode.get(e.errno, e.errno))
        sys.exit(3)
    s.sendall(sys.stdin.buffer.read())
    reply = b""
    while not reply.endswith(b"\\n\\n"):
        chunk = s.recv(100)
        if not chunk:
            break
        reply += chunk
    print("REPLY", reply.decode().strip())
""")


def forge_as_nobody(kind: str, where: str, payload: bytes) -> subprocess.CompletedProcess[str]:
    """Post ``payload`` as the unprivileged local user ``nobody`` (no supplementary groups)."""
    return subprocess.run([SYSTEM_PYTHON, "-c", FORGER, kind, where],
                          input=payload.decode("latin-1"), text=True, encoding="latin-1",
                          capture_output=True, timeout=60, user=NOBODY, group=NOBODY,
                          extra_groups=[], cwd="/")


def _milterd_run(config: Path, *, user: int | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``milterd run`` expected to fail at start (the output is its log)."""
    kwargs = {}
    if user is not None:
        kwargs = {"user": user, "group": user, "extra_groups": []}
    return subprocess.run([sys.executable, "-m", "milterd", "run", "-c", str(config)],
                          capture_output=True, text=True, timeout=timeout, cwd="/", **kwargs)


# -- the unix socket: only Postfix (and root) can post ----------------------------------------

def test_unix_policy_socket_is_0660_group_postfix_and_answers(milterd_factory):
    d = make_lab_dir("milterd-policy-")
    try:
        path = d / "sub" / "policy.sock"   # the directory is created too
        m = milterd_factory(f'[policy]\nlisten = "unix:{path}"\n')
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert grp.getgrgid(st.st_gid).gr_name == "postfix"
        dst = os.stat(path.parent)
        assert stat.S_IMODE(dst.st_mode) == 0o750
        assert grp.getgrgid(dst.st_gid).gr_name == "postfix"
        assert ask(str(path), policy_request(**session_attrs())) == REPLY
        assert "policy delegation on unix:" in m.log_text()
        # A clean stop removes the socket it made.
        assert m.stop() == 0
        assert not path.exists()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_policy_group_key_sets_the_socket_group(milterd_factory):
    d = make_lab_dir("milterd-policy-")
    try:
        path = d / "policy.sock"
        milterd_factory(f'[policy]\nlisten = "unix:{path}"\ngroup = "nogroup"\n')
        assert grp.getgrgid(os.stat(path).st_gid).gr_name == "nogroup"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_local_user_cannot_post_to_the_unix_policy_socket(milterd_factory):
    d = make_lab_dir("milterd-policy-")   # 0755: nobody may traverse; the socket mode decides
    try:
        path = d / "policy.sock"
        milterd_factory(f'[policy]\nlisten = "unix:{path}"\n')
        forged = policy_request(**session_attrs(port=40001))
        r = forge_as_nobody("unix", str(path), forged)
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert r.stdout.strip() == "CONNECT EACCES"
        # ... while the server goes on answering those who may post.
        assert ask(str(path), forged) == REPLY
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_stale_policy_socket_is_replaced(milterd_factory):
    d = make_lab_dir("milterd-policy-")
    try:
        path = d / "policy.sock"
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))   # left behind, nobody listening: what a crash leaves
        stale.close()
        assert stat.S_IMODE(os.stat(path).st_mode) != 0o660
        milterd_factory(f'[policy]\nlisten = "unix:{path}"\n')
        st = os.stat(path)   # (inode numbers are reused at once here: not a usable witness)
        assert stat.S_IMODE(st.st_mode) == 0o660 and grp.getgrgid(st.st_gid).gr_name == "postfix"
        assert ask(str(path), policy_request(**session_attrs())) == REPLY
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _failing_config(d: Path, policy: str, extra: str = "") -> Path:
    cfg = d / "milterd.toml"
    cfg.write_text(f'[milter]\nlisten = "unix:{d}/milter.sock"\n[policy]\nlisten = "{policy}"\n'
                   + extra)
    return cfg


def test_a_file_in_the_way_is_not_removed(tmp_path):
    d = make_lab_dir("milterd-policy-")
    try:
        path = d / "policy.sock"
        path.write_text("precious\n")
        r = _milterd_run(_failing_config(d, f"unix:{path}"))
        assert r.returncode == 2, r.stderr
        assert f"policy.listen: {path} exists and is not a socket" in r.stderr
        assert path.read_text() == "precious\n"
        assert not (d / "milter.sock").exists()   # nothing else was started either
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_errors_name_path_user_and_the_missing_permission():
    d = make_lab_dir("milterd-policy-")
    try:
        (d / "run").mkdir()
        os.chown(d / "run", NOBODY, NOBODY)      # where nobody's milter socket could go
        locked = d / "locked"
        locked.mkdir(mode=0o755)                 # root's: nobody cannot create in it
        path = locked / "policy.sock"
        cfg = d / "milterd.toml"
        cfg.write_text(f'[milter]\nlisten = "unix:{d}/run/milter.sock"\n'
                       f'[policy]\nlisten = "unix:{path}"\n')
        os.chmod(cfg, 0o644)
        r = _milterd_run(cfg, user=NOBODY)
        assert r.returncode == 2, r.stderr
        line = next(l for l in r.stderr.splitlines() if "cannot start" in l)
        assert "policy.listen" in line and str(path) in line
        assert "permission denied for user nobody (uid 65534)" in line
        assert f"it needs write and search permission on {locked} (mode 0755, owner root:root)" \
            in line
        assert "Traceback" not in r.stderr

        # A directory nobody may write, but a group it is not in: the error names the group key.
        os.chown(locked, NOBODY, NOBODY)
        r = _milterd_run(cfg, user=NOBODY)
        assert r.returncode == 2, r.stderr
        line = next(l for l in r.stderr.splitlines() if "cannot start" in l)
        assert "policy.group: cannot give the socket" in line and str(path) in line
        assert "'postfix'" in line and "user nobody (uid 65534)" in line
        assert not path.exists()                 # no half-made socket left behind

        cfg.write_text(cfg.read_text() + 'group = "no-such-group-here"\n')
        r = _milterd_run(cfg, user=NOBODY)
        assert r.returncode == 2
        assert "policy.group: group 'no-such-group-here' does not exist" in r.stderr
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- hostile requests --------------------------------------------------------------------------

GOOD = session_attrs(port=40100)

# name -> (payload, the connection stays usable afterwards)
HOSTILE: dict[str, tuple[bytes, bool]] = {
    "keysize-superscript-two": (policy_request(**session_attrs(
        encryption_keysize="²".encode())), True),
    "keysize-arabic-indic": (policy_request(**session_attrs(
        encryption_keysize="٢٥٦".encode())), True),
    "keysize-fullwidth": (policy_request(**session_attrs(
        encryption_keysize="２５６".encode())), True),
    "keysize-huge": (policy_request(**session_attrs(encryption_keysize="9" * 400)), True),
    "port-superscript": (policy_request(**session_attrs(client_port="²".encode())), True),
    "port-out-of-range": (policy_request(**session_attrs(client_port="99999")), True),
    "invalid-utf8-fingerprint": (policy_request(**session_attrs(
        ccert_fingerprint=b"\xff\xfe:AB")), True),
    "invalid-utf8-address": (policy_request(**session_attrs(client_address=b"127.0.0.\xff")),
                             True),
    "invalid-utf8-sender-subject": (policy_request(**session_attrs(
        sender=b"a\xff@woodgrovebank.test", ccert_subject=b"\xc3(\rX")), True),
    "invalid-utf8-name": (b"client_\xffaddress=127.0.0.1\nclient_port=1\n\n", True),
    "nul-in-address": (policy_request(**session_attrs(address="127.0.0.1\x00evil")), True),
    "missing-equals": (b"client_address=127.0.0.1\nthis line has no equals sign\n\n", True),
    "repeated-attribute": (policy_request(**session_attrs()).replace(
        b"\n\n", b"\nccert_fingerprint=" + b"EF:" * 31 + b"EF\n\n"), True),
    "crlf-lines": (policy_request(**session_attrs()).replace(b"\n", b"\r\n"), True),
    "only-an-empty-line": (b"\n", True),
    "overlong-value": (b"client_address=" + b"1" * 20000 + b"\n\n", False),
    "overlong-request": (b"".join(b"x%d=%s\n" % (i, b"y" * 1000) for i in range(100)) + b"\n",
                         False),
    "junk-without-newline": (bytes(range(256)).replace(b"\n", b"?") * 2, False),
}


def _send_hostile(target, payload: bytes, keeps_open: bool) -> None:
    with connect(target) as s:
        if keeps_open:
            s.sendall(payload)
            assert _read_reply(s) == REPLY
            s.sendall(policy_request(**GOOD))   # the same connection still serves
            assert _read_reply(s) == REPLY
        else:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                rest = _read_reply(s)
            except (ConnectionResetError, BrokenPipeError):  # closed with bytes unread: clean
                rest = b""
            assert rest in (b"", REPLY)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_request_then_the_next_good_one_is_answered(tmp_path, name):
    """Real server, real socket: a hostile request is answered DUNNO or closes cleanly, records
    no fact milterd would use, and the next good request is answered and recorded."""
    views = PolicyViews()
    server = PolicyServer(views, path=str(tmp_path / "p.sock"), group="")
    server.start()
    try:
        payload, keeps_open = HOSTILE[name]
        _send_hostile(str(tmp_path / "p.sock"), payload, keeps_open)
        hostile = views.get("127.0.0.1", 40000)
        if hostile is not None:  # recorded without the bad attribute, never with a wrong value
            assert hostile.keysize in (None, 256)
            assert hostile.fingerprint in (None, "AB:" * 31 + "AB")
            assert "\r" not in (hostile.subject or "") and "\n" not in (hostile.sender or "")
        if name in ("keysize-superscript-two", "keysize-arabic-indic", "keysize-fullwidth",
                    "keysize-huge"):
            assert hostile is not None and hostile.keysize is None
            assert hostile.fingerprint == "AB:" * 31 + "AB"
        if name in ("invalid-utf8-fingerprint", "invalid-utf8-sender-subject"):
            assert hostile is not None and hostile.keysize == 256
        if name == "invalid-utf8-fingerprint":
            assert hostile.fingerprint is None
        if name in ("missing-equals", "repeated-attribute", "invalid-utf8-name",
                    "nul-in-address", "invalid-utf8-address", "port-superscript",
                    "port-out-of-range"):
            assert hostile is None
        assert ask(str(tmp_path / "p.sock"), policy_request(**GOOD)) == REPLY
        good = views.get("127.0.0.1", 40100)
        assert good is not None and good.keysize == 256 and good.protocol == "TLSv1.3"
    finally:
        server.stop()


def test_hostile_requests_never_silence_a_running_milterd(milterd_factory):
    d = make_lab_dir("milterd-policy-")
    try:
        path = str(d / "policy.sock")
        port = free_port()
        m = milterd_factory(f'[policy]\nlisten = "unix:{path}"\n'
                            f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        for name, (payload, keeps_open) in HOSTILE.items():
            _send_hostile(path, payload, keeps_open)
            assert ask(path, policy_request(**GOOD)) == REPLY, name
        # Many at once: every connection is served by its own thread; none takes others down.
        socks = [connect(path) for _ in range(50)]
        for i, s in enumerate(socks):
            s.sendall(HOSTILE["keysize-superscript-two"][0] if i % 2 else b"junk\x00\xff")
        for s in socks:
            s.close()
        assert ask(path, policy_request(**GOOD)) == REPLY
        assert m.proc.poll() is None
        log = m.log_text()
        assert "ignoring malformed encryption_keysize=b'\\xc2\\xb2'" in log
        assert "malformed request" in log and "too large" in log
        # The milter side is alive too.
        assert any(k.startswith("milterd_build_info") for k in scrape(port))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_connection_limit_closes_extra_connections_and_recovers(tmp_path):
    views = PolicyViews()
    path = str(tmp_path / "p.sock")
    server = PolicyServer(views, path=path, group="", max_connections=3)
    server.start()
    try:
        held = [connect(path) for _ in range(3)]
        for s in held:                      # all three are being served
            s.sendall(policy_request(**GOOD))
            assert _read_reply(s) == REPLY
        with connect(path) as extra:        # the fourth is closed at once, not left hanging
            try:
                extra.sendall(policy_request(**GOOD))
                assert _read_reply(extra) == b""
            except (ConnectionResetError, BrokenPipeError):
                pass
        held.pop().close()

        def served() -> bool:
            try:
                return ask(path, policy_request(**GOOD)) == REPLY
            except OSError:
                return False

        wait_until(served, what="a free slot")
        for s in held:
            s.close()
    finally:
        server.stop()


# -- the join key and agrees_with --------------------------------------------------------------

@pytest.mark.parametrize("milter_side, policy_side", [
    ("IPv6:::1", "::1"),
    ("::1", "::1"),
    ("[::1]", "0:0:0:0:0:0:0:1"),
    ("IPv6:2001:DB8::25", "2001:db8::25"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("IPv6:::ffff:127.0.0.1", "127.0.0.1"),
    ("127.0.0.1", "::ffff:127.0.0.1"),
])
def test_views_join_every_spelling_of_one_address(milter_side, policy_side):
    views = PolicyViews()
    from milterd.inbound.policy_server import view_from_attributes

    view = view_from_attributes(session_attrs(address=policy_side, port=2525))
    assert view is not None and views.put(view)
    assert views.get(milter_side, 2525) is view
    assert views.get(milter_side, "2525") is view
    assert views.get(milter_side, 2526) is None
    views.forget(milter_side, 2525)
    assert views.get(policy_side, 2525) is None


@pytest.mark.parametrize("address", ["unknown", "", "localhost", "127.0.0.1\x00", "١٢٧.0.0.1",
                                     "fe80::1%eth0", "IPv6:", "x" * 500])
def test_addresses_that_are_not_ip_addresses_never_join(address):
    assert normalize_address(address) is None
    views = PolicyViews()
    from milterd.inbound.policy_server import view_from_attributes

    assert view_from_attributes(session_attrs(address=address)) is None
    assert views.get(address, 25) is None


SESSION_TLS = TlsFacts(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", bits=256,
                       dialect="postfix")


@pytest.mark.parametrize("attrs, tls, agrees", [
    ({}, SESSION_TLS, True),
    ({"encryption_cipher": "", "encryption_keysize": ""}, SESSION_TLS, True),  # absent: not compared
    ({"encryption_protocol": "TLSv1.2"}, SESSION_TLS, False),
    ({"encryption_cipher": "TLS_AES_128_GCM_SHA256"}, SESSION_TLS, False),
    ({"encryption_keysize": "128"}, SESSION_TLS, False),
    ({"encryption_protocol": "", "encryption_cipher": "", "encryption_keysize": ""},
     SESSION_TLS, False),                       # the view says plaintext, the milter says TLS
    ({"encryption_keysize": "²".encode()}, SESSION_TLS, True),   # dropped, so not compared
    ({"encryption_protocol": "TLSv1.3\x00"}, SESSION_TLS, False),  # dropped: "not encrypted"
    ({}, TlsFacts(), False),                    # the view says TLS, the milter says plaintext
    ({"encryption_protocol": "", "encryption_cipher": "", "encryption_keysize": ""},
     TlsFacts(), True),
    ({}, TlsFacts(version="TLSv1.3", dialect="postfix"), True),  # milter without cipher/bits
])
def test_agrees_with(attrs, tls, agrees):
    from milterd.inbound.policy_server import view_from_attributes

    view = view_from_attributes(session_attrs(**attrs))
    assert view is not None
    assert view.agrees_with(tls) is agrees


def test_tcp_caveat_any_local_user_can_post_and_only_agreement_is_checked():
    """Documents the caveat of ``[policy] listen = "HOST:PORT"``: a request from any local
    process (here: user nobody) is accepted and recorded for whatever session it names; the
    only check left is that its TLS attributes agree with the session's own facts."""
    views = PolicyViews()
    server = PolicyServer(views, "127.0.0.1", 0)
    server.start()
    try:
        target = f"127.0.0.1:{server.port}"
        pinned = "12:" * 31 + "34"
        guessed = session_attrs(port=41000, ccert_fingerprint=pinned)
        r = forge_as_nobody("tcp", target, policy_request(**guessed))
        assert r.stdout.strip() == "REPLY action=DUNNO", r.stderr
        view = views.get("127.0.0.1", 41000)
        assert view is not None and view.fingerprint == pinned   # accepted: the caveat
        assert view.agrees_with(SESSION_TLS)                        # a good guess takes effect
        wrong = session_attrs(port=41001, ccert_fingerprint=pinned, encryption_protocol="TLSv1.2")
        forge_as_nobody("tcp", target, policy_request(**wrong))
        assert not views.get("127.0.0.1", 41001).agrees_with(SESSION_TLS)   # a bad one not
    finally:
        server.stop()


# -- end to end with Postfix: a forger during a live session -----------------------------------

def _postfix_lab_class():
    from milterd.lab.postfix import PostfixLab

    class Lab(PostfixLab):
        """PostfixLab that may listen on an IPv6 address (given bare, "::1"): master.cf wants
        it in brackets, the lab's readiness check without."""

        def write_config(self) -> None:
            super().write_config()
            if ":" in self.listen_address:
                master = self.conf / "master.cf"
                master.write_text(master.read_text().replace(
                    f"{self.listen_address}:{self.port} ",
                    f"[{self.listen_address}]:{self.port} "))

    return Lab


def _postfix_with_policy(partners, transport: str, root: Path, *, listen_address="127.0.0.1",
                         extra=None):
    from milterd.lab.postfix import PostfixTLS

    PostfixLab = _postfix_lab_class()

    factory = MilterdFactory(root)
    if transport == "unix":
        # root is 0755: what keeps other users out is the socket's own mode (0660)
        policy_listen = f"unix:{root}/policy.sock"
        service = f"unix:{root}/policy.sock"
        where = f"{root}/policy.sock"
    else:
        port = free_port()
        policy_listen = f"127.0.0.1:{port}"
        service = f"inet:127.0.0.1:{port}"
        where = f"127.0.0.1:{port}"
    m = factory(ds_config(partners, policy_listen=policy_listen))
    pf = PostfixLab(milter_socket=m.socket_spec,
                    tls=PostfixTLS(partners.server.cert_path, partners.server.key_path,
                                   partners.pki.ca_path),
                    policy_service=service, listen_address=listen_address,
                    extra=extra or {}).start()
    return factory, m, pf, where


def _delivered(pf, subject: str, timeout: float = 15):
    def find():
        return next((msg for msg in pf.delivered() if msg["Subject"] == subject), None)
    try:
        return wait_until(find, timeout, what=f"delivery of {subject!r}")
    except AssertionError:
        return None


FORGERIES = {
    # transport, what the forger claims about the session's TLS, outcome at end of data
    "unix/good-guess": ("unix", "same", "refused"),        # cannot even connect
    "tcp/good-guess": ("tcp", "same", "passes"),           # THE TCP CAVEAT
    "tcp/claims-plaintext": ("tcp", "plain", "refused"),
    "tcp/claims-tls1.2": ("tcp", "tls12", "refused"),
    "tcp/wrong-keysize": ("tcp", "bits", "refused"),
}


@pytest.mark.postfix
@pytest.mark.parametrize("case", list(FORGERIES))
def test_forged_request_during_a_live_session(partners, case):
    """A spoofer connects with a self-signed certificate that is *not* pinned, gives an
    uncovered envelope (RCPT passes) and a partner ``From:``; between RCPT and end of data a
    local process (user nobody) posts the pinned fingerprint for the spoofer's client port."""
    transport, claim, outcome = FORGERIES[case]
    root = make_lab_dir("milterd-forge-")
    factory, m, pf, where = _postfix_with_policy(partners, transport, root)
    try:
        s = smtplib.SMTP("127.0.0.1", pf.port, local_hostname="spoofer.example.test", timeout=60)
        try:
            s.ehlo()
            assert s.starttls(context=client_tls(partners, "selfsigned"))[0] == 220
            s.ehlo()
            assert s.mail(UNCOVERED)[0] == 250
            assert s.rcpt(RCPT)[0] == 250
            cipher, version, bits = s.sock.cipher()
            claimed = {"same": {},
                       "plain": {"encryption_protocol": "", "encryption_cipher": "",
                                 "encryption_keysize": ""},
                       "tls12": {"encryption_protocol": "TLSv1.2"},
                       "bits": {"encryption_keysize": str(bits // 2)}}[claim]
            guessed = {"encryption_protocol": version, "encryption_cipher": cipher,
                       "encryption_keysize": str(bits)}   # what this session really has
            forged = session_attrs(port=s.sock.getsockname()[1],
                                   ccert_fingerprint=partners.pinned.sha256,
                                   **{**guessed, **claimed})
            r = forge_as_nobody(transport, where, policy_request(**forged))
            if transport == "unix":
                assert r.stdout.strip() == "CONNECT EACCES", (r.stdout, r.stderr)
            else:
                assert r.stdout.strip() == "REPLY action=DUNNO", (r.stdout, r.stderr)
            data = make_message(UNCOVERED, RCPT, f"forge:{case}",
                                from_header=f"CEO <ceo@{PARTNER}>")
            try:
                code = s.data(data)[0]
            except smtplib.SMTPResponseException as exc:
                code = exc.smtp_code
        finally:
            try:
                s.quit()
            except Exception:
                s.close()
        if outcome == "refused":
            assert code == 550, case
            assert all(msg["Subject"] != f"forge:{case}" for msg in pf.delivered())
        else:
            assert code == 250, case
            msg = _delivered(pf, f"forge:{case}")
            assert msg is not None and "domain-secure=pass" in str(msg["X-Milterd-TLS"])
    finally:
        pf.cleanup()
        factory.stop_all()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.postfix
def test_pinned_partner_over_ipv6_with_a_unix_policy_socket(partners):
    """The two views spell an IPv6 client differently; the pinned partner still passes, and a
    self-signed impostor over IPv6 is still refused."""
    root = make_lab_dir("milterd-pin6-")
    factory, m, pf, _where = _postfix_with_policy(
        partners, "unix", root, listen_address="::1",
        extra={"inet_protocols": "all", "mynetworks": "127.0.0.0/8 [::1]/128"})
    try:
        from milterd.lab.smtp import send

        sender = f"alice@{PARTNER}"
        ok = send(pf.port, sender, [RCPT], make_message(sender, RCPT, "pin6:pinned"),
                  host="::1", tls=client_tls(partners, "pinned"))
        assert ok.accepted, (ok, m.log_tail())
        msg = _delivered(pf, "pin6:pinned")
        assert msg is not None and "domain-secure=pass" in str(msg["X-Milterd-TLS"])
        bad = send(pf.port, sender, [RCPT], make_message(sender, RCPT, "pin6:selfsigned"),
                   host="::1", tls=client_tls(partners, "selfsigned"))
        assert bad.reply_class == "5xx", bad
    finally:
        pf.cleanup()
        factory.stop_all()
        shutil.rmtree(root, ignore_errors=True)


# -- every listener on IPv6 ----------------------------------------------------------------------

def _milter_optneg(host: str, port: int) -> bytes:
    """One libmilter option negotiation: the reply's command byte ('O' when it answers)."""
    body = b"O" + struct.pack("!III", 6, 0x1FF, 0x1FFFFF)
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(struct.pack("!I", len(body)) + body)
        head = b""
        while len(head) < 5:
            chunk = s.recv(5 - len(head))
            if not chunk:
                break
            head += chunk
        return head[4:5]


def _netstring(payload: bytes) -> bytes:
    return str(len(payload)).encode() + b":" + payload + b","


@pytest.mark.parametrize("milter_host", ["[::1]", "::1"])
def test_every_listener_starts_and_answers_on_ipv6_loopback(milter_host):
    root = make_lab_dir("milterd-v6-")
    try:
        mport, pport, sport, xport = (free_port6() for _ in range(4))
        cfg = root / "milterd.toml"
        cfg.write_text(f'[milter]\nlisten = "inet6:{mport}@{milter_host}"\n'
                       f'[policy]\nlisten = "[::1]:{pport}"\n'
                       f'[socketmap]\nlisten = "[::1]:{sport}"\n'
                       f'[metrics]\nlisten = "[::1]:{xport}"\n')
        check = subprocess.run([sys.executable, "-m", "milterd", "check-config", "-c", str(cfg)],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
        # MilterdProcess waits for the milter port (the side servers start before it).
        proc = MilterdProcess(cfg, f"inet6:{mport}@::1", log_path=root / "milterd.log")
        proc.start()
        try:
            assert _milter_optneg("::1", mport) == b"O"
            assert any(k.startswith("milterd_build_info") for k in scrape(xport, host="::1"))
            assert ask(("::1", pport), policy_request(**session_attrs(address="::1"))) == REPLY
            with socket.create_connection(("::1", sport), timeout=10) as s:
                s.sendall(_netstring(b"nosuchmap example.com"))
                assert s.recv(100) == _netstring(b"PERM unknown map name")
            log = proc.log_text()
            assert f"metrics on http://[::1]:{xport}/metrics" in log
            assert f"policy delegation on [::1]:{pport}" in log
            assert f"socketmap listening on [::1]:{sport}" in log
        finally:
            assert proc.stop() == 0
        assert "Traceback" not in proc.log_text()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("key", ["metrics", "policy", "socketmap", "milter"])
def test_a_listener_that_cannot_bind_names_its_key(key):
    """check-config accepts the file; start fails cleanly (exit 2), naming the key — and the
    listeners already started are closed again."""
    root = make_lab_dir("milterd-busy-")
    busy = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    busy.bind(("::1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        specs = {"milter": f'"unix:{root}/milter.sock"', "metrics": f'"[::1]:{free_port6()}"',
                 "policy": f'"[::1]:{free_port6()}"', "socketmap": f'"[::1]:{free_port6()}"'}
        specs[key] = f'"inet6:{port}@[::1]"' if key == "milter" else f'"[::1]:{port}"'
        cfg = root / "milterd.toml"
        cfg.write_text("".join(f"[{k}]\nlisten = {v}\n" for k, v in specs.items()))
        check = subprocess.run([sys.executable, "-m", "milterd", "check-config", "-c", str(cfg)],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
        r = _milterd_run(cfg)
        assert r.returncode == 2, r.stderr
        line = next(l for l in r.stderr.splitlines() if "cannot start" in l)
        assert f"{key}.listen: cannot listen on" in line and str(port) in line
        assert "Traceback" not in r.stderr
    finally:
        busy.close()
        shutil.rmtree(root, ignore_errors=True)


def test_unresolvable_host_name_fails_at_start_naming_the_key():
    root = make_lab_dir("milterd-name-")
    try:
        cfg = root / "milterd.toml"
        cfg.write_text(f'[milter]\nlisten = "unix:{root}/milter.sock"\n'
                       f'[metrics]\nlisten = "no-such-host.invalid:{free_port()}"\n')
        r = _milterd_run(cfg)
        assert r.returncode == 2
        assert "metrics.listen: cannot listen on no-such-host.invalid" in r.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)

