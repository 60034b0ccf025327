"""Postfix: what ``postconf`` says, parsed into :class:`PostfixFacts`, and the pure checks over it.

Facts come from ``postconf -c DIR -x`` (every parameter, expanded), ``-n`` (which are set in
main.cf), ``-F`` (master.cf fields: chroot, command) and ``-Px`` (each service's ``-o``
overrides, expanded).  A parameter an smtpd(8) service overrides with ``-o`` is checked with the
value *that* service uses.  Files and sockets the checks need are probed once by the gathering
code (:mod:`milterd.doctor.gather`) into :class:`PathProbe` values, so every check here is a
pure function of its inputs.

Postfix semantics relied on (postconf(5), master(5), MILTER_README, SMTPD_POLICY_README):

* a ``unix:`` milter or policy socket path is relative to the queue directory (daemons run
  there); when the service is chrooted (master.cf chroot column ``y``; ``-`` is ``n`` since
  Postfix 3.0), an *absolute* path is also interpreted relative to the queue directory;
* smtpd runs as ``mail_owner`` with that user's primary group only (``set_ugid()`` calls
  ``setgroups(1, &gid)``): supplementary groups do not help it reach a socket;
* a milter's own macro list (``smfi_setsymlist``, sent in option negotiation) replaces
  ``milter_<stage>_macros`` for that milter (milter8.c "override … macro list");
* ``smtpd_milters`` entries may be ``{ name, default_action=… }``, overriding
  ``milter_default_action`` (whose default became ``shutdown`` in Postfix 3.11);
* ``permit*`` ends only the restriction list it is in: ``check_policy_service`` must come before
  any of them in its own list;
* ``smtpd_tls_CAfile`` is read before the chroot, ``smtpd_tls_CApath`` inside it.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

from milterd.doctor.model import Check, fail, ok, warn

if TYPE_CHECKING:
    from milterd.core.config import Config

TLS_MAIL_MACROS = ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}",
                   "{cert_issuer}")
RESTRICTION_LISTS = ("smtpd_client_restrictions", "smtpd_helo_restrictions",
                     "smtpd_sender_restrictions", "smtpd_relay_restrictions",
                     "smtpd_recipient_restrictions", "smtpd_data_restrictions")


# -- facts --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Service:
    """One master.cf service: ``name/type``, chroot column, command, its ``-o`` overrides."""

    name: str
    type: str
    chroot: bool
    command: str
    overrides: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.name}/{self.type}"

    def override(self, param: str) -> str | None:
        for k, v in self.overrides:
            if k == param:
                return v
        return None


@dataclass(frozen=True)
class PathProbe:
    """What ``lstat`` found at a path (as seen from outside any chroot) and its parents."""

    path: str
    exists: bool
    kind: str = ""               # socket | file | dir | other
    mode: int = 0
    uid: int = -1
    gid: int = -1
    dev: int = 0
    ino: int = 0
    # (directory, mode, uid, gid) for every parent directory, "/" first
    parents: tuple[tuple[str, int, int, int], ...] = ()


@dataclass(frozen=True)
class PostfixFacts:
    config_dir: str | None                       # None: the system's Postfix (no -c)
    params: tuple[tuple[str, str], ...]          # postconf -x: every parameter, expanded
    explicit: frozenset[str] = frozenset()       # postconf -n: set in main.cf
    services: tuple[Service, ...] = ()
    owner_uid: int = -1                          # mail_owner's uid and primary gid
    owner_gid: int = -1
    paths: tuple[PathProbe, ...] = ()            # probed by the gathering code
    # milterd's own sockets as probed (unix path -> probe), for "is it the same socket"
    ca_subjects: tuple[tuple[str, tuple[str, ...]], ...] = ()  # CA file/dir -> subject forms

    def get(self, name: str, service: Service | None = None) -> str:
        if service is not None:
            v = service.override(name)
            if v is not None:
                return v
        return self._params.get(name, "")

    @property
    def _params(self) -> dict[str, str]:
        return dict(self.params)

    def probe(self, path: str) -> PathProbe | None:
        for p in self.paths:
            if p.path == path:
                return p
        return None

    @property
    def queue_directory(self) -> str:
        return self.get("queue_directory") or "/var/spool/postfix"

    @property
    def smtpd_services(self) -> tuple[Service, ...]:
        return tuple(s for s in self.services if s.command == "smtpd")

    @property
    def smtp_services(self) -> tuple[Service, ...]:
        return tuple(s for s in self.services if s.command in ("smtp", "lmtp")
                     and s.type == "unix")

    @property
    def mail_version(self) -> tuple[int, ...]:
        return version_tuple(self.get("mail_version"))

    # fix lines name the instance the doctor read
    def postconf_e(self, assignment: str) -> str:
        return f"postconf{self._c} -e '{assignment}'"

    def postconf_p(self, service: Service, param: str, value: str | None) -> str:
        if value is None:
            return f"postconf{self._c} -PX '{service.key}/{param}'"
        return f"postconf{self._c} -P '{service.key}/{param}={value}'"

    @property
    def _c(self) -> str:
        return f" -c {self.config_dir}" if self.config_dir else ""


def version_tuple(text: str) -> tuple[int, ...]:
    m = re.match(r"(\d+(?:\.\d+)*)", text.strip())
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


# -- parsing postconf output ----------------------------------------------------------------------
def parse_postconf(text: str) -> dict[str, str]:
    """``name = value`` lines (``postconf -n``/``-x``/``-P``/``-F``) into a dict."""
    out = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip():
            out[name.strip()] = value.strip()
    return out


def parse_services(fields_text: str, overrides_text: str) -> tuple[Service, ...]:
    """master.cf services from ``postconf -F`` (fields) and ``postconf -Px`` (``-o``)."""
    fields: dict[tuple[str, str], dict[str, str]] = {}
    order: list[tuple[str, str]] = []
    for key, value in parse_postconf(fields_text).items():
        parts = key.rsplit("/", 2)
        if len(parts) != 3:
            continue
        svc = (parts[0], parts[1])
        if svc not in fields:
            fields[svc] = {}
            order.append(svc)
        fields[svc][parts[2]] = value
    overrides: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for key, value in parse_postconf(overrides_text).items():
        parts = key.rsplit("/", 2)
        if len(parts) == 3:
            overrides.setdefault((parts[0], parts[1]), []).append((parts[2], value))
    out = []
    for svc in order:
        f = fields[svc]
        command = (f.get("command") or "").split()
        out.append(Service(svc[0], svc[1], chroot=f.get("chroot", "-") in ("y", "yes"),
                           command=os.path.basename(command[0]) if command else "",
                           overrides=tuple(overrides.get(svc, ()))))
    return tuple(out)


def split_list(value: str) -> list[str]:
    """A Postfix list: items separated by commas/whitespace; ``{ … }`` is one item."""
    items, cur, depth = [], "", 0
    for ch in value:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if depth == 0 and (ch in ", \t\r\n"):
            if cur:
                items.append(cur)
            cur = ""
            continue
        cur += ch
        if depth == 0 and ch == "}":
            items.append(cur)
            cur = ""
    if cur:
        items.append(cur)
    return items


def brace_item(item: str) -> tuple[str, dict[str, str]]:
    """``{ name, key=value, … }`` -> (name, {key: value}); a plain item -> (item, {})."""
    item = item.strip()
    if not (item.startswith("{") and item.endswith("}")):
        return item, {}
    parts = [p.strip() for p in re.split(r"[,\s]+", item[1:-1]) if p.strip()]
    if not parts:
        return "", {}
    attrs = {}
    for p in parts[1:]:
        k, _, v = p.partition("=")
        attrs[k.strip()] = v.strip()
    return parts[0], attrs


# -- endpoints ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    kind: str                    # unix | inet
    path: str = ""
    host: str = ""
    port: int = 0


def milterd_endpoint(spec: str) -> Endpoint | None:
    """milterd's libmilter spec (``unix:/p``, ``inet:PORT@HOST``) or ListenAddress text."""
    proto, _, rest = spec.partition(":")
    if proto in ("unix", "local"):
        return Endpoint("unix", path=os.path.normpath(rest))
    if proto in ("inet", "inet6"):
        port, _, host = rest.partition("@")
        return Endpoint("inet", host=host.strip("[]"), port=int(port)) if port.isdigit() else None
    m = re.fullmatch(r"\[?([^\[\]]*?)\]?:(\d+)", spec)
    return Endpoint("inet", host=m.group(1), port=int(m.group(2))) if m else None


