"""A private Postfix instance on loopback, for the tests, the demo and the benchmarks.

Everything lives under one directory (config, queue, data, maildir, ``maillog_file``); nothing is
chrooted, so absolute milter socket paths work; nothing touches the system's Postfix.  The
milter-related settings come from ``contrib/postfix/main.cf.milterd`` (and ``main.cf.policy``),
the very files users add, complete for the Debian package's socket paths: the lab rewrites only
those socket values to its private ones, so the tests prove the shipped config.  Needs root
(Postfix's master drops to the ``postfix`` user itself) and Debian's postfix package
(``scripts/setup.sh`` installs it).
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from milterd.lab.net import free_port, pid_listens, wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTRIB_MAIN_CF = REPO_ROOT / "contrib" / "postfix" / "main.cf.milterd"
CONTRIB_POLICY_CF = REPO_ROOT / "contrib" / "postfix" / "main.cf.policy"

_MASTER_CF = """\
# Private lab instance: every service with chroot = n (absolute milter socket paths work).
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


#: The socket values the contrib fragments name: the Debian package's paths, relative to
#: Postfix's queue directory.  The lab rewrites exactly these to its private sockets.
PACKAGE_MILTER_SOCKET = "unix:milterd/milter.sock"
PACKAGE_POLICY_SERVICE = "unix:milterd/policy.sock"


def contrib_settings(path: Path, replace: dict[str, str] | None = None) -> list[str]:
    """The ``name = value`` lines of a contrib fragment, with known values rewritten.

    ``replace`` maps a value the fragment names (e.g. :data:`PACKAGE_MILTER_SOCKET`) to the one
    to use instead; it must occur in the fragment as a whole value or list item, so a fragment
    that changes its socket cannot leave the lab silently testing something else.  The fragments
    hold no placeholders: they are complete for the package, and what a user adds is what runs.
    """
    import re

    lines = []
    found = dict.fromkeys(replace or {}, 0)
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        for old, new in (replace or {}).items():
            pattern = rf"(?<![^\s,=]){re.escape(old)}(?![^\s,])"
            line, n = re.subn(pattern, lambda _m, new=new: new, line)
            found[old] += n
        lines.append(line)
    missing = [old for old, n in found.items() if not n]
    if missing:
        raise ValueError(f"{path}: names none of {missing} (the lab replaces these values)")
    return lines


@dataclass
class PostfixTLS:
    cert: Path
    key: Path
    ca: Path


