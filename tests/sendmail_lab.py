"""A private, loopback-only Sendmail 8.17 for end-to-end tests (not a test module).

The binary and cf macros come from ``scripts/setup-sendmail.sh`` (Debian's sendmail packages
extracted under ``<repo>/.cache/sendmail/root``; never installed, they conflict with postfix).

The generated .mc *includes* ``contrib/sendmail/milterd.mc`` by absolute path and only sets
``MILTERD_SOCKET`` before it, so the milter definition, F=T, timeouts, fingerprint algorithm and
macro lists under test are exactly the shipped ones.

Hurdles from the field notes and how they are handled here:

* unqualified hostname -> 60 s sleep at start: sendmail runs in its own UTS + mount namespace
  (``unshare -m -u``) with hostname ``mx.lab.test`` and a private ``/etc/hosts`` bind-mounted over
  the real one. Nothing global is changed.
* no ``/dev/log``: in that mount namespace ``/dev`` gets an overlay (upper dir on a private tmpfs) and
  a unix datagram socket owned by this process (a small syslog listener thread) is bind-mounted
  onto ``/dev/log``. The global ``/dev/log`` (and a concurrent Postfix test) is untouched; if the
  host has a ``/dev/log`` it is simply shadowed inside the namespace. Log lines go to
  ``base_dir/sendmail.log`` (see :meth:`SendmailLab.log_text`).
* tree under sticky /tmp: ``confDONT_BLAME_SENDMAIL`` = ``TrustStickyBit``.
* no ``mailnull`` user: ``confDEF_USER_ID`` = ``mail:mail``; local delivery goes to a script
  (mailer flags without ``f``, plus ``-w``) writing one file per message and recipient.
* ``DELIVERY_MODE`` interactive: the message file exists before the 250 reply to DATA.
* readiness without an SMTP probe (which would show up as a connection at the milter): poll
  ``/proc/net/tcp`` until the daemon's own PID holds the LISTEN socket (bounded); a busy port
  ("cannot bind" in the log, sendmail retries it forever) fails fast and, for an automatically
  chosen port, start() retries with another port.
* shutdown: SIGTERM to the daemon's process group (its PID; created with ``start_new_session``,
  so it holds only the daemon and its per-connection children), bounded wait on the PID, then
  SIGKILL to that group. Sendmail ignores SIGTERM while retrying a busy port.

Requires root (namespaces, mounts), ``unshare``/``mount`` (util-linux), ``m4`` and overlayfs.

Start the milter (and wait for its socket, see :func:`milterd.lab.net.wait_for_unix_socket`) before mail is
sent; sendmail itself does not contact the milter until a client connects.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

from milterd.lab.net import free_port, pid_listens
from milterd.lab.wait import wait_until

REPO = Path(__file__).resolve().parent.parent
CONTRIB_MC = REPO / "contrib" / "sendmail" / "milterd.mc"
SETUP_SCRIPT = REPO / "scripts" / "setup-sendmail.sh"
LAB_HOSTNAME = "mx.lab.test"

# m4 quotes/comment chars and characters sendmail.cf cannot carry in a path
_UNSAFE_PATH = re.compile(r"[\s`',#()\"\\$;]")


class SendmailLabError(RuntimeError):
    pass


def sendmail_root() -> Path:
    """The private root made by scripts/setup-sendmail.sh (override: $SENDMAIL_ROOT)."""
    env = os.environ.get("SENDMAIL_ROOT")
    if env:
        return Path(env)
    cache = os.environ.get("SENDMAIL_CACHE")
    return (Path(cache) if cache else REPO / ".cache" / "sendmail") / "root"


def ensure_provisioned(timeout: float = 600.0) -> Path:
    """Run scripts/setup-sendmail.sh (idempotent, ~0.1 s when already done).

    Raises SendmailLabError (never skips) when provisioning is impossible."""
    if os.environ.get("SENDMAIL_ROOT"):
        root = sendmail_root()
    else:
        try:
            r = subprocess.run(
                ["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=timeout
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SendmailLabError(f"{SETUP_SCRIPT} could not run: {e}") from e
        if r.returncode != 0:
            raise SendmailLabError(
                f"{SETUP_SCRIPT} failed (exit {r.returncode}):\n{r.stderr[-3000:]}{r.stdout[-2000:]}"
            )
        root = sendmail_root()
    binary = root / "usr/libexec/sendmail/sendmail"
    if not os.access(binary, os.X_OK):
        raise SendmailLabError(f"sendmail binary missing: {binary}")
    for tool in ("m4", "unshare", "mount"):
        if shutil.which(tool) is None:
            raise SendmailLabError(f"required tool not on PATH: {tool}")
    return root


def pid_alive(pid: int) -> bool:
    """True unless `pid` is gone or a zombie (never reaps, so Popen bookkeeping stays intact)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class _SyslogListener:
    """Unix datagram socket receiving sendmail's syslog() datagrams; appends them to a file."""

    _prefix = re.compile(rb"^<(\d+)>")

    def __init__(self, sock_path: Path, log_path: Path):
        self.sock_path = sock_path
        self.log_path = log_path
        if sock_path.exists() or sock_path.is_symlink():
            sock_path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(sock_path))
        os.chmod(sock_path, 0o666)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._out = open(log_path, "ab", buffering=0)
        self.thread = threading.Thread(target=self._run, name="sendmail-lab-syslog", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            self._write(data)

    def _write(self, data: bytes) -> None:
        data = self._prefix.sub(b"", data).rstrip(b"\n\0") + b"\n"
        with self._lock:
            self._out.write(data)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        # pick up anything still queued
        self.sock.setblocking(False)
        while True:
            try:
                self._write(self.sock.recv(65536))
            except OSError:
                break
        self.sock.close()
        self._out.close()
        try:
            self.sock_path.unlink()
        except FileNotFoundError:
            pass


# Runs as root inside `unshare -m -u` (private mount propagation is unshare's default):
# $1 base dir, $2 sendmail binary, $3 .cf, $4 hostname; then exec sendmail (same PID).
_NS_WRAPPER = r"""
set -eu
base=$1; bin=$2; cf=$3; host=$4
hostname "$host"
mount --bind "$base/etc/hosts" /etc/hosts
ok=0
if [ -e /dev/log ] || [ -L /dev/log ]; then
  mount --bind "$base/syslog.sock" /dev/log && ok=1
else
  # overlay /dev; upper/work on a namespace-private tmpfs, so base_dir's filesystem does not matter
  if mount -t tmpfs -o size=1m,mode=0700 sendmail-lab "$base/devns" &&
     mkdir "$base/devns/upper" "$base/devns/work" && : > "$base/devns/upper/log" &&
     mount -t overlay overlay \
       -o "lowerdir=/dev,upperdir=$base/devns/upper,workdir=$base/devns/work" /dev &&
     mount --bind "$base/syslog.sock" /dev/log; then
    ok=1
  fi
fi
[ "$ok" = 1 ] || echo "sendmail-lab: WARNING: no /dev/log in the namespace, sendmail's log is lost" >&2
exec "$bin" -C "$cf" -bD -L sm-lab
"""

_DELIVER_SH = r"""#!/bin/sh
# Local mailer of the lab: one file per message and recipient. $1 = recipient ($u).
dir='@MAILBOX@'
rcpt=$(printf '%s' "$1" | tr -c 'A-Za-z0-9@._+=-' '_')
name="$(date +%s%N).$$.$rcpt"
umask 077
{ printf 'X-Lab-Delivered-To: %s\n' "$1"; cat; } > "$dir/.tmp.$name" || exit 75
mv "$dir/.tmp.$name" "$dir/$name.eml" || exit 75
exit 0
"""


class SendmailLab:
    """A private Sendmail daemon on 127.0.0.1 whose milter is contrib/sendmail/milterd.mc.

    Usage::

        lab = SendmailLab(tmp_path / "sm", milter_socket=f"unix:{sock}", ca_cert=ca,
                          server_cert=crt, server_key=key, local_domains=["example.test"])
        lab.start()             # ~1 s; raises SendmailLabError with the log tail on failure
        ... smtplib.SMTP("127.0.0.1", lab.port) ...
        lab.delivered()         # list[email.message.EmailMessage], oldest first
        lab.log_text()          # sendmail's syslog output
        lab.stop()
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        milter_socket: str,
        ca_cert: Path,
        server_cert: Path,
        server_key: Path,
        local_domains: list[str],
        smtp_port: int | None = None,
        hostname: str = LAB_HOSTNAME,
        log_level: int = 14,
        start_timeout: float = 30.0,
        sendmail_root_dir: Path | None = None,
        extra_mc: str = "",
    ) -> None:
        self.base = Path(base_dir).resolve()
        self.milter_socket = milter_socket
        self.ca_cert = Path(ca_cert)
        self.server_cert = Path(server_cert)
        self.server_key = Path(server_key)
        self.local_domains = list(local_domains)
        self._fixed_port = smtp_port
        self.port: int = smtp_port or 0
        self.hostname = hostname
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.root = Path(sendmail_root_dir) if sendmail_root_dir else sendmail_root()
        # more .mc lines (e.g. define(`confMAX_HEADERS_LENGTH', `1048576')dnl), placed after
        # the lab's own settings and before the mailers
        self.extra_mc = extra_mc
        self.binary = self.root / "usr/libexec/sendmail/sendmail"
        self.cf_dir = self.root / "usr/share/sendmail/cf"
        self.mailbox = self.base / "mailbox"
        self.cf_path = self.base / "sendmail.cf"
        self.mc_path = self.base / "sendmail.mc"
        self.log_path = self.base / "sendmail.log"
        self.stderr_path = self.base / "sendmail.stderr"
        self.proc: subprocess.Popen | None = None
        self._syslog: _SyslogListener | None = None
        for p in (str(self.base), milter_socket):
            if _UNSAFE_PATH.search(p):
                raise SendmailLabError(f"path not usable in sendmail.mc/.cf: {p!r}")
        for p in (self.base / "syslog.sock", milter_socket.removeprefix("unix:")):
            if len(str(p).encode()) > 107:
                raise SendmailLabError(f"unix socket path too long (max 107 bytes): {p}")
        for d in self.local_domains:
            if not re.fullmatch(r"[A-Za-z0-9.-]+", d):
                raise SendmailLabError(f"bad local domain {d!r}")

    # ---------------------------------------------------------------- config
    def _mc_text(self) -> str:
        b = str(self.base)
        locals_ = "".join(f"LOCAL_DOMAIN(`{d}')dnl\n" for d in self.local_domains)
        return f"""divert(-1)
dnl generated by tests/sendmail_lab.py: lab settings + contrib/sendmail/milterd.mc
divert(0)dnl
VERSIONID(`milterd-sendmail-lab')dnl
OSTYPE(`linux')dnl
dnl ---- private paths, nothing under /etc/mail or /var/spool
define(`QUEUE_DIR', `{b}/spool/mqueue')dnl
define(`STATUS_FILE', `{b}/run/sendmail.st')dnl
define(`confPID_FILE', `{b}/run/sendmail.pid')dnl
define(`confHOST_STATUS_DIRECTORY', `')dnl
define(`confDEAD_LETTER_DROP', `{b}/run/dead.letter')dnl
undefine(`ALIAS_FILE')dnl
define(`confSERVICE_SWITCH_FILE', `{b}/etc/service.switch')dnl
define(`confHOSTS_FILE', `{b}/etc/hosts')dnl
define(`confDEF_USER_ID', `mail:mail')dnl
define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl
dnl ---- identity, no DNS
define(`confDOMAIN_NAME', `{self.hostname}')dnl
LOCAL_DOMAIN(`localhost')dnl
{locals_}FEATURE(`nocanonify')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`accept_unqualified_senders')dnl
FEATURE(`no_default_msa')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confBIND_OPTS', `-DNSRCH -DEFNAMES')dnl
define(`confTO_IDENT', `0')dnl
define(`confTO_RESOLVER_RETRANS', `1s')dnl
define(`confTO_RESOLVER_RETRY', `1')dnl
define(`confQUEUE_LA', `100')dnl
define(`confREFUSE_LA', `100')dnl
define(`confDELAY_LA', `0')dnl
define(`confMIN_FREE_BLOCKS', `0')dnl
define(`confPRIVACY_FLAGS', `authwarnings,noexpn,novrfy')dnl
define(`confLOG_LEVEL', `{self.log_level}')dnl
define(`confMILTER_LOG_LEVEL', `{self.log_level}')dnl
define(`confDELIVERY_MODE', `interactive')dnl
dnl ---- listener
DAEMON_OPTIONS(`Port={self.port},Addr=127.0.0.1, Name=MTA')dnl
dnl ---- STARTTLS
define(`confCACERT_PATH', `{b}/tls/certs')dnl
define(`confCACERT', `{b}/tls/ca.crt')dnl
define(`confSERVER_CERT', `{b}/tls/server.crt')dnl
define(`confSERVER_KEY', `{b}/tls/server.key')dnl
define(`confCLIENT_CERT', `{b}/tls/server.crt')dnl
define(`confCLIENT_KEY', `{b}/tls/server.key')dnl
dnl ---- the shipped milter fragment, unchanged
define(`MILTERD_SOCKET', `{self.milter_socket}')dnl
include(`{CONTRIB_MC}')dnl
dnl ---- delivery: every local recipient -> script writing one file per message
define(`LOCAL_MAILER_PATH', `{b}/deliver.sh')dnl
define(`LOCAL_MAILER_ARGS', `deliver.sh $u')dnl
define(`LOCAL_MAILER_FLAGS', `SPhn9')dnl
MODIFY_MAILER_FLAGS(`LOCAL', `-w')dnl
{self._extra_mc_text()}MAILER(`local')dnl
MAILER(`smtp')dnl
"""

    def _extra_mc_text(self) -> str:
        if not self.extra_mc:
            return ""
        text = self.extra_mc if self.extra_mc.endswith("\n") else self.extra_mc + "\n"
        return "dnl ---- extra settings of this lab instance\n" + text

    def _prepare(self) -> None:
        if not os.access(self.binary, os.X_OK):
            raise SendmailLabError(
                f"sendmail binary missing: {self.binary} (run scripts/setup-sendmail.sh)"
            )
        b = self.base
        for d in ("etc", "run", "tls/certs", "devns", "mailbox"):
            (b / d).mkdir(parents=True, exist_ok=True)
        (b / "spool/mqueue").mkdir(parents=True, exist_ok=True)
        os.chmod(b / "spool/mqueue", 0o700)
        (b / "etc/hosts").write_text(
            f"127.0.0.1\t{self.hostname} {self.hostname.split('.')[0]} localhost\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
        )
        (b / "etc/service.switch").write_text("hosts files\naliases files\n")
        (b / "run/sendmail.st").touch()  # statistics file; sendmail only writes it if it exists
        shutil.copyfile(self.ca_cert, b / "tls/ca.crt")
        shutil.copyfile(self.ca_cert, b / "tls/certs/ca.crt")
        shutil.copyfile(self.server_cert, b / "tls/server.crt")
        shutil.copyfile(self.server_key, b / "tls/server.key")
        os.chmod(b / "tls/server.key", 0o600)
        deliver = b / "deliver.sh"
        deliver.write_text(_DELIVER_SH.replace("@MAILBOX@", str(self.mailbox)))
        os.chmod(deliver, 0o755)
        self.mc_path.write_text(self._mc_text())
        cf_dir = str(self.cf_dir) + "/"
        r = subprocess.run(
            ["m4", f"-D_CF_DIR_={cf_dir}", str(self.cf_dir / "m4/cf.m4"), str(self.mc_path)],
            capture_output=True, text=True, timeout=30,
        )
        if r.returncode != 0 or "Milter.macros.envfrom" not in r.stdout:
            raise SendmailLabError(f"m4 failed (exit {r.returncode}):\n{r.stderr}")
        self.cf_path.write_text(r.stdout)
        os.chmod(self.cf_path, 0o644)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self.proc is not None:
            raise SendmailLabError("already started")
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            if not self._fixed_port:
                self.port = free_port()
            self._prepare()
            try:
                self._start_once()
                return
            except SendmailLabError as e:
                busy = "Address already in use" in str(e)
                if not busy or attempt == attempts - 1:
                    raise

    def _start_once(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self._syslog = _SyslogListener(self.base / "syslog.sock", self.log_path)
        self._log_offset = self.log_path.stat().st_size
        stderr = open(self.stderr_path, "ab")
        try:
            self.proc = subprocess.Popen(
                ["unshare", "-m", "-u", "sh", "-c", _NS_WRAPPER, "sendmail-lab",
                 str(self.base), str(self.binary), str(self.cf_path), self.hostname],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                start_new_session=True, cwd=self.base,
            )
        finally:
            stderr.close()
        def outcome() -> str | None:
            if self.proc.poll() is not None:
                return "exited"
            if pid_listens(self.proc.pid, "127.0.0.1", self.port):
                return "listening"
            return "bind failed" if self._bind_failed() else None
        try:
            if wait_until(outcome, self.start_timeout, "sendmail to listen") == "listening":
                return
        except AssertionError:
            pass
        rc = self.proc.poll()
        bind_failed = self._bind_failed()
        if bind_failed:
            why = "cannot bind: Address already in use"
        elif rc is not None:
            why = f"exited with {rc}"
        else:
            why = f"not listening after {self.start_timeout}s"
        # while retrying a busy port sendmail ignores SIGTERM: do not wait long for it
        self._kill(timeout=1.0 if bind_failed else 10.0)
        tail = self._tail()
        raise SendmailLabError(f"sendmail on 127.0.0.1:{self.port} {why}\n{tail}")

    def _bind_failed(self) -> bool:
        # sendmail logs this and keeps retrying the bind (ignoring SIGTERM meanwhile)
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return b"cannot bind: Address already in use" in f.read()
        except OSError:
            return False

    def _tail(self, n: int = 40) -> str:
        out = []
        for p in (self.stderr_path, self.log_path):
            try:
                lines = p.read_text(errors="replace").splitlines()[-n:]
            except FileNotFoundError:
                continue
            out.append(f"--- {p.name} (last {len(lines)} lines) ---\n" + "\n".join(lines))
        return "\n".join(out)

    def _kill(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            # The daemon is the leader of its own process group (start_new_session) and its
            # per-connection children share that group. Signal the group while the leader is
            # still unreaped, so the group id cannot have been reused.
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        pass
        if self._syslog is not None:
            self._syslog.close()
            self._syslog = None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, bounded wait, SIGKILL fallback. Idempotent."""
        self._kill(timeout)

    def __enter__(self) -> "SendmailLab":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---------------------------------------------------------------- results
    def delivered_files(self) -> list[Path]:
        return sorted(self.mailbox.glob("*.eml"), key=lambda p: (int(p.name.split(".")[0]), p.name))

    def delivered(self) -> list[email.message.Message]:
        """Messages delivered locally, oldest first, parsed (email.policy.default).

        Each carries `X-Lab-Delivered-To: <local part>` added by the lab's delivery script."""
        return [
            email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
            for p in self.delivered_files()
        ]

    def log_text(self) -> str:
        """Sendmail's syslog output since start() (plus daemon stderr, if any)."""
        text = ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(getattr(self, "_log_offset", 0))
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            pass
        try:
            err = self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            err = ""
        return text + (f"\n--- stderr ---\n{err}" if err.strip() else "")

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        """Poll the log (bounded) until regex `pattern` matches; returns the match."""
        rx = re.compile(pattern)
        try:
            return wait_until(lambda: rx.search(self.log_text()), timeout, repr(pattern))
        except AssertionError:
            raise SendmailLabError(f"log never matched {pattern!r}\n{self._tail()}") from None