def postfix_endpoint(spec: str) -> Endpoint | None:
    """Postfix's ``unix:PATH`` / ``inet:HOST:PORT`` (``inet:[::1]:PORT``)."""
    proto, _, rest = spec.partition(":")
    if proto in ("unix", "local"):
        return Endpoint("unix", path=rest)
    if proto == "inet":
        host, _, port = rest.rpartition(":")
        return Endpoint("inet", host=host.strip("[]"), port=int(port)) if port.isdigit() else None
    return None


def host_path(path: str, queue_directory: str, chrooted: bool) -> str:
    """Where a daemon's ``unix:`` path really is: relative paths and, when chrooted, absolute
    ones too, are under the queue directory."""
    if chrooted or not path.startswith("/"):
        return os.path.normpath(os.path.join(queue_directory, path.lstrip("/")))
    return os.path.normpath(path)


_LOOPBACK = {"127.0.0.1", "localhost", "::1", "ip6-localhost"}


def same_inet(a: Endpoint, b: Endpoint) -> bool:
    if a.port != b.port:
        return False
    if not a.host or not b.host or a.host in ("0.0.0.0", "::") or b.host in ("0.0.0.0", "::"):
        return True
    return a.host == b.host or (a.host in _LOOPBACK and b.host in _LOOPBACK)


