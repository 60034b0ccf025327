"""Typed configuration of the reference MTA (one frozen tree, passed explicitly).

TOML layout (all keys optional except ``hostname``, ``maildir_root``, ``queue_dir``)::

    hostname = "mx.contoso.test"
    listen_host = "127.0.0.1"
    listen_port = 0                      # 0 = ephemeral; the real port is announced
    local_domains = ["contoso.test"]
    maildir_root = "/tmp/x/maildir"      # <root>/<domain>/<localpart>/{tmp,new,cur}
    queue_dir = "/tmp/x/queue"
    tls_cert = "server.crt"
    tls_key = "server.key"
    ca_files = ["ca.crt"]
    require_client_cert = false          # true: no/untrusted client cert -> 530 after STARTTLS
    milter = "unix:/path/milter.sock"    # or "inet:PORT@HOST"; absent = no milter
    milter_default_action = "tempfail"   # tempfail | accept | reject
    milter_timeout = 30.0
    send_domains = ["woodgrovebank.test"]
    protocol_log = "/tmp/x/protocol.log"
    ready_file = "/tmp/x/ready"          # written with the port once listening
    retry_base = 1.0                     # seconds; doubles per attempt
    retry_max_delay = 300.0
    max_attempts = 10

    [routes]                             # static next hops (no DNS on loopback)
    "woodgrovebank.test" = "127.0.0.1:2525"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Optional

from milterd.policy.names import domain_listed, normalize_dns_name

from .milter_client import SocketSpec

_ACTIONS = ("tempfail", "accept", "reject")


@dataclass(frozen=True)
class MtaConfig:
    hostname: str
    maildir_root: Path
    queue_dir: Path
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    local_domains: tuple[str, ...] = ()
    tls_cert: Optional[Path] = None
    tls_key: Optional[Path] = None
    ca_files: tuple[Path, ...] = ()
    require_client_cert: bool = False
    milter: Optional[str] = None
    milter_default_action: str = "tempfail"
    milter_timeout: float = 30.0
    send_domains: tuple[str, ...] = ()
    routes: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    protocol_log: Optional[Path] = None
    ready_file: Optional[Path] = None
    retry_base: float = 1.0
    retry_max_delay: float = 300.0
    max_attempts: int = 10
    data_size_limit: int = 33554432

    def __post_init__(self) -> None:
        if self.milter_default_action not in _ACTIONS:
            raise ValueError("milter_default_action must be one of %s" % ", ".join(_ACTIONS))
        if self.milter is not None:
            SocketSpec.parse(self.milter)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    def is_local(self, domain: str) -> bool:
        name = normalize_dns_name(domain)
        return name is not None and name in {normalize_dns_name(d) for d in self.local_domains}

    def on_send_list(self, domain: str) -> bool:
        """Exchange's send list, as milterd reads ``send_domains``
        (:func:`milterd.policy.names.domain_listed`)."""
        return domain_listed(domain, self.send_domains) is not None

    def route(self, domain: str) -> Optional[tuple[str, int]]:
        return {k.lower(): v for k, v in self.routes.items()}.get(domain.lower())

    def with_changes(self, **changes: Any) -> "MtaConfig":
        return replace(self, **changes)


def _parse_route(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError("route %r must be HOST:PORT" % value)
    return host.strip("[]"), int(port)


def config_from_mapping(data: Mapping[str, Any], base: Path = Path(".")) -> MtaConfig:
    """Build a config from parsed TOML; relative paths are relative to ``base``."""
    known = {f.name for f in fields(MtaConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError("unknown config keys: %s" % ", ".join(sorted(unknown)))

    def path(v: Any) -> Path:
        p = Path(v)
        return p if p.is_absolute() else base / p

    kw: dict[str, Any] = dict(data)
    for key in ("maildir_root", "queue_dir", "tls_cert", "tls_key", "protocol_log", "ready_file"):
        if kw.get(key) is not None:
            kw[key] = path(kw[key])
    if "ca_files" in kw:
        kw["ca_files"] = tuple(path(p) for p in kw["ca_files"])
    for key in ("local_domains", "send_domains"):
        if key in kw:
            kw[key] = tuple(kw[key])
    if "routes" in kw:
        kw["routes"] = {k: _parse_route(v) for k, v in kw["routes"].items()}
    return MtaConfig(**kw)


def load_mta_config(path: Path) -> MtaConfig:
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    return config_from_mapping(data, path.parent)
