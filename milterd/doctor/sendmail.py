"""Sendmail: the ``.cf`` parsed into :class:`SendmailFacts`, and the pure checks over it.

What the ``.cf`` holds (cf/README, op.me; see contrib/sendmail/README.md for what was measured):

* ``Xname, S=socket, F=flags, T=timeouts`` defines a filter, ``O InputMailFilters=a,b`` uses it;
  ``F=T`` tempfails when the filter is unavailable, ``F=R`` rejects, no flag *accepts unchecked*;
* ``O Milter.macros.<stage>=…`` are the macros sent at each stage (they replace the defaults);
  milterd reads the TLS facts at MAIL FROM (``envfrom``);
* ``O CertFingerprintAlgorithm=sha256`` puts the SHA-256 fingerprint in ``{cert_fp}`` (default
  MD5 in ``{cert_md5}``): milterd's pins are SHA-256;
* ``O TLSSrvOptions`` with ``V`` never asks for a client certificate; ``O CACertFile`` /
  ``CACertPath`` are what ``{verify}=OK`` is verified against.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from milterd.doctor.model import Check, fail, ok
from milterd.doctor.postfix import milterd_endpoint

if TYPE_CHECKING:
    from milterd.core.config import Config

#: What milterd reads at MAIL FROM, as Sendmail names it ({cert_fp} only matters with pins).
ENVFROM_MACROS = ("{verify}", "{cert_subject}", "{cert_issuer}", "{tls_version}", "{cipher}",
                  "{cipher_bits}", "{cert_fp}")
CONTRIB_ENVFROM = ("define(`confMILTER_MACROS_ENVFROM', ``i, {auth_type}, {auth_authen}, "
                   "{auth_ssf}, {auth_author}, {mail_mailer}, {mail_host}, {mail_addr}, "
                   "{verify}, {cert_subject}, {cert_issuer}, {cn_subject}, {cn_issuer}, "
                   "{tls_version}, {cipher}, {cipher_bits}, {cert_fp}, {cert_md5}, "
                   "{client_addr}, {client_port}'')dnl")


@dataclass(frozen=True)
class Filter:
    name: str
    equates: tuple[tuple[str, str], ...]     # S=…, F=…, T=…

    def get(self, key: str) -> str:
        for k, v in self.equates:
            if k == key:
                return v
        return ""


@dataclass(frozen=True)
class SendmailFacts:
    path: str
    options: tuple[tuple[str, str], ...]     # O Name=value (last wins)
    filters: tuple[Filter, ...]
    existing: frozenset[str] = frozenset()   # CACertFile/CACertPath that exist (probed)

    def option(self, name: str) -> str:
        value = ""
        for k, v in self.options:
            if k.lower() == name.lower():
                value = v
        return value


def parse_cf(text: str, path: str = "sendmail.cf") -> SendmailFacts:
    options, filters = [], []
    for line in text.splitlines():
        if line.startswith("O "):
            name, _, value = line[2:].partition("=")
            options.append((name.strip(), value.strip()))
        elif line.startswith("X"):
            name, _, rest = line[1:].partition(",")
            equates = []
            # S=unix:/p, F=T, T=S:30s;R:30s  (values hold no commas)
            for part in rest.split(","):
                k, sep, v = part.strip().partition("=")
                if sep:
                    equates.append((k.strip(), v.strip()))
            filters.append(Filter(name.strip(), tuple(equates)))
    return SendmailFacts(path, tuple(options), tuple(filters))


def _same_socket(sendmail_spec: str, listen: str) -> bool:
    a, b = milterd_endpoint(sendmail_spec), milterd_endpoint(listen)
    if a is None or b is None or a.kind != b.kind:
        return False
    if a.kind == "unix":
        return os.path.normpath(a.path) == os.path.normpath(b.path)
    from milterd.doctor.postfix import same_inet

    return same_inet(a, b)


def _milterd_filter(sf: SendmailFacts, config: "Config") -> Filter | None:
    used = [n.strip() for n in sf.option("InputMailFilters").split(",") if n.strip()]
    for f in sf.filters:
        if f.name in used and _same_socket(f.get("S"), config.milter.listen):
            return f
    return None


def _mc_line(config: "Config", flags: str = "F=T") -> str:
    return (f"INPUT_MAIL_FILTER(`milterd', `S={config.milter.listen}, {flags}, "
            "T=S:30s;R:30s;E:5m')dnl")


def check_filter(sf: SendmailFacts, config: "Config") -> Check:
    cid = "sendmail.milter"
    f = _milterd_filter(sf, config)
    if f is not None:
        return ok(cid, f"X{f.name}, S={f.get('S')} is in InputMailFilters")
    same = [x for x in sf.filters if _same_socket(x.get("S"), config.milter.listen)]
    if same:
        return fail(cid, f"filter X{same[0].name} names milterd's socket but is not in "
                         f"InputMailFilters ({sf.option('InputMailFilters') or 'empty'})",
                    _mc_line(config))
    return fail(cid, f"{sf.path} has no filter on milterd's socket {config.milter.listen}: "
                     "mail is never checked", _mc_line(config))


def check_filter_flags(sf: SendmailFacts, config: "Config") -> Check:
    cid = "sendmail.milter_flags"
    f = _milterd_filter(sf, config)
    if f is None:
        return fail(cid, "no milterd filter (see sendmail.milter)", _mc_line(config))
    flags = f.get("F")
    if "T" in flags:
        return ok(cid, f"X{f.name}, F={flags}: milterd unavailable -> tempfail")
    what = "rejects (5xx) all mail" if "R" in flags else "accepts mail unchecked"
    return fail(cid, f"X{f.name}, F={flags or '(none)'}: when milterd is unavailable Sendmail "
                     f"{what}", _mc_line(config))


def check_macros(sf: SendmailFacts, config: "Config") -> Check:
    cid = "sendmail.milter_macros"
    have = {m.strip() for m in sf.option("Milter.macros.envfrom").split(",")}
    pinned = any(p.pinned for p in config.partners if p.receive)
    need = [m for m in ENVFROM_MACROS if m != "{cert_fp}" or pinned]
    missing = [m for m in need if m not in have]
    if missing:
        return fail(cid, f"O Milter.macros.envfrom lacks {', '.join(missing)}: milterd reads "
                         "the TLS facts at MAIL FROM", CONTRIB_ENVFROM)
    return ok(cid, "O Milter.macros.envfrom has " + ", ".join(need))


def check_fingerprint_algorithm(sf: SendmailFacts, config: "Config") -> Check:
    cid = "sendmail.cert_fingerprint_algorithm"
    algo = sf.option("CertFingerprintAlgorithm")
    if not any(p.pinned for p in config.partners if p.receive):
        return ok(cid, f"no pins configured (CertFingerprintAlgorithm={algo or 'MD5 default'} "
                       "is not used)")
    if algo.lower() != "sha256":
        return fail(cid, f"CertFingerprintAlgorithm={algo or '(unset: MD5 in {cert_md5})'}: "
                         "milterd's pins are SHA-256 in {cert_fp}, none ever matches",
                    "define(`confCERT_FINGERPRINT_ALGORITHM', `sha256')dnl")
    return ok(cid, "CertFingerprintAlgorithm=sha256")


def check_client_certs(sf: SendmailFacts, config: "Config") -> Check:
    cid = "sendmail.tls_client_certs"
    if not any(p.receive for p in config.partners):
        return ok(cid, "no receive partners")
    srv = sf.option("TLSSrvOptions")
    if re.search(r"\bV\b", srv):
        return fail(cid, f"O TLSSrvOptions={srv}: V never asks for a client certificate",
                    "undefine(`confTLS_SRV_OPTIONS')dnl")
    cafile, capath = sf.option("CACertFile"), sf.option("CACertPath")
    needs_chain = any(p.receive and not p.pinned for p in config.partners)
    if needs_chain and not ({cafile, capath} & sf.existing):
        return fail(cid, f"CACertFile={cafile or '(unset)'} / CACertPath={capath or '(unset)'}: "
                         "no CA to verify partner certificates ({verify} is never OK)",
                    "define(`confCACERT', `/etc/mail/tls/partner-cas.pem')dnl")
    return ok(cid, f"client certificates are asked for and verified against "
                   f"{cafile or capath or '(pins only)'}")


def sendmail_checks(sf: SendmailFacts, config: "Config") -> list[Check]:
    return [check_filter(sf, config), check_filter_flags(sf, config), check_macros(sf, config),
            check_fingerprint_algorithm(sf, config), check_client_certs(sf, config)]