def names_path(pf: PostfixFacts, postfix_path: str, target: str) -> bool:
    """The Postfix ``unix:`` path names ``target`` (chrooted or not, or the same inode)."""
    q = pf.queue_directory
    candidates = {host_path(postfix_path, q, False), host_path(postfix_path, q, True)}
    if os.path.normpath(target) in candidates:
        return True
    t = pf.probe(os.path.normpath(target))
    return bool(t and t.exists and any(
        (p := pf.probe(c)) and p.exists and (p.dev, p.ino) == (t.dev, t.ino) for c in candidates))


def usable_by(probe: PathProbe, uid: int, gid: int, want: int) -> str | None:
    """Why ``uid``/``gid`` cannot use ``probe`` (``want``: 2 write, 4 read), or None."""
    if uid == 0:
        return None

    def allowed(mode: int, fuid: int, fgid: int, bit: int) -> bool:
        if uid == fuid:
            return bool(mode & (bit << 6))
        if gid == fgid:
            return bool(mode & (bit << 3))
        return bool(mode & bit)

    for d, mode, duid, dgid in probe.parents:
        if not allowed(mode, duid, dgid, 1):
            return f"directory {d} (mode {mode & 0o7777:04o}) is not searchable"
    if not allowed(probe.mode, probe.uid, probe.gid, want):
        return (f"{probe.path} is mode {probe.mode & 0o7777:04o} uid {probe.uid} "
                f"gid {probe.gid}")
    return None


# -- checks ---------------------------------------------------------------------------------------
def _milterd_entry(pf: PostfixFacts, value: str, listen: str) -> tuple[str, dict] | None:
    want = milterd_endpoint(listen)
    for item in split_list(value):
        name, attrs = brace_item(item)
        ep = postfix_endpoint(name)
        if want is None or ep is None or ep.kind != want.kind:
            continue
        if ep.kind == "unix" and names_path(pf, ep.path, want.path):
            return name, attrs
        if ep.kind == "inet" and same_inet(ep, want):
            return name, attrs
    return None


def postfix_socket_name(pf: PostfixFacts, listen: str) -> str:
    """How main.cf should name milterd's ``listen`` socket."""
    ep = milterd_endpoint(listen)
    if ep is None:
        return listen
    if ep.kind == "inet":
        host = f"[{ep.host}]" if ":" in ep.host else (ep.host or "127.0.0.1")
        return f"inet:{host}:{ep.port}"
    q = pf.queue_directory.rstrip("/") + "/"
    return f"unix:{ep.path[len(q):]}" if ep.path.startswith(q) else f"unix:{ep.path}"


