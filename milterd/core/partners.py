"""Partner terms: one connector per partner domain, merged from the lists, the tables and defaults.

Every partner is a :class:`PartnerTerms` value: what Domain Security requires of mail *from* it
(``receive``) and *to* it (``send``).  The terms come from three places, merged here once:

* ``[partners."<entry>"]`` tables — every key optional;
* the lists ``[domain_security] receive_domains`` / ``send_domains`` and ``[peer_cert.pins]`` —
  each entry is a partner with default terms (so configs from before partner tables work
  unchanged);
* the global keys (``[domain_security] mode/failure_action``, ``[tls]``, ``[peer_cert]``) — the
  defaults of every term a table leaves out.

A table wins over a list for its own entry; a term set in two places that disagree is an error
(``receive = false`` for a domain on ``receive_domains``, table pins that differ from
``[peer_cert.pins]``, two table keys that name one domain).  An entry keeps the list semantics:
``woodgrovebank.test`` covers that domain, ``.woodgrovebank.test`` its subdomains only; the most
specific entry wins (:func:`milterd.policy.names.domain_listed`).

Pins have one spelling per kind, so a pasted value can never be read as the other kind:
``cert-sha256:AB:CD:…`` (SHA-256 of the whole DER certificate: ``openssl x509 -fingerprint
-sha256``, Postfix's ``ccert_fingerprint``, Sendmail's ``{cert_fp}``) and ``key-sha256:AB:CD:…``
(SHA-256 of the DER SubjectPublicKeyInfo: Postfix's ``ccert_pubkey_fingerprint``; survives a
re-issue with the same key).  ``[peer_cert.pins]`` values stay certificate pins.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from milterd.core.config import DomainSecurityConfig, PeerCertConfig, TlsConfig, _Validator

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CERT_PIN_PREFIX = "cert-sha256:"
KEY_PIN_PREFIX = "key-sha256:"

#: Every key a ``[partners."…"]`` table may hold.
TABLE_KEYS = ("receive", "mode", "failure_action", "certificate_names", "trusted_issuers", "pins",
              "min_version", "min_cipher_bits", "client_networks", "send", "server_names")


@dataclass(frozen=True)
class PartnerTerms:
    """The effective terms of one partner entry (see the module docstring)."""

    entry: str                                  # "woodgrovebank.test" or ".woodgrovebank.test"
    receive: bool = False
    send: bool = False
    mode: str = "enforce"                       # enforce | report
    failure_action: str = "reject"              # reject | tempfail
    certificate_names: tuple[str, ...] = ()     # reference identities besides the domain
    trusted_issuers: tuple[str, ...] = ()
    cert_pins: tuple[str, ...] = ()             # "AB:CD:…" SHA-256 of the certificate
    key_pins: tuple[str, ...] = ()              # "AB:CD:…" SHA-256 of the SubjectPublicKeyInfo
    min_version: str = "TLSv1.2"
    min_cipher_bits: int = 128
    client_networks: tuple[IpNetwork, ...] = ()
    server_names: tuple[str, ...] = ()          # Postfix match= names for its MX certificates
    table: bool = False                         # configured by a [partners."…"] table
    explicit: frozenset[str] = field(default_factory=frozenset)  # keys its table sets

    @property
    def domain(self) -> str:
        """The domain the entry names (without the leading dot): metric label, stamp ``domain=``."""
        return self.entry.lstrip(".")

    @property
    def pinned(self) -> bool:
        return bool(self.cert_pins or self.key_pins)

    def pin_lines(self) -> list[str]:
        return ([CERT_PIN_PREFIX + p for p in self.cert_pins]
                + [KEY_PIN_PREFIX + p for p in self.key_pins])


def parse_pin(value: Any) -> tuple[str, str] | None:
    """``"cert-sha256:…"`` / ``"key-sha256:…"`` → ``("cert"|"key", "AB:CD:…")``; None if neither."""
    from milterd.core.config import normalize_fingerprint

    if not isinstance(value, str):
        return None
    text = value.strip()
    low = text.lower()
    for kind, prefix in (("cert", CERT_PIN_PREFIX), ("key", KEY_PIN_PREFIX)):
        if low.startswith(prefix):
            fp = normalize_fingerprint(text[len(prefix):])
            return (kind, fp) if fp is not None else None
    return None


def reference_identity(value: Any) -> str | None:
    """A configured certificate/server name: a DNS host name (A-label form), or ``.parent`` for
    any host under ``parent``.  Wildcards belong in certificates, not here; an IP address, a
    single label or anything that is not a DNS name cannot be a reference identity (RFC 9525)."""
    from milterd.policy.names import normalize_dns_name

    if not isinstance(value, str) or "*" in value:
        return None
    dotted = value.startswith(".")
    name = normalize_dns_name(value[1:] if dotted else value)
    if name is None or "." not in name:
        return None
    return "." + name if dotted else name


def _network(value: Any) -> IpNetwork | None:
    if not isinstance(value, str) or not value.isascii():
        return None
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError:
        return None


def build_partners(v: "_Validator", ds: "DomainSecurityConfig", tls: "TlsConfig",
                   peer: "PeerCertConfig") -> tuple[PartnerTerms, ...]:
    """Merge tables, lists and global defaults into one term set per entry (errors go to ``v``)."""
    from milterd.core.config import TLS_VERSIONS

    raw = v.get("partners", dict, {})
    tables: dict[str, tuple[str, dict]] = {}   # entry -> (key as written, raw table)
    for written, body in raw.items():
        key = f'partners."{written}"'
        entry = _entry(written)
        if entry is None:
            v.errors.append(f"{key}: {written!r} is not a domain name "
                            '(use "example.com", or ".example.com" for its subdomains)')
            continue
        if not isinstance(body, dict):
            v.errors.append(f"{key}: must be a table")
            continue
        for k in body:
            if k not in TABLE_KEYS:
                v.errors.append(f"{key}.{k}: unknown key")
        if entry in tables:
            first = tables[entry][0]
            if tables[entry][1] != body:
                v.errors.append(f'{key}: names the same domain as partners."{first}" with '
                                "different terms (configure each domain once)")
            continue
        tables[entry] = (written, body)

    legacy_pins = dict(peer.pins)
    entries: list[str] = []
    for e in (*ds.receive_domains, *ds.send_domains, *legacy_pins, *tables):
        if e not in entries:
            entries.append(e)

    out = []
    for entry in entries:
        written, body = tables.get(entry, (entry, None))
        key = f'partners."{written}"'
        t = body or {}

        def get(name: str, types: Any, default: Any, check: Any = None) -> Any:
            if name not in t:
                return default
            return v.get_value(f"{key}.{name}", t[name], types, default, check)

        listed_receive = entry in ds.receive_domains
        listed_send = entry in ds.send_domains
        receive = get("receive", bool, listed_receive)
        send = get("send", bool, listed_send)
        if "receive" in t and t["receive"] is False and listed_receive:
            v.errors.append(f"{key}.receive: false, but {entry!r} is on "
                            "domain_security.receive_domains (configure it in one place)")
        if "send" in t and t["send"] is False and listed_send:
            v.errors.append(f"{key}.send: false, but {entry!r} is on "
                            "domain_security.send_domains (configure it in one place)")
        if body is not None and not receive and not send and "receive" not in t \
                and "send" not in t:
            v.errors.append(f"{key}: neither receive nor send is on (the domain is on no list): "
                            "set receive = true and/or send = true")

        mode = get("mode", str, ds.mode)
        if mode not in ("enforce", "report"):
            v.errors.append(f"{key}.mode: must be one of enforce, report (got {mode!r})")
            mode = ds.mode
        action = get("failure_action", str, ds.failure_action)
        if action not in ("reject", "tempfail"):
            v.errors.append(f"{key}.failure_action: must be one of reject, tempfail "
                            f"(got {action!r})")
            action = ds.failure_action
        min_version = get("min_version", str, tls.min_version)
        if min_version not in TLS_VERSIONS:
            v.errors.append(f"{key}.min_version: must be one of {', '.join(TLS_VERSIONS)} "
                            f"(got {min_version!r})")
            min_version = tls.min_version
        bits = get("min_cipher_bits", int, tls.min_cipher_bits,
                   lambda x: None if x >= 0 else "must not be negative")

        names = _names(v, f"{key}.certificate_names", get("certificate_names", list, []))
        server_names = _names(v, f"{key}.server_names", get("server_names", list, []))
        issuers = get("trusted_issuers", list, list(peer.trusted_issuers),
                      lambda x: None if all(isinstance(i, str) for i in x)
                      else "must be a list of strings")

        networks = []
        for n in get("client_networks", list, []):
            net = _network(n)
            if net is None:
                v.errors.append(f"{key}.client_networks: {n!r} is not an IPv4/IPv6 network "
                                '("192.0.2.0/24", "2001:db8::/32", host bits zero)')
            else:
                networks.append(net)

        cert_pins: list[str] = []
        key_pins: list[str] = []
        legacy = legacy_pins.get(entry.lstrip("."), ())
        if "pins" in t:
            pins = t["pins"]
            if not isinstance(pins, list):
                v.errors.append(f"{key}.pins: expected a list of "
                                f'"{CERT_PIN_PREFIX}…" / "{KEY_PIN_PREFIX}…" strings')
                pins = []
            for p in pins:
                parsed = parse_pin(p)
                if parsed is None:
                    v.errors.append(
                        f"{key}.pins: {p!r} is not a pin: write \"{CERT_PIN_PREFIX}<64 hex>\" "
                        f"(certificate) or \"{KEY_PIN_PREFIX}<64 hex>\" (public key); "
                        "`milterd cert list` prints both")
                    continue
                (cert_pins if parsed[0] == "cert" else key_pins).append(parsed[1])
            if legacy and (set(legacy) != set(cert_pins) or key_pins):
                v.errors.append(f"{key}.pins: differ from peer_cert.pins.\"{entry.lstrip('.')}\" "
                                "(configure the pins in one place)")
        else:
            cert_pins = list(legacy)

        out.append(PartnerTerms(
            entry=entry, receive=bool(receive), send=bool(send), mode=mode,
            failure_action=action, certificate_names=names, trusted_issuers=tuple(issuers),
            cert_pins=tuple(dict.fromkeys(cert_pins)), key_pins=tuple(dict.fromkeys(key_pins)),
            min_version=min_version, min_cipher_bits=bits, client_networks=tuple(networks),
            server_names=server_names, table=body is not None,
            explicit=frozenset(k for k in t if k in TABLE_KEYS)))
    return tuple(out)


def _entry(written: str) -> str | None:
    from milterd.policy.names import normalize_dns_name

    if not isinstance(written, str) or "*" in written:
        return None
    dotted = written.startswith(".")
    name = normalize_dns_name(written[1:] if dotted else written)
    if name is None:
        return None
    return "." + name if dotted else name


def _names(v: "_Validator", key: str, values: Any) -> tuple[str, ...]:
    out: list[str] = []
    for n in values if isinstance(values, list) else []:
        ref = reference_identity(n)
        if ref is None:
            v.errors.append(f"{key}: {n!r} cannot be a reference identity (a DNS host name "
                            'such as "mx.hoster.test", or ".hoster.test" for any host under it; '
                            "no wildcards, IP addresses or single labels)")
        elif ref not in out:
            out.append(ref)
    return tuple(out)


# -- what an admin reads: `milterd partners` and check-config notes ------------------------------

def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def _origins(p: PartnerTerms, config: Any) -> dict[str, str]:
    """Where each effective term came from, for the comment after it."""
    ds = config.domain_security
    listed = {
        "receive": "receive_domains" if p.entry in ds.receive_domains else None,
        "send": "send_domains" if p.entry in ds.send_domains else None,
        "pins": "peer_cert.pins" if p.cert_pins and "pins" not in p.explicit else None,
    }
    defaults = {"mode": "domain_security.mode", "failure_action": "domain_security.failure_action",
                "trusted_issuers": "peer_cert.trusted_issuers", "min_version": "tls.min_version",
                "min_cipher_bits": "tls.min_cipher_bits"}
    out = {}
    for key in TABLE_KEYS:
        if key in p.explicit:
            out[key] = "table"
        elif listed.get(key):
            out[key] = f"from {listed[key]}"
        elif key in defaults:
            out[key] = f"default: {defaults[key]}"
        else:
            out[key] = "default"
    return out


def partner_values(p: PartnerTerms) -> dict[str, Any]:
    return {
        "receive": p.receive, "mode": p.mode, "failure_action": p.failure_action,
        "certificate_names": list(p.certificate_names),
        "trusted_issuers": list(p.trusted_issuers), "pins": p.pin_lines(),
        "min_version": p.min_version, "min_cipher_bits": p.min_cipher_bits,
        "client_networks": [str(n) for n in p.client_networks], "send": p.send,
        "server_names": list(p.server_names),
    }


def render_partners(config: Any, *, as_json: bool = False) -> str:
    """The effective terms of every partner, as TOML tables (each term commented with where it
    came from: the partner's table, a list, or a global default) or as JSON."""
    import json

    if as_json:
        return json.dumps([{"partner": p.entry, "domain": p.domain, "table": p.table,
                            "terms": partner_values(p), "origin": _origins(p, config)}
                           for p in config.partners], indent=2) + "\n"
    if not config.partners:
        return "# no partners configured (receive_domains, send_domains, [partners.\"…\"])\n"
    lines = [f"# effective partner terms of {config.source}"]
    for p in config.partners:
        origins = _origins(p, config)
        lines.append("")
        lines.append(f'[partners."{p.entry}"]')
        for key, value in partner_values(p).items():
            text = f"{key} = {_toml_value(value)}"
            lines.append(f"{text:<44} # {origins[key]}" if len(text) < 44
                         else f"{text}  # {origins[key]}")
    return "\n".join(lines) + "\n"


def partner_notes(config: Any) -> list[str]:
    """What check-config tells an admin about partners beyond errors: terms an MTA cannot give."""
    notes = []
    receive = [p for p in config.partners if p.receive]
    if any(p.pinned for p in receive) and config.policy_listen is None:
        notes.append("note: pins are configured but [policy] listen is not: Postfix gives a "
                     "milter no certificate fingerprint, so with Postfix pinned partners pass "
                     "only through check_policy_service (Sendmail: {cert_fp} with "
                     "CertFingerprintAlgorithm sha256)")
    for p in receive:
        if p.key_pins:
            notes.append(f'note: partners."{p.entry}".pins: key-sha256 pins need the '
                         "certificate's public key: Postfix gives it through [policy] "
                         "(ccert_pubkey_fingerprint), the reference MTA with its macros; "
                         "Sendmail cannot, so mail from this partner through Sendmail passes "
                         "only by a cert-sha256 pin or a trusted certificate, else pin_mismatch")
    return notes


# -- what the partner certificate watch saw (#18): `milterd partners`, `milterd partners pin` ----

def load_history(config: Any) -> tuple[dict[str, list] | None, str | None]:
    """The watch's observations from ``[store] url`` (read only): ``({"certs": […], "hosts":
    […], "probes": […]}, None)``, or ``(None, note)`` when the store is absent or does not
    answer (a one-line reason; the caller shows the terms alone)."""
    import os

    from milterd.store.api import StoreError, open_store, redact
    from milterd.watch.state import HOST_KIND, KIND, PROBE_KIND

    url = config.store.url
    if url.startswith("sqlite:///") and not os.path.exists(url[len("sqlite://"):]):
        return None, f"no certificate history: the store {redact(url)} does not exist yet"
    store = None
    try:
        store = open_store(url)
        if store.schema_version() < 1:
            return None, f"no certificate history: the store {redact(url)} has no schema yet"
        return {"certs": store.observations(KIND), "hosts": store.observations(HOST_KIND),
                "probes": store.observations(PROBE_KIND)}, None
    except StoreError as exc:
        return None, f"no certificate history: the store {redact(url)} does not answer ({exc})"
    finally:
        if store is not None:
            try:
                store.close()
            except Exception:  # noqa: BLE001
                pass


def _utc(ts: float | None) -> str:
    import datetime as dt

    if ts is None:
        return "?"
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def seen_for(history: dict[str, list], entry: str) -> dict[str, Any]:
    """What the watch saw of ``entry``: per direction the last certificate (its observation,
    with ``hosts``: host -> (count, last_seen)), and the probes (one per host)."""
    out: dict[str, Any] = {}
    for direction in ("inbound", "outbound"):
        prefix = f"{entry}|{direction}|"
        rows = [o for o in history["certs"] if o.key.startswith(prefix)]
        if not rows:
            continue
        last = max(rows, key=lambda o: (o.last_seen, o.key))
        hosts = {o.key[len(last.key) + 1:]: (o.count, o.last_seen)
                 for o in history["hosts"] if o.key.startswith(last.key + "|")}
        out[direction] = {"observation": last, "hosts": hosts, "certificates": len(rows)}
    probes = [o for o in history["probes"] if o.key.startswith(entry + "|")]
    if probes:
        out["probes"] = sorted(probes, key=lambda o: -o.last_seen)
    return out


def _seen_lines(seen: dict[str, Any]) -> list[str]:
    lines = []
    for direction in ("inbound", "outbound"):
        s = seen.get(direction)
        if s is None:
            continue
        o = s["observation"]
        a = o.attrs
        hosts = ", ".join(f"{h} ({c})" for h, (c, _) in sorted(s["hosts"].items())) or \
            ", ".join(dict.fromkeys((o.first_host, o.last_host)))
        result = a.get("result") or "?"
        if a.get("reason"):
            result += f" ({a['reason']})"
        lines.append(f"# {direction}: last certificate seen {_utc(o.last_seen)} "
                     f"(first {_utc(o.first_seen)}, {o.count} times; hosts: {hosts}; "
                     f"{s['certificates']} certificate(s) known)")
        lines.append(f"#   subject: {a.get('subject') or '?'}")
        lines.append(f"#   issuer: {a.get('issuer') or '?'}")
        if a.get("cert_sha256"):
            lines.append(f"#   {CERT_PIN_PREFIX}{a['cert_sha256']}")
        if a.get("pubkey_sha256"):
            lines.append(f"#   {KEY_PIN_PREFIX}{a['pubkey_sha256']}")
        if a.get("not_after"):
            lines.append(f"#   not after: {_utc(a['not_after'])}")
        via = a.get("mx_host") or a.get("mta") or "?"
        lines.append(f"#   last result: {result} (via {via}, by {o.last_host})")
    for p in seen.get("probes", []):
        a = p.attrs
        verdict = "would pass" if a.get("ok") else "would fail"
        lines.append(f"# outbound probe by {p.last_host} at {_utc(p.last_seen)}: {verdict}")
        for r in a.get("results", [])[:5]:
            what = "ok" if r.get("ok") else f"{r.get('reason')}: {r.get('detail')}"
            lines.append(f"#   {r.get('mx_host') or '(MX lookup)'} "
                         f"{r.get('address') or ''}: {what}".replace("  ", " "))
    return lines


def _seen_json(seen: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for direction in ("inbound", "outbound"):
        s = seen.get(direction)
        if s is None:
            continue
        o = s["observation"]
        out[direction] = {**o.attrs, "first_seen": o.first_seen, "last_seen": o.last_seen,
                          "count": o.count, "first_host": o.first_host,
                          "last_host": o.last_host, "certificates": s["certificates"],
                          "hosts": {h: {"count": c, "last_seen": t}
                                    for h, (c, t) in s["hosts"].items()}}
    if seen.get("probes"):
        out["probes"] = [{"host": p.last_host, "at": p.last_seen, **p.attrs}
                         for p in seen["probes"]]
    return out


def render_partners_seen(config: Any, history: dict[str, list] | None, note: str | None, *,
                         as_json: bool = False) -> str:
    """:func:`render_partners` plus, per partner, what the watch saw (``history`` from
    :func:`load_history`); without history the terms alone and ``note``."""
    import json

    if as_json:
        out = json.loads(render_partners(config, as_json=True))
        for item in out:
            item["seen"] = _seen_json(seen_for(history, item["partner"])) if history else None
        doc: Any = out if note is None else {"partners": out, "note": note}
        return json.dumps(doc, indent=2) + "\n"
    text = render_partners(config)
    if not config.partners:
        return text
    blocks = text.rstrip("\n").split("\n\n")
    head, tables = blocks[0], blocks[1:]
    lines = [head + (f"\n# {note}" if note else "")]
    for p, block in zip(config.partners, tables):
        extra = _seen_lines(seen_for(history, p.entry)) if history else []
        if history and not extra:
            extra = ["# no certificate seen yet"]
        lines.append("\n".join([block, *extra]))
    return "\n\n".join(lines) + "\n"


def render_pins(config: Any, domain: str, history: dict[str, list]) -> tuple[str, int]:
    """``milterd partners pin DOMAIN``: the pin lines of the certificates last seen from the
    partner (inbound and outbound), for ``pins = [...]``; (text, exit status: 0, 1 = nothing
    seen, 2 = not a partner)."""
    from milterd.policy.names import normalize_dns_name

    wanted = normalize_dns_name(domain.lstrip(".")) or domain.lower()
    partners = [p for p in config.partners if p.domain == wanted]
    if not partners:
        return f"# {domain}: not a configured partner\n", 2
    lines: list[str] = []
    for p in partners:
        seen = seen_for(history, p.entry)
        for direction in ("inbound", "outbound"):
            s = seen.get(direction)
            if s is None:
                continue
            o = s["observation"]
            a = o.attrs
            lines.append(f"# {p.entry} {direction}: {a.get('subject') or '?'} (issuer "
                         f"{a.get('issuer') or '?'}), last seen {_utc(o.last_seen)} by "
                         f"{o.last_host}")
            if a.get("cert_sha256"):
                lines.append(f'"{CERT_PIN_PREFIX}{a["cert_sha256"]}",')
            if a.get("pubkey_sha256"):
                lines.append(f'"{KEY_PIN_PREFIX}{a["pubkey_sha256"]}",')
    if not lines:
        return f"# {domain}: no certificate seen yet\n", 1
    head = (f'# paste into [partners."{partners[0].entry}"] pins = [ … ] (keep the old pins '
            "until the partner has switched over)")
    return "\n".join([head, *lines]) + "\n", 0
