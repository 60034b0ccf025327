"""The doctor's I/O: run ``postconf``, read the ``.cf``, probe files, talk to milterd's sockets.

Everything here turns the world into the frozen facts the pure checks judge; nothing here judges.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import pwd
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from milterd.doctor.milterd_checks import (Probe, RuntimeFacts, judge_socketmap_answer,
                                          socketmap_probe_domain)
from milterd.doctor.postfix import (RESTRICTION_LISTS, PostfixFacts, _policy_items,
                                    brace_item, host_path, milterd_endpoint, parse_postconf,
                                    parse_services, postfix_endpoint, probe_path, split_list)
from milterd.doctor.sendmail import SendmailFacts, parse_cf

if TYPE_CHECKING:
    from milterd.core.config import Config

TIMEOUT = 5.0


class GatherError(Exception):
    """The MTA's configuration could not be read (the message says why)."""


# -- Postfix ------------------------------------------------------------------------------------
def _postconf_binary() -> str:
    found = shutil.which("postconf") or ("/usr/sbin/postconf"
                                         if os.access("/usr/sbin/postconf", os.X_OK) else None)
    if not found:
        raise GatherError("postconf not found (is Postfix installed?)")
    return found


def _postconf(config_dir: str | None, *args: str) -> str:
    cmd = [_postconf_binary(), *(["-c", config_dir] if config_dir else []), *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GatherError(f"{' '.join(cmd)}: {exc}") from None
    if r.returncode != 0:
        raise GatherError(f"{' '.join(cmd)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def gather_postfix(config_dir: str | None, config: "Config") -> PostfixFacts:
    params = parse_postconf(_postconf(config_dir, "-x"))
    explicit = frozenset(parse_postconf(_postconf(config_dir, "-n")))
    services = parse_services(_postconf(config_dir, "-F"), _postconf(config_dir, "-Px"))
    try:
        pw = pwd.getpwnam(params.get("mail_owner", "postfix"))
        owner_uid, owner_gid = pw.pw_uid, pw.pw_gid
    except KeyError:
        owner_uid = owner_gid = -1
    facts = PostfixFacts(config_dir, tuple(sorted(params.items())), explicit, services,
                         owner_uid, owner_gid)
    q = facts.queue_directory
    paths: set[str] = set()
    for listen in (config.milter.listen,
                   str(config.policy_listen) if config.policy_listen else ""):
        ep = milterd_endpoint(listen) if listen else None
        if ep and ep.kind == "unix":
            paths.add(ep.path)
    unix_specs: list[str] = []
    for s in (None, *services):
        for item in split_list(facts.get("smtpd_milters", s)):
            unix_specs.append(brace_item(item)[0])
        for lst in RESTRICTION_LISTS:
            unix_specs += [a for r, a in _policy_items(facts.get(lst, s))
                           if r == "check_policy_service"]
    for spec in unix_specs:
        ep = postfix_endpoint(spec)
        if ep and ep.kind == "unix":
            paths.add(host_path(ep.path, q, False))
            paths.add(host_path(ep.path, q, True))
    ca_sources: list[str] = []
    for s in (None, *services):
        cafile, capath = facts.get("smtpd_tls_CAfile", s), facts.get("smtpd_tls_CApath", s)
        if cafile:
            paths.add(os.path.normpath(cafile))
            ca_sources.append(os.path.normpath(cafile))
        if capath:
            for p in (os.path.normpath(capath), host_path(capath, q, True)):
                paths.add(p)
                ca_sources.append(p)
    probes = tuple(probe_path(p) for p in sorted(paths))
    subjects = tuple((src, ca_subject_forms(src)) for src in dict.fromkeys(ca_sources))
    return PostfixFacts(config_dir, facts.params, explicit, services, owner_uid, owner_gid,
                        probes, subjects)


def ca_subject_forms(source: str) -> tuple[str, ...]:
    """Every name a trusted_issuers entry may use for each CA certificate in a PEM file or a
    directory of them: the CN, the RFC 4514 DN, the OpenSSL one-line DN (and xtext-encoded, as
    Sendmail reports it)."""
    from cryptography import x509

    files = ([Path(source)] if os.path.isfile(source)
             else sorted(p for p in Path(source).iterdir() if p.is_file())
             if os.path.isdir(source) else [])
    forms: list[str] = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError:
            continue
        for block in re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----",
                                data, re.S):
            try:
                cert = x509.load_pem_x509_certificate(block)
            except ValueError:
                continue
            forms += _name_forms(cert.subject)
    return tuple(dict.fromkeys(forms))


def _name_forms(name) -> list[str]:
    from cryptography.x509.oid import NameOID

    short = {NameOID.COMMON_NAME: "CN", NameOID.ORGANIZATION_NAME: "O",
             NameOID.ORGANIZATIONAL_UNIT_NAME: "OU", NameOID.COUNTRY_NAME: "C",
             NameOID.STATE_OR_PROVINCE_NAME: "ST", NameOID.LOCALITY_NAME: "L",
             NameOID.EMAIL_ADDRESS: "emailAddress", NameOID.DOMAIN_COMPONENT: "DC"}
    oneline = "".join(f"/{short.get(a.oid, a.oid.dotted_string)}={a.value}" for a in name)
    xtext = "".join(c if 33 <= ord(c) <= 126 and c not in '+"' else "+%02X" % ord(c)
                    for c in oneline)
    out = [name.rfc4514_string(), oneline, xtext]
    out += [a.value for a in name.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [str(x) for x in out]


# -- Sendmail -----------------------------------------------------------------------------------
def gather_sendmail(cf: str) -> SendmailFacts:
    try:
        text = Path(cf).read_text(errors="replace")
    except OSError as exc:
        raise GatherError(f"{cf}: cannot read: {exc.strerror}") from None
    sf = parse_cf(text, cf)
    existing = frozenset(p for p in (sf.option("CACertFile"), sf.option("CACertPath"))
                         if p and os.path.exists(p))
    return SendmailFacts(sf.path, sf.options, sf.filters, existing)


# -- milterd ------------------------------------------------------------------------------------
def negotiate(listen: str) -> tuple[Probe, tuple[tuple[int, tuple[str, ...]], ...] | None]:
    """A real SMFIC_OPTNEG with milterd, as an MTA starts every session, then SMFIC_QUIT."""
    from milterd.mta.milter_client import MilterClientSession

    async def run() -> tuple[Probe, tuple | None]:
        import logging

        session = MilterClientSession(listen, connect_timeout=TIMEOUT, command_timeout=TIMEOUT)
        logging.getLogger("milterd.mta.milter_client").disabled = True
        try:
            if not await session.open() or session.negotiated is None:
                return Probe(False, "no milter answer (connection refused, not a socket, or "
                                    "no option negotiation reply)"), None
            n = session.negotiated
            return (Probe(True, f"milter protocol {n.version}"),
                    tuple(sorted(n.macro_lists.items())))
        finally:
            await session.close()
            logging.getLogger("milterd.mta.milter_client").disabled = False

    try:
        return asyncio.run(run())
    except ValueError as exc:
        return Probe(False, str(exc)), None


def _connect(ep) -> socket.socket:
    if ep.kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        s.connect(ep.path)
        return s
    return socket.create_connection((ep.host or "127.0.0.1", ep.port), timeout=TIMEOUT)


def socketmap_query(host: str, port: int, key: str) -> str:
    request = f"tlspolicy {key}".encode()
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        s.sendall(b"%d:%s," % (len(request), request))
        buf = b""
        while True:
            head, colon, rest = buf.partition(b":")
            if colon and head.isdigit() and len(rest) > int(head):
                return rest[:int(head)].decode(errors="replace")
            chunk = s.recv(4096)
            if not chunk:
                raise OSError(f"connection closed after {buf[:80]!r}")
            buf += chunk


def policy_probe(listen: str) -> Probe:
    ep = milterd_endpoint(listen)
    if ep is None:
        return Probe(False, f"cannot parse {listen}")
    try:
        with _connect(ep) as s:
            s.sendall(b"request=smtpd_access_policy\nprotocol_state=RCPT\n\n")
            buf = b""
            while b"\n\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
    except OSError as exc:
        return Probe(False, f"no answer ({exc.strerror or exc})")
    reply = buf.decode(errors="replace").strip()
    if reply.startswith("action="):
        return Probe(True, reply)
    return Probe(False, f"unexpected reply {reply[:80]!r}")


def metrics_probe(host: str, port: int) -> Probe:
    h = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{h}:{port}/metrics", timeout=TIMEOUT) as r:
            body = r.read(4 << 20).decode(errors="replace")
            status = r.status
    except (urllib.error.URLError, OSError) as exc:
        return Probe(False, f"no answer ({getattr(exc, 'reason', exc)})")
    if status == 200 and "milterd_" in body:
        return Probe(True, f"answers ({sum(1 for l in body.splitlines() if l.startswith('milterd_'))}"
                           " milterd samples)")
    return Probe(False, f"HTTP {status} without milterd metrics")


def certificate_expiry(path: str) -> tuple[str, dt.datetime | None, str]:
    from cryptography import x509

    try:
        data = Path(path).read_bytes()
        cert = x509.load_pem_x509_certificate(data)
    except OSError as exc:
        return path, None, f"cannot read: {exc.strerror}"
    except ValueError:
        return path, None, "not a PEM certificate"
    return path, cert.not_valid_after_utc, ""


def gather_runtime(config: "Config") -> RuntimeFacts:
    milter, macros = negotiate(config.milter.listen)
    policy = policy_probe(str(config.policy_listen)) if config.policy_listen else None
    answers = []
    if config.socketmap_listen is not None:
        sm = config.socketmap_listen
        for entry in config.send_entries:
            domain = socketmap_probe_domain(entry)
            try:
                answers.append((domain, judge_socketmap_answer(
                    socketmap_query(sm.host, sm.port, domain))))
            except OSError as exc:
                answers.append((domain, Probe(False, f"no answer ({exc.strerror or exc})")))
    metrics = (metrics_probe(config.metrics_listen.host, config.metrics_listen.port)
               if config.metrics_listen else None)
    return RuntimeFacts(now=dt.datetime.now(dt.timezone.utc), milter=milter,
                        milter_macros=macros, policy=policy, socketmap=tuple(answers),
                        metrics=metrics,
                        certificates=tuple(certificate_expiry(p) for p in config.tls.certificates))