def check_smtpd_milters(pf: PostfixFacts, config: "Config") -> Check:
    cid = "postfix.smtpd_milters"
    listen = config.milter.listen
    name = postfix_socket_name(pf, listen)
    if not pf.smtpd_services:
        return fail(cid, "master.cf has no smtpd service", "")
    bad = []
    for s in pf.smtpd_services:
        if _milterd_entry(pf, pf.get("smtpd_milters", s), listen) is None:
            bad.append(s)
    if not bad:
        return ok(cid, f"milterd's socket ({listen}) is in smtpd_milters of every smtpd service "
                       f"({', '.join(s.key for s in pf.smtpd_services)})")
    s = bad[0]
    current = pf.get("smtpd_milters", s)
    if s.override("smtpd_milters") is not None:
        items = split_list(current)
        fix = pf.postconf_p(s, "smtpd_milters", ",".join([name, *items]))
        where = f"master.cf {s.key} -o smtpd_milters={current}"
    else:
        fix = pf.postconf_e(f"smtpd_milters = {', '.join([name, *split_list(current)])}")
        where = f"smtpd_milters = {current}"
    return fail(cid, f"{where}: milterd's socket {listen} is missing; mail through "
                     f"{', '.join(x.key for x in bad)} is never checked", fix)


def check_milter_socket_access(pf: PostfixFacts, config: "Config") -> Check:
    """The socket each smtpd service names is reachable from its chroot, the same socket milterd
    listens on, and writable by mail_owner's uid/primary group."""
    cid = "postfix.milter_socket_access"
    want = milterd_endpoint(config.milter.listen)
    if want is None or want.kind != "unix":
        return ok(cid, f"milterd listens on TCP ({config.milter.listen}): no chroot or file "
                       "permission applies")
    target = pf.probe(want.path)
    problems, fix = [], ""
    for s in pf.smtpd_services:
        entry = _milterd_entry(pf, pf.get("smtpd_milters", s), config.milter.listen)
        if entry is None:
            continue  # reported by postfix.smtpd_milters
        ep = postfix_endpoint(entry[0])
        assert ep is not None
        real = host_path(ep.path, pf.queue_directory, s.chroot)
        p = pf.probe(real)
        jail = f" (smtpd {s.key} is chrooted to {pf.queue_directory})" if s.chroot else ""
        if p is None or not p.exists or p.kind != "socket":
            problems.append(f"{s.key}: {entry[0]} is {real}{jail}, where there is "
                            f"{'no socket' if not p or not p.exists else 'no socket but a ' + p.kind}")
            q = pf.queue_directory.rstrip("/") + "/"
            if s.chroot and not want.path.startswith(q):
                fix = (f"[milter] listen = \"unix:{q}milterd/milter.sock\"   (milterd.toml; "
                       f"and {pf.postconf_e('smtpd_milters = unix:milterd/milter.sock')})")
            elif s.chroot:
                fix = pf.postconf_e(f"smtpd_milters = unix:{want.path[len(q):]}")
            else:
                fix = pf.postconf_e(f"smtpd_milters = unix:{want.path}")
            continue
        if target and target.exists and (p.dev, p.ino) != (target.dev, target.ino):
            problems.append(f"{s.key}: {real} is not the socket milterd listens on ({want.path})")
            continue
        why = usable_by(p, pf.owner_uid, pf.owner_gid, 2)
        if why:
            problems.append(f"{s.key}: mail_owner {pf.get('mail_owner')} (uid {pf.owner_uid}, "
                            f"gid {pf.owner_gid}) cannot connect: {why}")
            fix = (f'[milter] group = "{_group_name(pf.owner_gid)}"   (milterd.toml: the socket '
                   "is created mode 0660 with this group)")
    if problems:
        return fail(cid, "; ".join(problems), fix)
    return ok(cid, f"smtpd reaches {want.path} and may connect to it")


def _group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def check_milter_default_action(pf: PostfixFacts, config: "Config") -> Check:
    cid = "postfix.milter_default_action"
    problems, fix = [], ""
    for s in pf.smtpd_services:
        entry = _milterd_entry(pf, pf.get("smtpd_milters", s), config.milter.listen)
        if entry and entry[1].get("default_action", "tempfail") != "tempfail" \
                and "default_action" in entry[1]:
            problems.append(f"smtpd_milters entry {{ {entry[0]}, default_action="
                            f"{entry[1]['default_action']} }}")
            fix = pf.postconf_e(f"smtpd_milters = {postfix_socket_name(pf, config.milter.listen)}")
            continue
        value = pf.get("milter_default_action", s)
        if value != "tempfail" and not (entry and entry[1].get("default_action") == "tempfail"):
            if s.override("milter_default_action") is not None:
                problems.append(f"master.cf {s.key} -o milter_default_action={value}")
                fix = pf.postconf_p(s, "milter_default_action", None)
            else:
                default = "" if "milter_default_action" in pf.explicit else \
                    " (Postfix's default; 3.11 changed it to shutdown)"
                problems.append(f"milter_default_action = {value}{default}")
                fix = pf.postconf_e("milter_default_action = tempfail")
    if problems:
        return fail(cid, f"{'; '.join(sorted(set(problems)))}: when milterd is down or slow "
                         "mail is not tempfailed (accept: delivered unchecked)", fix)
    return ok(cid, "milter_default_action = tempfail (milterd down: 4xx, the sender retries)")


def _smtpd_param(pf: PostfixFacts, cid: str, param: str, good: Iterable[str], want: str,
                 why: str) -> Check:
    good = set(good)
    for s in pf.smtpd_services:
        value = pf.get(param, s)
        if value.lower() not in good:
            if s.override(param) is not None:
                return fail(cid, f"master.cf {s.key} -o {param}={value}: {why}",
                            pf.postconf_p(s, param, None))
            return fail(cid, f"{param} = {value}: {why}", pf.postconf_e(f"{param} = {want}"))
    return ok(cid, f"{param} = {pf.get(param)}")


def check_tls_security_level(pf: PostfixFacts, config: "Config") -> Check:
    cid = "postfix.smtpd_tls_security_level"
    for s in pf.smtpd_services:
        level = pf.get("smtpd_tls_security_level", s)
        if level in ("may", "encrypt"):
            continue
        legacy = pf.get("smtpd_use_tls", s) == "yes" or pf.get("smtpd_enforce_tls", s) == "yes"
        if level == "" and legacy:
            continue
        where = (f"master.cf {s.key} -o smtpd_tls_security_level={level}"
                 if s.override("smtpd_tls_security_level") is not None
                 else f"smtpd_tls_security_level = {level or '(empty)'}")
        return fail(cid, f"{where}: smtpd offers no STARTTLS, no partner can present a "
                         "certificate", pf.postconf_e("smtpd_tls_security_level = may"))
    return ok(cid, f"smtpd_tls_security_level = {pf.get('smtpd_tls_security_level')}")


def check_ask_ccert(pf: PostfixFacts, config: "Config") -> Check:
    return _smtpd_param(pf, "postfix.smtpd_tls_ask_ccert", "smtpd_tls_ask_ccert", ("yes",),
                        "yes", "smtpd never asks for a client certificate, so no partner "
                               "certificate is ever seen and every partner is refused")


