"""A private PostgreSQL cluster on loopback, for the tests and the labs (the fleet's shared store).

Usage::

    lab = PostgresLab().start()        # initdb (first time), start, wait until it answers
    store = open_store(lab.url)        # postgresql://milterd:PASSWORD@127.0.0.1:PORT/milterd
    lab.stop()                         # fast shutdown, by the postmaster's PID: "PostgreSQL is down"
    lab.start()                        # the same cluster, port and url again
    lab.cleanup()                      # stop and remove everything

Debian's server package (``scripts/setup-postgres.sh`` installs it; the binaries are found in
``/usr/lib/postgresql/<newest>/bin``, or ``$MILTERD_PG_BINDIR``).  Nothing touches a system
cluster.  The cluster lives in its own directory (a new one under the system temp dir unless
``root`` is given): data, unix socket and server log.  It listens on 127.0.0.1 and ::1 only, on a
free port, with scram-sha-256 password authentication for every connection (``pg_hba.conf`` by
initdb: local and loopback only); it has a ``milterd`` role owning a ``milterd`` database, and a
superuser ``postgres`` (:attr:`PostgresLab.admin_url`) for tests that must act on the server
(e.g. terminate sessions).  Passwords are random and never logged.

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` system user (the
package creates it; :attr:`server_user`), which must reach the cluster directory (pytest's
``tmp_path`` lives under a 0700 directory, so with ``root=None`` the lab uses a fresh directory
under ``/tmp``).  As any other user it runs as that user.

Readiness is a real connection (``pg_ctl start -w`` polls the server, then psycopg logs in), never
a sleep.  Stopping signals the postmaster's PID (SIGINT: fast shutdown; SIGQUIT: immediate) and
waits for that PID to go.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from milterd.lab.net import free_port
from milterd.lab.wait import wait_until

#: The role and database the lab creates for milterd.
ROLE = "milterd"
DATABASE = "milterd"
SUPERUSER = "postgres"


def find_bindir() -> Path:
    """Where Debian's PostgreSQL server binaries are (the newest major version installed)."""
    env = os.environ.get("MILTERD_PG_BINDIR")
    if env:
        return Path(env)
    base = Path("/usr/lib/postgresql")
    versions = []
    if base.is_dir():
        for d in base.iterdir():
            if d.name.isdigit() and (d / "bin" / "initdb").is_file():
                versions.append(int(d.name))
    if not versions:
        raise RuntimeError("no PostgreSQL server found under /usr/lib/postgresql "
                           "(run scripts/setup-postgres.sh)")
    return base / str(max(versions)) / "bin"


