"""Typed configuration: TOML into frozen dataclasses, validated once, every error naming its key.

The whole tree is built by :func:`load_config` / :func:`parse_config` and passed explicitly to
whatever needs it; nothing reads configuration from module globals.  Validation collects *every*
problem before failing (``milterd check-config`` prints them all), because an admin fixing a
config one error per restart is an admin who stops trusting the tool.
"""

from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from milterd.core.partners import PartnerTerms, build_partners

TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")


class ConfigError(Exception):
    """Raised with every problem found; ``errors`` holds one ``"key: message"`` line each."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class ListenAddress:
    """A ``host:port`` TCP listen address (IPv6 as ``[::1]:port``), or a unix socket ``path``."""

    host: str = ""
    port: int = 0
    path: str | None = None          # "unix:/path" ([policy] only): host and port unused

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def listen_family(host: str, port: int = 0) -> int:
    """The address family to bind ``host`` with: from the literal, else from resolving the name
    (the first address ``getaddrinfo`` gives).  Raises OSError if a name does not resolve."""
    import ipaddress
    import socket

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        return infos[0][0]
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


@dataclass(frozen=True)
class MilterConfig:
    listen: str = "unix:/run/milterd/milter.sock"
    group: str = "postfix"
    on_error: str = "tempfail"
    timeout: int = 30
    plugin_timeout: float = 5.0
    stop_grace: float = 30.0


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"
    level: str = "info"


@dataclass(frozen=True)
class DomainSecurityConfig:
    mode: str = "enforce"
    failure_action: str = "reject"
    receive_domains: tuple[str, ...] = ()
    send_domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class TlsConfig:
    min_version: str = "TLSv1.2"
    min_cipher_bits: int = 128
    # PEM files whose expiry is exported (the MTA's own server/client certificates)
    certificates: tuple[str, ...] = ()


@dataclass(frozen=True)
class PeerCertConfig:
    trusted_issuers: tuple[str, ...] = ()
    # domain -> SHA-256 fingerprints, normalised to upper-case hex with colons
    pins: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def pins_for(self, domain: str) -> tuple[str, ...]:
        for pinned_domain, fingerprints in self.pins:
            if pinned_domain == domain:
                return fingerprints
        return ()


@dataclass(frozen=True)
class StampConfig:
    header: str = "X-Milterd-TLS"


@dataclass(frozen=True)
class PluginsConfig:
    disable: tuple[str, ...] = ()   # entry-point names not to load
    modules: tuple[str, ...] = ()   # extra plugin modules by dotted name (local, unpackaged)


@dataclass(frozen=True)
class OutboundConfig:
    """Outbound Domain Security: where results come from and how published policies are found."""

    maillog: str | None = None          # Postfix maillog_file to follow for delivery results
    state_dir: str | None = None        # follower offset + TLS-RPT session records
    # (IP, port) per server, from "IP", "IP:PORT", "IPv6" or "[IPv6]:PORT"; empty =
    # /etc/resolv.conf (must validate DNSSEC for DANE: the AD bit is trusted)
    dns_servers: tuple[tuple[str, int], ...] = ()
    mtasts_ca_file: str | None = None   # CA bundle for MTA-STS policy fetches (default: system)
    on_dns_error: str = "temp"          # temp (defer) | notfound (fail open to opportunistic)


@dataclass(frozen=True)
class StoreConfig:
    """State shared by a fleet (:mod:`milterd.store`)."""

    url: str = "sqlite:///var/lib/milterd/milterd.db"  # default: <[outbound] state_dir>/milterd.db
    host: str = ""                  # this host's name in shared records (default: the hostname)
    spool_dir: str | None = None    # local spool while the store is down (default: state_dir)
    spool_max_mb: int = 256         # bound of that spool; beyond it the oldest is kept, new refused

    @property
    def host_name(self) -> str:
        import socket

        return self.host or socket.gethostname()


@dataclass(frozen=True)
class WatchConfig:
    """The partner certificate watch (#18): what inbound sessions presented, probes of send
    partners' MX hosts."""

    probe_interval: float = 3600.0   # seconds between probe rounds of the send partners; 0 = off
    probe_timeout: float = 10.0      # one MX host: connect + EHLO + STARTTLS + handshake
    probe_max_hosts: int = 5         # MX hosts probed per partner (lowest preference first)
    probe_port: int = 25
    probe_ca_file: str | None = None  # CA bundle for partner MX certificates (default: system)
    probe_helo: str = ""             # EHLO name (default: the host name)


@dataclass(frozen=True)
class TlsRptConfig:
    """``milterd tlsrpt send``: who reports, and how reports leave this host (RFC 8460 §3, §5)."""

    organization: str = ""              # organization-name (required to send)
    contact: str = ""                   # contact-info; also the From: of mailto reports
    submitter: str = ""                 # TLS-Report-Submitter (default: the contact's domain)
    smtp: ListenAddress | None = None   # where mailto reports are submitted (default 127.0.0.1:25)
    https_ca_file: str | None = None    # CA bundle for https: rua endpoints (default: system)
    sending_ip: str | None = None       # sending-mta-ip in failure details (this host's address)


@dataclass(frozen=True)
class Config:
    milter: MilterConfig = field(default_factory=MilterConfig)
    log: LogConfig = field(default_factory=LogConfig)
    policy_listen: ListenAddress | None = None
    policy_group: str = "postfix"     # group of a unix [policy] socket (default: [milter] group)
    socketmap_listen: ListenAddress | None = None
    # Postfix >= 3.10: socketmap answers carry TLSRPT attributes (3.7 must get plain answers)
    socketmap_tlsrpt: bool = False
    metrics_listen: ListenAddress | None = None
    domain_security: DomainSecurityConfig = field(default_factory=DomainSecurityConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    peer_cert: PeerCertConfig = field(default_factory=PeerCertConfig)
    stamp: StampConfig = field(default_factory=StampConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    tlsrpt: TlsRptConfig = field(default_factory=TlsRptConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    # The effective terms of every partner (lists, [partners] tables and defaults merged):
    # :mod:`milterd.core.partners`.  Decisions read these, never the lists directly.
    partners: tuple[PartnerTerms, ...] = ()
    source: str = "<default>"

    @functools.cached_property
    def _partner_index(self) -> dict[str, PartnerTerms]:
        return {p.entry: p for p in self.partners}

    @functools.cached_property
    def receive_entries(self) -> tuple[str, ...]:
        """Entries (leading dot kept) of every partner with inbound Domain Security on."""
        return tuple(p.entry for p in self.partners if p.receive)

    @functools.cached_property
    def send_entries(self) -> tuple[str, ...]:
        """Entries of every partner with mandatory verified TLS outbound."""
        return tuple(p.entry for p in self.partners if p.send)

    def partner(self, entry: str) -> PartnerTerms | None:
        """The terms of a configured entry (``"x.test"`` or ``".x.test"``), or None."""
        return self._partner_index.get(entry)

    def receive_partner(self, domain: str) -> PartnerTerms | None:
        """The receive partner covering ``domain`` (the most specific entry), or None."""
        from milterd.policy.names import domain_listed

        entry = domain_listed(domain, self.receive_entries)
        return self._partner_index.get(entry) if entry is not None else None

    def send_partner(self, domain: str) -> PartnerTerms | None:
        """The send partner covering ``domain`` (the most specific entry), or None."""
        from milterd.policy.names import domain_listed

        entry = domain_listed(domain, self.send_entries)
        return self._partner_index.get(entry) if entry is not None else None


def default_config_text() -> str:
    return resources.files("milterd").joinpath("default.toml").read_text(encoding="utf-8")


def load_config(path: str | Path | None) -> Config:
    """Read and validate a TOML file; ``None`` means the embedded default."""
    if path is None:
        return parse_config(default_config_text(), source="<default>")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    return parse_config(text, source=str(path))


def parse_config(text: str, *, source: str = "<string>") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: TOML syntax error: {exc}"]) from None
    v = _Validator(raw)
    milter_group = v.get("milter.group", str, MilterConfig.group, check=_group_name)
    policy_listen = v.listen("policy.listen", allow_unix=True)
    policy_group = v.get("policy.group", str, milter_group, check=_group_name)
    if v.present("policy.group") and policy_listen is not None and not policy_listen.is_unix:
        v.errors.append('policy.group: applies only to a unix socket ("unix:/path"), but '
                        f"policy.listen is TCP ({policy_listen})")
    config = Config(
        milter=MilterConfig(
            listen=v.get("milter.listen", str, MilterConfig.listen, check=_check_milter_socket),
            group=milter_group,
            on_error=v.choice("milter.on_error", ("tempfail", "accept"), MilterConfig.on_error),
            timeout=v.get("milter.timeout", int, MilterConfig.timeout, check=_positive),
            plugin_timeout=float(
                v.get("milter.plugin_timeout", (int, float), MilterConfig.plugin_timeout,
                      check=_positive)
            ),
            stop_grace=float(
                v.get("milter.stop_grace", (int, float), MilterConfig.stop_grace,
                      check=_non_negative)
            ),
        ),
        log=LogConfig(
            format=v.choice("log.format", ("text", "json"), LogConfig.format),
            level=v.choice("log.level", ("debug", "info", "warning", "error"), LogConfig.level),
        ),
        policy_listen=policy_listen,
        policy_group=policy_group,
        socketmap_listen=v.listen("socketmap.listen"),
        socketmap_tlsrpt=v.get("socketmap.tlsrpt", bool, False),
        metrics_listen=v.listen("metrics.listen"),
        domain_security=DomainSecurityConfig(
            mode=v.choice("domain_security.mode", ("enforce", "report"), "enforce"),
            failure_action=v.choice(
                "domain_security.failure_action", ("reject", "tempfail"), "reject"
            ),
            receive_domains=v.domain_list("domain_security.receive_domains"),
            send_domains=v.domain_list("domain_security.send_domains"),
        ),
        tls=TlsConfig(
            min_version=v.choice("tls.min_version", TLS_VERSIONS, TlsConfig.min_version),
            min_cipher_bits=v.get("tls.min_cipher_bits", int, TlsConfig.min_cipher_bits,
                                  check=_non_negative),
            certificates=tuple(v.get("tls.certificates", list, [], check=_list_of_str)),
        ),
        peer_cert=PeerCertConfig(
            trusted_issuers=tuple(v.get("peer_cert.trusted_issuers", list, [],
                                        check=_list_of_str)),
            pins=v.pins("peer_cert.pins"),
        ),
        stamp=StampConfig(
            header=v.get("stamp.header", str, StampConfig.header, check=_header_name),
        ),
        plugins=PluginsConfig(
            disable=tuple(v.get("plugins.disable", list, [], check=_list_of_str)),
            modules=tuple(v.get("plugins.modules", list, [], check=_list_of_str)),
        ),
        outbound=OutboundConfig(
            maillog=v.get("outbound.maillog", str, None),
            state_dir=v.get("outbound.state_dir", str, None),
            dns_servers=_parse_dns_servers(v.get("outbound.dns_servers", list, [],
                                                 check=_dns_servers)),
            mtasts_ca_file=v.get("outbound.mtasts_ca_file", str, None),
            on_dns_error=v.choice("outbound.on_dns_error", ("temp", "notfound"), "temp"),
        ),
        watch=WatchConfig(
            probe_interval=float(v.get("watch.probe_interval", (int, float), 3600.0,
                                       check=_non_negative)),
            probe_timeout=float(v.get("watch.probe_timeout", (int, float), 10.0,
                                      check=_positive)),
            probe_max_hosts=v.get("watch.probe_max_hosts", int, 5, check=_positive),
            probe_port=v.get("watch.probe_port", int, 25,
                             check=lambda x: None if 0 < x < 65536 else "port out of range"),
            probe_ca_file=v.get("watch.probe_ca_file", str, None),
            probe_helo=v.get("watch.probe_helo", str, "", check=lambda x: None
                             if x == "" or _host_name(x) else "is not a host name"),
        ),
        tlsrpt=TlsRptConfig(
            organization=v.get("tlsrpt.organization", str, ""),
            contact=v.get("tlsrpt.contact", str, ""),
            submitter=v.get("tlsrpt.submitter", str, ""),
            smtp=v.listen("tlsrpt.smtp"),
            https_ca_file=v.get("tlsrpt.https_ca_file", str, None),
            sending_ip=v.get("tlsrpt.sending_ip", str, None,
                             check=lambda x: None if _ip(x, 4) or _ip(x, 6)
                             else "is not an IP address"),
        ),
        source=source,
    )
    config = replace(config, partners=build_partners(
        v, config.domain_security, config.tls, config.peer_cert),
        store=_store_config(v, config.outbound.state_dir))
    v.reject_unknown()
    if v.errors:
        raise ConfigError([f"{source}: {e}" for e in v.errors])
    return config


def _store_config(v: "_Validator", state_dir: str | None) -> StoreConfig:
    default_dir = state_dir or "/var/lib/milterd"
    url = v.get("store.url", str, f"sqlite://{default_dir.rstrip('/')}/milterd.db")
    if url.startswith("sqlite:///"):
        path = url[len("sqlite://"):]
        if not path.startswith("/") or path.endswith("/"):
            v.errors.append(f"store.url: a sqlite store needs an absolute file path "
                            f'("sqlite:///var/lib/milterd/milterd.db", got {url!r})')
    elif url.startswith(("postgresql://", "postgres://")):
        pass  # psycopg parses the rest (host, port, dbname, sslmode …) when it connects
    else:
        v.errors.append('store.url: must be "sqlite:///ABSOLUTE/PATH" or "postgresql://…"')
    host = v.get("store.host", str, "", check=lambda x: None if re.fullmatch(
        r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}", x) or x == "" else "is not a host name")
    return StoreConfig(url=url, host=host,
                       spool_dir=v.get("store.spool_dir", str, state_dir),
                       spool_max_mb=v.get("store.spool_max_mb", int, 256, check=_positive))


# -- validation helpers -------------------------------------------------------------------------

_KNOWN_KEYS = {
    "milter": {"listen", "group", "on_error", "timeout", "plugin_timeout", "stop_grace"},
    "log": {"format", "level"},
    "policy": {"listen", "group"},
    "socketmap": {"listen", "tlsrpt"},
    "metrics": {"listen"},
    "domain_security": {"mode", "failure_action", "receive_domains", "send_domains"},
    "tls": {"min_version", "min_cipher_bits", "certificates"},
    "peer_cert": {"trusted_issuers", "pins"},
    "stamp": {"header"},
    "plugins": {"disable", "modules"},
    "outbound": {"maillog", "state_dir", "dns_servers", "mtasts_ca_file", "on_dns_error"},
    "store": {"url", "host", "spool_dir", "spool_max_mb"},
    "watch": {"probe_interval", "probe_timeout", "probe_max_hosts", "probe_port",
              "probe_ca_file", "probe_helo"},
    "tlsrpt": {"organization", "contact", "submitter", "smtp", "https_ca_file", "sending_ip"},
}


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must not be negative"


def _list_of_str(value: list) -> str | None:
    bad = [x for x in value if not isinstance(x, str)]
    return f"must be a list of strings (found {bad[0]!r})" if bad else None


_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext: printable ASCII except ':'


def _dns_server(entry: Any) -> tuple[str, int] | None:
    """``"IP"`` → (IP, 53); ``"IPv4:PORT"`` / ``"[IPv6]:PORT"`` → (IP, PORT); None if neither."""
    import ipaddress

    if not isinstance(entry, str) or not entry.isascii():
        return None
    host, port = entry, "53"
    m = re.fullmatch(r"\[([^\[\]]+)\]:([0-9]{1,5})", entry)
    if m:
        host, port = m.group(1), m.group(2)
        if ":" not in host:
            return None  # brackets are for IPv6
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if not (port.isdigit() and 0 < int(port) < 65536):
        return None
    return str(ip), int(port)


def _dns_servers(value: list) -> str | None:
    for entry in value:
        if _dns_server(entry) is None:
            return f'{entry!r} is not "IP", "IPv4:PORT" or "[IPv6]:PORT"'
    return None


def _parse_dns_servers(value: list) -> tuple[tuple[str, int], ...]:
    return tuple(s for s in (_dns_server(e) for e in value) if s is not None)


def _header_name(value: str) -> str | None:
    return None if _HEADER_NAME.match(value) else "is not a valid header field name"


# A group name as useradd/groupadd allow it (no '/', ':', spaces; not starting with '-').
_GROUP_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}\$?", re.ASCII)
# A host name for a TCP listener (resolved when the listener starts).
_HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?", re.ASCII)
_MAX_UNIX_PATH = 100  # sun_path is 108 bytes; libmilter's own limit is lower


def _host_name(value: str) -> bool:
    """A DNS host name (not an address in disguise: the last label is not all digits)."""
    return bool(_HOST_NAME.fullmatch(value)) and not value.rstrip(".").rsplit(".", 1)[-1].isdigit()


def _group_name(value: str) -> str | None:
    if value == "" or _GROUP_NAME.fullmatch(value):
        return None
    return 'is not a group name (or "" to keep the process\'s group)'


def _unix_path_problem(path: str) -> str | None:
    if not path.startswith("/"):
        return "unix socket path must be absolute"
    if "\0" in path:
        return "unix socket path contains a NUL"
    if len(path.encode("utf-8", "surrogateescape")) > _MAX_UNIX_PATH:
        return f"unix socket path is too long (max {_MAX_UNIX_PATH} bytes)"
    return None


def _ip(text: str, version: int) -> bool:
    import ipaddress

    if not text.isascii():
        return False
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _check_milter_socket(value: str) -> str | None:
    """libmilter's spec, limited to what libmilter really opens (measured with Debian's 8.17):
    ``inet:PORT[@IPv4-or-name]`` (also ``@[IPv4]``) and ``inet6:PORT[@IPv6]`` (also ``@[IPv6]``;
    libmilter does not resolve names for inet6)."""
    if value.startswith(("unix:", "local:")):
        return _unix_path_problem(value.split(":", 1)[1])
    m = re.fullmatch(r"(inet6?):([0-9]{1,5})(?:@(.*))?", value, re.ASCII)
    if not m:
        return 'must be "unix:/path", "inet:PORT@HOST" or "inet6:PORT@IPv6"'
    family, port, host = m.group(1), int(m.group(2)), m.group(3)
    if not 0 < port < 65536:
        return "port out of range"
    if host is None:
        return None
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if family == "inet":
        if _ip(bare, 4) or (bare == host and _host_name(host)):
            return None
        if _ip(bare, 6):
            return f'{host} is an IPv6 address: use "inet6:{port}@{bare}"'
        return f"{host!r} is not an IPv4 address or a host name"
    if _ip(bare, 6):
        return None
    if _ip(bare, 4):
        return f'{host} is an IPv4 address: use "inet:{port}@{bare}"'
    return f'{host!r} is not an IPv6 address (libmilter resolves no names for inet6)'


class _Validator:
    def __init__(self, raw: dict):
        self.raw = raw
        self.errors: list[str] = []

    def present(self, key: str) -> bool:
        return self._lookup(key)[0]

    def _lookup(self, key: str) -> tuple[bool, Any]:
        node: Any = self.raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False, None
            node = node[part]
        return True, node

    def get(self, key: str, types: type | tuple[type, ...], default: Any,
            check: Callable[[Any], str | None] | None = None) -> Any:
        present, value = self._lookup(key)
        if not present:
            return default
        return self.get_value(key, value, types, default, check)

    def get_value(self, key: str, value: Any, types: type | tuple[type, ...], default: Any,
                  check: Callable[[Any], str | None] | None = None) -> Any:
        """``value`` (found at ``key``) if it has one of ``types`` and passes ``check``; else
        an error naming ``key`` and ``default``."""
        type_ok = isinstance(value, types) and not (
            isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
        )
        if not type_ok:
            names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            self.errors.append(f"{key}: expected {names}, got {type(value).__name__} {value!r}")
            return default
        if check is not None:
            problem = check(value)
            if problem:
                self.errors.append(f"{key}: {problem} (got {value!r})")
                return default
        return value

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in allowed:
            self.errors.append(f"{key}: must be one of {', '.join(allowed)} (got {value!r})")
            return default
        return value

    def listen(self, key: str, *, allow_unix: bool = False) -> ListenAddress | None:
        """``HOST:PORT`` (IPv4 literal or host name), ``[IPv6]:PORT`` and, with ``allow_unix``,
        ``unix:/path``.  Whatever passes here is what the listener binds at start."""
        value = self.get(key, str, None)
        if value is None:
            return None
        forms = '"HOST:PORT" or "[IPv6]:PORT"' + (' or "unix:/path"' if allow_unix else "")
        if value.startswith("unix:"):
            if not allow_unix:
                self.errors.append(f"{key}: must be {forms}; a unix socket is not supported "
                                   f"here (got {value!r})")
                return None
            path = value[5:]
            problem = _unix_path_problem(path)
            if problem:
                self.errors.append(f"{key}: {problem} (got {value!r})")
                return None
            return ListenAddress(path=path)
        m = re.fullmatch(r"\[([^\[\]]*)\]:([0-9]{1,5})|([^:\[\]]+):([0-9]{1,5})", value,
                         re.ASCII)
        if not m:
            hint = ' (an IPv6 address goes in brackets: "[::1]:PORT")' if value.count(":") > 1 \
                else ""
            self.errors.append(f"{key}: must be {forms}{hint} (got {value!r})")
            return None
        port = int(m.group(2) or m.group(4))
        if not 0 < port < 65536:
            self.errors.append(f"{key}: port out of range (got {value!r})")
            return None
        if m.group(1) is not None:
            host = m.group(1)
            if not _ip(host, 6):
                self.errors.append(f"{key}: {host!r} in brackets is not an IPv6 address "
                                   f"(got {value!r})")
                return None
        else:
            host = m.group(3)
            if not (_ip(host, 4) or _host_name(host)):
                self.errors.append(f"{key}: {host!r} is not an IPv4 address or a host name "
                                   f"(got {value!r})")
                return None
        return ListenAddress(host, port)

    def domain_list(self, key: str) -> tuple[str, ...]:
        from milterd.policy.names import normalize_dns_name

        values = self.get(key, list, [], check=_list_of_str)
        out = []
        for entry in values:
            dotted = entry.startswith(".")
            name = normalize_dns_name(entry[1:] if dotted else entry)
            if name is None or "*" in entry:
                self.errors.append(f"{key}: {entry!r} is not a domain name "
                                   '(use "example.com" or ".example.com" for its subdomains)')
                continue
            out.append("." + name if dotted else name)
        return tuple(out)

    def pins(self, key: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
        from milterd.policy.names import normalize_dns_name

        table = self.get(key, dict, {})
        out = []
        seen: dict[str, str] = {}
        for domain, fps in table.items():
            name = normalize_dns_name(domain)
            if name is None:
                self.errors.append(f"{key}.{domain}: not a domain name")
                continue
            if name in seen:
                self.errors.append(f'{key}."{domain}": names the same domain as '
                                   f'{key}."{seen[name]}" (configure each domain once)')
                continue
            seen[name] = domain
            if isinstance(fps, str):
                fps = [fps]
            if not isinstance(fps, list):
                self.errors.append(f"{key}.{domain}: expected a list of SHA-256 fingerprints")
                continue
            normalised = []
            for fp in fps:
                n = normalize_fingerprint(fp) if isinstance(fp, str) else None
                if n is None:
                    self.errors.append(
                        f"{key}.{domain}: {fp!r} is not a SHA-256 fingerprint "
                        "(64 hex digits, colons optional)")
                else:
                    normalised.append(n)
            out.append((name, tuple(normalised)))
        return tuple(out)

    def reject_unknown(self) -> None:
        for section, body in self.raw.items():
            if section == "partners":
                continue  # keys are domains: checked by milterd.core.partners
            if section not in _KNOWN_KEYS:
                self.errors.append(f"{section}: unknown section")
                continue
            if not isinstance(body, dict):
                self.errors.append(f"{section}: must be a table")
                continue
            for key in body:
                if key not in _KNOWN_KEYS[section]:
                    self.errors.append(f"{section}.{key}: unknown key")


def normalize_fingerprint(value: str) -> str | None:
    """``ab:cd…``/``ABCD…`` → ``AB:CD:…`` (the form Postfix and Sendmail print); None if not SHA-256."""
    digits = value.replace(":", "").strip().upper()
    if not re.fullmatch(r"[0-9A-F]{64}", digits):
        return None
    return ":".join(digits[i:i + 2] for i in range(0, 64, 2))