def check_ca(pf: PostfixFacts, config: "Config") -> Check:
    """A CA file/path exists (read before the chroot / inside it), and holds the issuers the
    partners' trusted_issuers name."""
    cid = "postfix.smtpd_tls_CAfile"
    receive = [p for p in config.partners if p.receive]
    if not receive:
        return ok(cid, "no receive partners: no client certificate needs to verify")
    needs_chain = [p for p in receive if not p.pinned]
    problems, fix = [], ""
    sources: list[str] = []
    for s in pf.smtpd_services or (None,):  # type: ignore[assignment]
        cafile = pf.get("smtpd_tls_CAfile", s)
        capath = pf.get("smtpd_tls_CApath", s)
        here = []
        if cafile:
            p = pf.probe(os.path.normpath(cafile))
            if p is None or not p.exists or p.kind != "file":
                problems.append(f"smtpd_tls_CAfile = {cafile}: no such file")
            else:
                here.append(os.path.normpath(cafile))
        if capath:
            real = host_path(capath, pf.queue_directory, bool(s and s.chroot)) \
                if capath.startswith("/") and s and s.chroot else os.path.normpath(capath)
            p = pf.probe(real)
            if p is None or not p.exists or p.kind != "dir":
                problems.append(f"smtpd_tls_CApath = {capath}: no such directory"
                                + (f" inside the chroot ({real})" if s and s.chroot else ""))
            else:
                here.append(real)
        if not cafile and not capath:
            problems.append("smtpd_tls_CAfile and smtpd_tls_CApath are empty: no client "
                            "certificate ever verifies")
        sources = here
    if problems and needs_chain:
        fix = pf.postconf_e("smtpd_tls_CAfile = /etc/ssl/certs/ca-certificates.crt")
        return fail(cid, "; ".join(dict.fromkeys(problems)) +
                    f" (partners that need a verified chain: "
                    f"{', '.join(p.entry for p in needs_chain)})", fix)
    subjects = dict(pf.ca_subjects)
    known = [form.casefold() for src in sources for form in subjects.get(src, ())]
    missing = []
    for p in receive:
        for issuer in p.trusted_issuers:
            if issuer.casefold() not in known:
                missing.append(f"{issuer!r} ({p.entry})")
    if missing:
        return fail(cid, f"the CA file/path ({', '.join(sources) or 'none'}) holds no CA "
                         f"certificate named {', '.join(dict.fromkeys(missing))}: those "
                         "partners' certificates never verify",
                    f"cat PARTNER-CA.pem >> {sources[0] if sources else 'CAFILE'}")
    if problems:
        return ok(cid, "every receive partner is pinned: no CA needed ("
                       + "; ".join(problems) + ")")
    named = sorted({i for p in receive for i in p.trusted_issuers})
    return ok(cid, f"CA file/path {', '.join(sources)} exists"
                   + (f" and holds {', '.join(named)}" if named else ""))


def check_mail_macros(pf: PostfixFacts, config: "Config",
                      requested: Mapping[int, tuple[str, ...]] | None) -> Check:
    """TLS macros reach milterd at MAIL FROM: from milter_mail_macros, or from the list milterd
    requests in negotiation (which replaces it).  ``requested`` is None if milterd was not
    reachable."""
    cid = "postfix.milter_mail_macros"
    from milterd.mta.milter_codec import SMFIM_ENVFROM

    asked = set((requested or {}).get(SMFIM_ENVFROM, ()))
    for s in pf.smtpd_services:
        have = set(pf.get("milter_mail_macros", s).split())
        missing = [m for m in TLS_MAIL_MACROS if m not in have]
        if not missing:
            continue
        if requested is not None and all(m in asked for m in TLS_MAIL_MACROS):
            return ok(cid, "milterd requests the TLS macros at MAIL FROM itself (its list "
                           "replaces milter_mail_macros)")
        value = " ".join([*pf.get("milter_mail_macros", s).split(), *missing])
        if requested is None:
            return warn(cid, f"milter_mail_macros lacks {' '.join(missing)} and milterd did not "
                             "answer, so whether it requests them itself is unknown",
                        pf.postconf_e(f"milter_mail_macros = {value}"))
        return fail(cid, f"milter_mail_macros lacks {' '.join(missing)}: milterd sees no TLS "
                         "at MAIL FROM", pf.postconf_e(f"milter_mail_macros = {value}"))
    return ok(cid, "milter_mail_macros has the TLS macros")


def _policy_items(value: str) -> list[tuple[str, str]]:
    """Restriction list -> [(restriction, argument-or-"")] (check_policy_service's argument,
    braced or not)."""
    items, out = split_list(value), []
    i = 0
    while i < len(items):
        it = items[i]
        if it == "check_policy_service" and i + 1 < len(items):
            out.append((it, brace_item(items[i + 1])[0]))
            i += 2
            continue
        out.append((it, ""))
        i += 1
    return out