@dataclass
class PostfixLab:
    """``start()`` it, send mail to ``127.0.0.1:port``, read ``delivered()``, ``stop()`` it."""

    milter_socket: str | None            # "unix:/abs/path" or "inet:PORT@127.0.0.1" or None
    tls: PostfixTLS | None = None
    local_domains: tuple[str, ...] = ("contoso.test",)
    hostname: str = "mx.contoso.test"
    policy_service: str | None = None    # "inet:127.0.0.1:PORT": check_policy_service
    extra: dict[str, str] = field(default_factory=dict)   # more main.cf settings
    port: int = 0
    base: Path | None = None
    with_contrib: bool = True            # use contrib/postfix/main.cf.milterd for milter settings
    listen_address: str = "127.0.0.1"
    # name -> loopback address, seen by this instance only (a private /etc/hosts bind-mounted in
    # a mount namespace): lets outbound tests relay to "partner domains" without DNS
    hosts: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.base is None:
            # Postfix's own processes run as user postfix: the tree must be reachable by it,
            # which pytest's 0700 tmp dirs are not.
            self.base = Path(tempfile.mkdtemp(prefix="milterd-postfix-"))
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        if not self.port:
            self.port = _free_port_on(self.listen_address)
        self.conf = self.base / "etc"
        self.queue = self.base / "queue"
        self.maildir = self.base / "mail"
        self.maillog = self.base / "maillog"
        self._started = False

    # -- configuration ------------------------------------------------------------------------
    def main_cf(self) -> str:
        b = self.base
        s = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(b / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": self.hostname.split(".", 1)[-1],
            "myorigin": "$mydomain",
            "mydestination": "",
            # Postfix refuses a 127.x address that is not configured on an interface; the
            # master.cf service line binds the exact address anyway.
            "inet_interfaces": ("127.0.0.1" if self.listen_address == "127.0.0.1" else "all"),
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            **self._ipv6_settings(),
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(b),
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtpd_banner": "$myhostname ESMTP",
            "virtual_mailbox_domains": " ".join(self.local_domains),
            "virtual_mailbox_base": str(self.maildir),
            "virtual_mailbox_maps": "static:inbox/",
            "virtual_uid_maps": "static:65534",
            "virtual_gid_maps": "static:65534",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_error_sleep_time": "0",
            "smtpd_soft_error_limit": "1000",
            "smtpd_hard_error_limit": "1000",
            "default_process_limit": "200",
            "smtputf8_enable": "no",
            "message_size_limit": "52428800",
            "virtual_mailbox_limit": "0",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "header_size_limit": "4194304",
            "smtp_host_lookup": "native",
            "disable_dns_lookups": "yes",
            "delay_warning_time": "0",
            "queue_run_delay": "300s",
        }
        if self.tls:
            s.update({
                "smtpd_tls_security_level": "may",
                "smtpd_tls_cert_file": str(self.tls.cert),
                "smtpd_tls_key_file": str(self.tls.key),
                "smtpd_tls_CAfile": str(self.tls.ca),
                "smtpd_tls_ask_ccert": "yes",
                "smtpd_tls_received_header": "yes",
                "smtpd_tls_loglevel": "1",
            })
        lines = [f"{k} = {v}" for k, v in s.items()]
        if self.milter_socket:
            if self.with_contrib:
                lines += contrib_settings(CONTRIB_MAIN_CF,
                                          {PACKAGE_MILTER_SOCKET: self.milter_socket})
            else:
                lines.append(f"smtpd_milters = {self.milter_socket}")
        if self.policy_service:
            lines += contrib_settings(CONTRIB_POLICY_CF,
                                      {PACKAGE_POLICY_SERVICE: self.policy_service})
        lines += [f"{k} = {v}" for k, v in self.extra.items()]
        return "\n".join(_last_wins(lines)) + "\n"

    @property
    def ipv6(self) -> bool:
        """Listening on an IPv6 address (``listen_address = "::1"``)."""
        return ":" in self.listen_address

    def _ipv6_settings(self) -> dict[str, str]:
        if not self.ipv6:
            return {}
        # Both protocols (Postfix's own services and the milter/policy clients keep IPv4
        # loopback), the IPv6 loopback trusted like 127.0.0.0/8.
        return {"inet_interfaces": f"127.0.0.1, [{self.listen_address}]",
                "inet_protocols": "all",
                "mynetworks": f"127.0.0.0/8 [{self.listen_address}]/128"}

    @property
    def listen_spec(self) -> str:
        """master.cf service name: ``127.0.0.1:PORT`` or ``[::1]:PORT``."""
        host = f"[{self.listen_address}]" if self.ipv6 else self.listen_address
        return f"{host}:{self.port}"

    def write_config(self) -> None:
        self.conf.mkdir(parents=True, exist_ok=True)
        (self.conf / "main.cf").write_text(self.main_cf())
        (self.conf / "master.cf").write_text(
            _MASTER_CF.format(listen=self.listen_spec))
        for d in (self.maildir, self.base / "data", self.queue):
            d.mkdir(parents=True, exist_ok=True)
        os.chown(self.maildir, 65534, 65534)
        os.chown(self.base / "data", _uid("postfix"), -1)

    # -- lifecycle -------------------------------------------------------------------------------
    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["postfix", "-c", str(self.conf), *args], capture_output=True,
                              text=True, timeout=60, check=check)

    def start(self) -> "PostfixLab":
        if shutil.which("postfix") is None and not Path("/usr/sbin/postfix").exists():
            raise RuntimeError("Postfix is not installed: run scripts/setup.sh")
        self.write_config()
        r = self.postfix("check", check=False)
        if r.returncode != 0:
            raise RuntimeError(f"postfix check failed: {r.stdout}{r.stderr}{self.log_tail()}")
        if self.hosts:
            hosts_file = self.base / "hosts"
            hosts_file.write_text("127.0.0.1 localhost\n" + "".join(
                f"{addr} {name}\n" for name, addr in self.hosts.items()))
            os.chmod(hosts_file, 0o644)
            # The master and every child it forks keep this private mount namespace.
            r = subprocess.run(["unshare", "-m", "sh", "-c",
                                f'mount --bind "{hosts_file}" /etc/hosts && '
                                f'exec postfix -c "{self.conf}" start'],
                               capture_output=True, text=True, timeout=60)
        else:
            r = self.postfix("start", check=False)
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed: {r.stdout}{r.stderr}{self.log_tail()}")
        self._started = True
        if not wait_for_port(self.listen_address, self.port, timeout=30):
            self.stop()
            raise RuntimeError(f"postfix did not listen on {self.port}:{self.log_tail()}")
        return self

    def start_verified(self, attempts: int = 3, timeout: float = 15.0) -> "PostfixLab":
        """``start()``, then wait (bounded) until Postfix's master itself holds the listening
        socket: with other tests running, a port seen free may be taken before Postfix binds it,
        and a plain connect test would then be answered by someone else.  Retried on a fresh
        automatically chosen port."""
        last = ""
        for attempt in range(attempts):
            try:
                self.start()
            except RuntimeError as e:
                last = str(e)
            else:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if self.master_listens():
                        return self
                    time.sleep(0.05)
                last = f"master does not hold {self.listen_spec}:{self.log_tail()}"
                self.stop()
            if attempt < attempts - 1:
                self.port = _free_port_on(self.listen_address)
        raise RuntimeError(f"postfix did not start on {self.listen_spec}: {last}")

    def master_listens(self) -> bool:
        """True if the master process holds a LISTEN socket on listen_address:port."""
        pid = self.master_pid()
        return bool(pid) and pid_listens(pid, self.listen_address, self.port)

    def reload(self) -> None:
        self.write_config()
        self.postfix("reload")

    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if not self._started:
            return
        pid = self.master_pid()
        self.postfix("stop", check=False)
        deadline = time.monotonic() + 20
        while pid and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid and _alive(pid):
            os.kill(pid, 9)
        self._started = False

    def cleanup(self) -> None:
        self.stop()
        if self.base and self.base.exists():
            shutil.rmtree(self.base, ignore_errors=True)

    # -- inspection ------------------------------------------------------------------------------
    def delivered(self) -> list[email.message.EmailMessage]:
        """Messages delivered to the local maildir, oldest first, parsed."""
        new = self.maildir / "inbox" / "new"
        if not new.exists():
            return []
        files = sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime, p.name))
        return [email.message_from_bytes(f.read_bytes(), policy=email.policy.default)
                for f in files]  # type: ignore[misc]

    def wait_delivered(self, count: int, timeout: float = 20) -> list[email.message.EmailMessage]:
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.delivered()
            if len(msgs) >= count or time.monotonic() > deadline:
                return msgs
            time.sleep(0.05)

    def queue_ids(self) -> list[str]:
        r = subprocess.run(["postqueue", "-c", str(self.conf), "-j"], capture_output=True,
                           text=True, timeout=30)
        import json

        return [json.loads(line)["queue_id"] for line in r.stdout.splitlines() if line.strip()]

    def log_text(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n--- postfix maillog tail ---\n" + "\n".join(
            self.log_text().splitlines()[-lines:])


def _last_wins(lines: list[str]) -> list[str]:
    """One line per parameter, with its last value (the one Postfix uses anyway).

    A parameter given twice makes every Postfix process log "overriding earlier entry" as it
    starts; with ``maillog_file`` those warnings go through postlogd's datagram socket, and
    postlogd sends its own to that socket before it reads it: a few duplicates fill the queue
    (net.unix.max_dgram_qlen, 10) and postlogd, then every process that logs, blocks for good.
    """
    out: dict[str, str] = {}
    for line in lines:
        name, sep, _ = line.partition("=")
        out[name.strip() if sep else line] = line
    return list(out.values())


def _free_port_on(address: str) -> int:
    """An ephemeral port free on ``address`` (IPv4 or IPv6)."""
    if ":" not in address:
        return free_port()
    import socket

    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid
