"""Listening sockets that say what is wrong: TCP and unix listeners for every side server (and the
milter socket's checks before libmilter creates it).

A socket that cannot be made fails with :class:`ListenerError`, whose message names the config
key, the path, the user, the missing permission and the fix; a stale unix socket is removed when
milterd may (and who left it is logged), a live one is never taken over.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import socket
import stat
from pathlib import Path

log = logging.getLogger(__name__)


class ListenerError(Exception):
    """A listener cannot be set up; the message names the key, path, user and what is missing."""


def whoami() -> str:
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _user_name() -> str:
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _describe_dir(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        return f"{path} ({exc.strerror})"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    sticky = ", sticky" if st.st_mode & stat.S_ISVTX else ""
    return f"{path} (mode {stat.S_IMODE(st.st_mode):04o}{sticky}, owner {owner}:{group})"


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path("/")


def _install_dir(directory: Path, group: str | None) -> str:
    g = f" -g {group}" if group else ""
    return f"install -d -o {_user_name()}{g} -m 0750 {directory}"


def _may_create_in(directory: Path) -> bool:
    if os.access in os.supports_effective_ids:
        return os.access(directory, os.W_OK | os.X_OK, effective_ids=True)
    return os.access(directory, os.W_OK | os.X_OK)


def _read_only(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _in_use(path: str) -> bool:
    """Whether a process accepts connections on the unix socket ``path`` (False: stale, or we
    may not connect to it, which tells nothing either way)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def tcp_listener(host: str, port: int, *, key: str) -> socket.socket:
    """A listening TCP socket on ``host`` (IPv4/IPv6 literal or a name), errors naming ``key``."""
    from milterd.core.config import listen_family

    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        sock = socket.socket(listen_family(host, port), socket.SOCK_STREAM)
    except OSError as exc:
        raise ListenerError(f"{key}: cannot listen on {where}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"{key}: cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


def prepare_unix_socket(path: str, *, key: str, group: str | None = None, dir_gid: int = -1,
                        dir_mode: int = 0o750) -> None:
    """Make sure this process can create a listening unix socket at ``path``; shared by the
    policy socket and the milter socket (checked before libmilter, which says only "cannot
    opensocket").  Creates a missing directory (``dir_mode``, group ``dir_gid``); removes a stale
    socket; refuses a socket another process is serving on, and anything else in the way.
    Every :class:`ListenerError` names the config ``key``, the path, the user milterd runs as,
    what permission is missing and on what, and the fix (``group``: the socket's group, for
    the commands it suggests)."""
    p = Path(path)
    parent = p.parent
    user = whoami()
    if not os.path.isdir(parent):
        if os.path.lexists(parent):
            raise ListenerError(f"{key}: {parent} (the socket's directory) is not a directory")
        try:
            parent.mkdir(parents=True, mode=dir_mode)
        except PermissionError:
            above = _nearest_existing(parent.parent)
            raise ListenerError(
                f"{key}: cannot create the directory {parent} for the socket {path}: "
                f"permission denied for user {user}: it needs write and search permission on "
                f"{_describe_dir(above)}. Fix (as root): "
                f"{_install_dir(parent, group)}") from None
        except OSError as exc:
            raise ListenerError(f"{key}: cannot create the directory {parent} for the socket "
                                f"{path}: {exc.strerror}") from None
        if dir_gid != -1:
            try:
                os.chown(parent, -1, dir_gid)
            except PermissionError:
                raise ListenerError(
                    f"{key}: created {parent} but cannot give it to group {group!r}: user "
                    f"{user} is neither root nor a member of {group!r}. Fix (as root): "
                    f"{_install_dir(parent, group)}") from None
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        pass
    except PermissionError:
        raise ListenerError(f"{key}: cannot look into {_describe_dir(parent)}: permission "
                            f"denied for user {user}: it needs search (x) permission on it. "
                            f"Fix (as root): {_install_dir(parent, group)}") from None
    except OSError as exc:
        raise ListenerError(f"{key}: cannot inspect {path}: {exc.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenerError(f"{key}: {path} exists and is not a socket; not removing it "
                                "(remove it yourself if it is not needed, or choose another "
                                "path)")
        if _in_use(path):
            raise ListenerError(f"{key}: {path} is in use: another process accepts "
                                "connections on it (another milterd?); stop it first, or "
                                "choose another path")
        try:
            p.unlink()  # stale socket from an earlier run (libmilter would do the same)
        except FileNotFoundError:
            pass
        except PermissionError:
            left_by = _owner(st.st_uid)
            why = ""
            if st.st_uid == 0 and os.geteuid() != 0:
                why = (" (an earlier milterd started as root? libmilter leaves its socket "
                       "behind when it runs as root)")
            raise ListenerError(
                f"{key}: a stale socket {path} left by {left_by}{why} is in the way, and user "
                f"{user} cannot remove it: that needs write permission on "
                f"{_describe_dir(parent)}" + (" and, the directory being sticky, owning the "
                                              "socket or the directory" if
                                              parent.stat().st_mode & stat.S_ISVTX else "") +
                f". Fix (as root): rm {path}; then always start milterd as the same user"
            ) from None
        else:
            if st.st_uid != os.geteuid():
                log.info("%s: removed a stale socket %s left by %s", key, path,
                         _owner(st.st_uid))
    if not _may_create_in(parent):
        if _read_only(parent):
            raise ListenerError(f"{key}: cannot create the socket {path}: {parent} is on a "
                                "read-only file system (under systemd: ReadWritePaths=)")
        if "milterd" in parent.name:  # milterd's own directory: fix it
            fix = _install_dir(parent, group)
        else:  # a shared one (/run, Postfix's spool): do not widen it, use a subdirectory
            own = parent / "milterd"
            fix = (f"give the socket a directory of its own: {_install_dir(own, group)} and set "
                   f'{key} = "unix:{own / p.name}" (or, if {parent} is milterd\'s alone: '
                   f"chown {_user_name()} {parent})")
        raise ListenerError(
            f"{key}: cannot create the socket {path}: permission denied for user {user}: it "
            f"needs write and search permission on {_describe_dir(parent)}. Fix (as root): "
            f"{fix}")


def unix_listener(path: str, group: str | None, *, key: str,
                  group_key: str) -> socket.socket:
    """A listening unix socket at ``path``, mode 0660, group ``group`` ("" / None: unchanged).

    A stale socket file is removed; a live one, or any other file in the way, is an error.  Every
    error names the config key, the path, the user milterd runs as and what is missing
    (:func:`prepare_unix_socket`).
    """
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ListenerError(f"{group_key}: group {group!r} does not exist (needed for the "
                                f"socket {path})") from None
    user = whoami()
    parent = Path(path).parent
    prepare_unix_socket(path, key=key, group=group or None, dir_gid=gid)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # never wider than 0660, not even before the chmod below
    try:
        sock.bind(path)
    except PermissionError:
        sock.close()
        raise ListenerError(f"{key}: cannot create the socket {path}: permission denied for "
                            f"user {user}: it needs write and search permission on "
                            f"{_describe_dir(parent)}") from None
    except OSError as exc:
        sock.close()
        raise ListenerError(f"{key}: cannot create the socket {path}: "
                            f"{exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    try:
        os.chmod(path, 0o660)
        if gid != -1:
            os.chown(path, -1, gid)
        sock.listen(128)
    except PermissionError:
        sock.close()
        _unlink_quietly(path)
        raise ListenerError(_group_refused(group_key, path, group)) from None
    except OSError as exc:
        sock.close()
        _unlink_quietly(path)
        raise ListenerError(f"{key}: cannot set up the socket {path}: {exc.strerror}") from None
    return sock


def _group_refused(group_key: str, path: str, group: str | None) -> str:
    return (f"{group_key}: cannot give the socket {path} to group {group!r}: permission denied "
            f"for user {whoami()} (neither root nor a member of {group!r})")


def set_socket_group(path: str, group: str | None, *, group_key: str) -> None:
    """Give an existing socket to ``group`` ("" / None: leave it); errors as
    :func:`unix_listener`'s."""
    if not group:
        return
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise ListenerError(f"{group_key}: group {group!r} does not exist (needed for the "
                            f"socket {path})") from None
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        raise ListenerError(_group_refused(group_key, path, group)) from None
    except OSError as exc:
        raise ListenerError(f"{group_key}: cannot give the socket {path} to group {group!r}: "
                            f"{exc.strerror}") from None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