def check_policy_service(pf: PostfixFacts, config: "Config") -> Check:
    cid = "postfix.check_policy_service"
    pinned = [p.entry for p in config.partners if p.receive and p.pinned]
    if not pinned:
        return ok(cid, "no receive partner is pinned: the policy service is not needed")
    listen = config.policy_listen
    if listen is None:
        return fail(cid, f"pins are configured ({', '.join(pinned)}) but milterd has no "
                         "[policy] listen: Postfix never tells milterd a fingerprint",
                    '[policy] listen = "unix:/var/spool/postfix/milterd/policy.sock"   '
                    "(milterd.toml)")
    want = milterd_endpoint(str(listen))
    name = postfix_socket_name(pf, f"unix:{want.path}" if want and want.kind == "unix"
                               else str(listen))
    found_after: list[str] = []
    for lst in RESTRICTION_LISTS:
        accepted_by = None
        for r, arg in _policy_items(pf.get(lst)):
            if r == "check_policy_service":
                ep = postfix_endpoint(arg)
                match = ep is not None and want is not None and ep.kind == want.kind and (
                    (ep.kind == "unix" and names_path(pf, ep.path, want.path))
                    or (ep.kind == "inet" and same_inet(ep, want)))
                if not match:
                    continue
                if accepted_by:
                    found_after.append(f"{lst}: check_policy_service {arg} comes after "
                                       f"{accepted_by}, which accepts first")
                    break
                if want.kind == "inet":
                    return warn(cid, f"{lst} consults milterd over TCP ({listen}): every local "
                                     "user can post requests and forge Direct Trust facts",
                                f'[policy] listen = "unix:{pf.queue_directory}/milterd/'
                                'policy.sock"   (milterd.toml; then check_policy_service '
                                'unix:milterd/policy.sock)')
                return ok(cid, f"{lst} consults check_policy_service {arg} before any rule "
                               "that accepts")
            if r.startswith("permit"):
                accepted_by = accepted_by or r
    rest = [r if not a else f"{r} {a}" for r, a in _policy_items(pf.get(
        "smtpd_recipient_restrictions")) if r != "check_policy_service"]
    fix = pf.postconf_e("smtpd_recipient_restrictions = "
                        + ", ".join([f"check_policy_service {name}", *rest]))
    if found_after:
        return fail(cid, "; ".join(found_after) + ": Postfix never asks milterd for that "
                         "mail, so pinned partners are refused", fix)
    return fail(cid, f"no smtpd_*_restrictions list has check_policy_service {name} "
                     f"([policy] listen = {listen}): pinned partners ({', '.join(pinned)}) "
                     "are refused", fix)


def check_fingerprint_digest(pf: PostfixFacts, config: "Config") -> Check:
    cid = "postfix.smtpd_tls_fingerprint_digest"
    if not any(p.pinned for p in config.partners if p.receive):
        return ok(cid, f"no pins configured (smtpd_tls_fingerprint_digest = "
                       f"{pf.get('smtpd_tls_fingerprint_digest')} is not used)")
    return _smtpd_param(pf, cid, "smtpd_tls_fingerprint_digest", ("sha256",), "sha256",
                        "milterd's pins are SHA-256; no fingerprint ever matches")