def _reachable(path: Path, uid: int, gid: int) -> bool:
    """True if ``uid``/``gid`` may traverse every directory down to ``path`` (mode bits only)."""
    p = path.resolve()
    for d in [*reversed(p.parents), p]:
        try:
            st = d.stat()
        except OSError:
            return False
        if st.st_uid == uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return False
    return True


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class PostgresLab:
    """One private cluster: :meth:`start` (initdb the first time), :meth:`stop`, :meth:`start`
    again, :meth:`cleanup`; :attr:`url` for milterd's ``[store] url``."""

    def __init__(self, root: str | Path | None = None, *, port: int | None = None,
                 bindir: str | Path | None = None):
        self.bindir = Path(bindir) if bindir else find_bindir()
        self._uid = os.getuid()
        if self._uid == 0:
            try:
                pw = pwd.getpwnam(SUPERUSER)
            except KeyError:
                raise RuntimeError("running as root, and there is no 'postgres' system user to "
                                   "run PostgreSQL as (run scripts/setup-postgres.sh)") from None
            self.server_user: str = pw.pw_name
            self._server_uid, self._server_gid = pw.pw_uid, pw.pw_gid
        else:
            self.server_user = pwd.getpwuid(self._uid).pw_name
            self._server_uid, self._server_gid = self._uid, os.getgid()
        parent = Path(root) if root is not None else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
            if not _reachable(parent, self._server_uid, self._server_gid):
                parent = None          # e.g. pytest's tmp_path as root: the server can't reach it
        self.dir = Path(tempfile.mkdtemp(prefix="milterd-pg-", dir=parent))
        os.chmod(self.dir, 0o700)
        if self._uid == 0:
            os.chown(self.dir, self._server_uid, self._server_gid)
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "server.log"
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.password = secrets.token_urlsafe(18)
        self._admin_password = secrets.token_urlsafe(18)
        self._initialised = False

    # -- addresses ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``postgresql://milterd:PASSWORD@127.0.0.1:PORT/milterd`` (contains the password)."""
        return f"postgresql://{ROLE}:{self.password}@{self.host}:{self.port}/{DATABASE}"

    @property
    def admin_url(self) -> str:
        """The superuser's url (to terminate sessions, inspect, …); contains the password."""
        return (f"postgresql://{SUPERUSER}:{self._admin_password}@{self.host}:{self.port}"
                f"/postgres")

    def url_with(self, *, user: str = ROLE, password: str | None = None,
                 database: str = DATABASE, port: int | None = None) -> str:
        """A url with another password/port/database (e.g. a wrong password)."""
        return (f"postgresql://{user}:{self.password if password is None else password}@"
                f"{self.host}:{self.port if port is None else port}/{database}")

    # -- processes ------------------------------------------------------------------------------
    def _as_server(self, argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
        if self._uid == 0:
            argv = ["runuser", "-u", self.server_user, "--", *argv]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        return subprocess.run(argv, cwd=self.dir, env=env, capture_output=True, text=True, **kw)

    def _initdb(self) -> None:
        pwfile = self.dir / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._admin_password + "\n")
        if self._uid == 0:
            os.chown(pwfile, self._server_uid, self._server_gid)
        try:
            r = self._as_server([str(self.bindir / "initdb"), "-D", str(self.data_dir),
                                 "-U", SUPERUSER, f"--pwfile={pwfile}", "--auth=scram-sha-256",
                                 "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions"],
                                timeout=120)
        finally:
            pwfile.unlink(missing_ok=True)
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed ({r.returncode}):\n{r.stdout[-2000:]}"
                               f"\n{r.stderr[-2000:]}")
        listen = "127.0.0.1,::1" if _ipv6_loopback() else "127.0.0.1"
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.write(
                "\n# milterd lab\n"
                f"listen_addresses = '{listen}'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.data_dir}'\n"
                "unix_socket_permissions = 0700\n"
                "password_encryption = 'scram-sha-256'\n"
                "fsync = off\n"                      # a test cluster: no OS-crash durability
                "full_page_writes = off\n"
                "shared_buffers = 16MB\n"
                "max_connections = 100\n"
                "logging_collector = off\n"
                "log_min_messages = warning\n"
                "log_connections = off\n")

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
            return int(first)
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs."""
        pid = self._postmaster_pid()
        return pid if pid is not None and self._alive(pid) else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 60.0) -> "PostgresLab":
        """Start the cluster (creating it, the role and the database the first time) and return
        once a real login as ``milterd`` works.  Raises RuntimeError (with the server log's tail)
        when it cannot."""
        if self.running:
            return self
        if not self._initialised:
            self._initdb()
        r = self._as_server([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir),
                             "-l", str(self.log_path), "-w", "-t", str(int(timeout)), "start"],
                            timeout=timeout + 10)
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed ({r.returncode}): {r.stdout.strip()} "
                               f"{r.stderr.strip()}\n{self.log_tail()}")
        if not self._initialised:
            self._provision()
            self._initialised = True
        self._wait_login(timeout)
        return self

    def _provision(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(ROLE), sql.Literal(self.password)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(DATABASE), sql.Identifier(ROLE)))

    def _wait_login(self, timeout: float) -> None:
        import psycopg

        last: list[str] = []

        def login() -> bool:
            try:
                with psycopg.connect(self.url, connect_timeout=5) as conn:
                    conn.execute("SELECT 1").fetchone()
                return True
            except psycopg.Error as exc:
                last[:] = [type(exc).__name__]
                if not self.running:
                    raise RuntimeError(f"PostgreSQL exited:\n{self.log_tail()}") from None
                return False
        wait_until(login, timeout, lambda: f"a login to the lab PostgreSQL ({last})")

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop the server by its PID: ``fast`` (SIGINT: sessions are ended, a clean shutdown),
        ``immediate`` (SIGQUIT: no shutdown checkpoint; crash recovery at the next start) or
        ``smart`` (SIGTERM: waits for sessions to end).  Returns once the postmaster is gone;
        escalates to SIGQUIT, then SIGKILL, after ``timeout`` seconds each."""
        pid = self.pid
        if pid is None:
            return
        first = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT,
                 "smart": signal.SIGTERM}[mode]
        for sig in (first, signal.SIGQUIT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            try:
                wait_until(lambda: not self._alive(pid), timeout, f"postmaster {pid} to exit")
                return
            except AssertionError:
                continue

    def cleanup(self) -> None:
        """Stop the server and remove the cluster directory."""
        try:
            self.stop("fast")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PostgresLab":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- logs -----------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def sessions(self) -> int:
        """How many client sessions are connected to the ``milterd`` database (superuser)."""
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                               "AND pid <> pg_backend_pid()", (DATABASE,)).fetchone()
        return int(row[0])


__all__ = ["PostgresLab", "find_bindir", "ROLE", "DATABASE", "SUPERUSER"]


@contextlib.contextmanager
def running_postgres(root: str | os.PathLike | None = None) -> Iterator[PostgresLab]:
    """A started :class:`PostgresLab`, cleaned up (stopped, its directory removed) on exit —
    also when it fails to start: a store test that cannot provision its server fails."""
    lab = PostgresLab(root)
    try:
        lab.start()
        yield lab
    finally:
        lab.cleanup()