def check_smtp_tls_policy_maps(pf: PostfixFacts, config: "Config") -> Check:
    cid = "postfix.smtp_tls_policy_maps"
    send = config.send_entries
    if not send:
        return ok(cid, "no send partners")
    listen = config.socketmap_listen
    if listen is None:
        return fail(cid, f"send partners ({', '.join(send)}) but milterd has no [socketmap] "
                         "listen", '[socketmap] listen = "127.0.0.1:10041"   (milterd.toml)')
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    want = f"socketmap:inet:{host}:{listen.port}:tlspolicy"
    for s in (None, *pf.smtp_services):
        value = pf.get("smtp_tls_policy_maps", s)
        found = False
        for item in split_list(value):
            m = re.fullmatch(r"(?:proxy:)?socketmap:inet:(.+):(\d+):(\S+)", item)
            if m and m.group(3) == "tlspolicy" and same_inet(
                    Endpoint("inet", host=m.group(1).strip("[]"), port=int(m.group(2))),
                    Endpoint("inet", host=listen.host, port=listen.port)):
                found = True
        if not found:
            if s is not None and s.override("smtp_tls_policy_maps") is not None:
                return fail(cid, f"master.cf {s.key} -o smtp_tls_policy_maps={value}: mail to "
                                 f"send partners through it gets opportunistic TLS",
                            pf.postconf_p(s, "smtp_tls_policy_maps", None))
            if s is None:
                return fail(cid, f"smtp_tls_policy_maps = {value} does not name {want}: send "
                                 f"partners ({', '.join(send)}) get opportunistic TLS",
                            pf.postconf_e(f"smtp_tls_policy_maps = {want}"))
    return ok(cid, f"smtp_tls_policy_maps names {want}")


def check_maillog_file(pf: PostfixFacts, config: "Config") -> Check:
    cid = "postfix.maillog_file"
    want = config.outbound.maillog
    if not want:
        return ok(cid, "[outbound] maillog is not set (no delivery results counted)")
    have = pf.get("maillog_file")
    if os.path.normpath(have or "/") != os.path.normpath(want):
        return fail(cid, f"maillog_file = {have or '(empty)'} but [outbound] maillog = {want}: "
                         "milterd counts no delivery result", pf.postconf_e(f"maillog_file = {want}"))
    return ok(cid, f"maillog_file = {have} ([outbound] maillog)")


def check_tlsrpt(pf: PostfixFacts, config: "Config") -> Check:
    cid = "postfix.tlsrpt"
    v = pf.mail_version
    vtext = pf.get("mail_version")
    if config.socketmap_listen is None:
        return ok(cid, "milterd serves no socketmap")
    if config.socketmap_tlsrpt and v < (3, 10):
        return fail(cid, f"[socketmap] tlsrpt = true but Postfix is {vtext}: TLSRPT attributes "
                         "need Postfix >= 3.10, older ones cannot parse the policy",
                    "[socketmap] tlsrpt = false   (milterd.toml)")
    return ok(cid, f"[socketmap] tlsrpt = {str(config.socketmap_tlsrpt).lower()} "
                   f"with Postfix {vtext}")


def postfix_checks(pf: PostfixFacts, config: "Config",
                   requested: Mapping[int, tuple[str, ...]] | None) -> list[Check]:
    return [
        check_smtpd_milters(pf, config),
        check_milter_socket_access(pf, config),
        check_milter_default_action(pf, config),
        check_tls_security_level(pf, config),
        check_ask_ccert(pf, config),
        check_ca(pf, config),
        check_mail_macros(pf, config, requested),
        check_policy_service(pf, config),
        check_fingerprint_digest(pf, config),
        check_smtp_tls_policy_maps(pf, config),
        check_maillog_file(pf, config),
        check_tlsrpt(pf, config),
    ]


def probe_path(path: str) -> PathProbe:
    """``lstat`` a path and its parents (the only I/O here; used by the gathering code)."""
    path = os.path.normpath(path)
    parents = []
    d = os.path.dirname(path)
    chain = []
    while True:
        chain.append(d)
        if d in ("/", ""):
            break
        d = os.path.dirname(d)
    for d in reversed(chain):
        try:
            st = os.stat(d)
        except OSError:
            break
        parents.append((d, st.st_mode, st.st_uid, st.st_gid))
    try:
        st = os.stat(path)
    except OSError:
        return PathProbe(path, False, parents=tuple(parents))
    kind = ("socket" if stat.S_ISSOCK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode)
            else "file" if stat.S_ISREG(st.st_mode) else "other")
    return PathProbe(path, True, kind, st.st_mode, st.st_uid, st.st_gid, st.st_dev, st.st_ino,
                     tuple(parents))


__all__ = ["PostfixFacts", "Service", "PathProbe", "postfix_checks", "parse_postconf",
           "parse_services", "split_list", "probe_path"]
