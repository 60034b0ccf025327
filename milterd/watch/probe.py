"""The partner certificate watch's outbound probe (#18): would mail to a partner pass its terms?

:func:`probe_partner` does for one send partner what Postfix does for a ``secure`` delivery to it,
stopping right after the TLS handshake: MX lookup, SMTP greeting, ``EHLO``, ``STARTTLS``, the
handshake, ``QUIT``.  It reports, per MX host, the certificate the host presented (whatever it
is: verification is off at the TLS layer so an untrusted certificate can be seen and recorded)
and whether Postfix would have accepted it under the partner's terms (:class:`ProbeResult`).

What "would pass" means (Postfix ``secure`` as :mod:`milterd.outbound.tlspolicy` configures it
for a send-list entry: ``secure match=… protocols=>=…``):

* the negotiated TLS version is at least the partner's ``min_version`` (reason ``tls_version``;
  the probe itself offers TLS 1.2 and later, so a server that only speaks older versions ends in
  ``handshake_failed``);
* the presented chain verifies against ``ca_file`` (default: the system bundle) and the leaf is
  within its validity period — :func:`milterd.mta.tls.verify_chain`, the reference MTA's check
  (reason ``untrusted_cert``).  Intermediates the server presents are used as untrusted
  intermediates (as OpenSSL does), never as trust anchors;
* a certificate name matches (reason ``name_mismatch``): the partner's ``server_names`` when it
  has any (``mx.hoster.test`` per RFC 9525, so a ``*.hoster.test`` certificate matches too;
  ``.hoster.test`` any host under it: :func:`milterd.policy.names.reference_matches`), else the
  partner domain or a host under it (Postfix's ``match=nexthop:dot-nexthop``:
  :func:`milterd.policy.names.name_covers_domain`).  The names are the certificate's DNS
  subjectAltNames; the subject CN only when there is no DNS SAN (as Postfix).

Decisions:

* **Dot entries** (``.hoster.test``: every subdomain, not the parent) are not probed:
  :func:`probe_partner` returns ``[]``.  The entry governs mail to domains whose names are only
  known when mail is sent; the parent's MX hosts serve a domain the entry does not cover, so a
  pass or fail there would say nothing about the partner's terms.
* **MX**: MX hosts by preference (ties in DNS order), at most ``max_hosts`` of them, each probed
  once (one :class:`ProbeResult` each); no MX records → the domain itself (implicit MX,
  RFC 5321 §5.1); a null MX (RFC 7505) → nothing to probe, ``[]``.  NXDOMAIN or a failed MX
  lookup → one result with ``reason="dns_failed"``, ``mx_host=""`` and ``address=""``.
* **Addresses**: A and AAAA are both looked up; the IPv4 addresses are tried first, then IPv6, in
  DNS order, and the first that accepts the TCP connection is probed (later addresses of the same
  host are not).  A connect attempt gets at most half of the host's time budget while other
  addresses remain, so one black-holed address does not use all of it.
* **No SNI** is sent (Postfix sends none for ``secure`` unless ``servername=`` is configured, so
  the probe sees the certificate Postfix would see); no client certificate is presented.
* ``subject`` / ``issuer`` are RFC 4514 strings (as ``milterd cert list``).
* **Bounds**: the MX lookup and each host (address lookup + connect + SMTP + TLS + QUIT) are each
  bounded by ``timeout`` (``asyncio.wait_for``), so one call takes at most about
  ``timeout * (max_hosts + 1)``; hosts are probed one after another (one connection at a time per
  partner).  A host that does not finish in time gives ``reason="timeout"`` naming the stage
  (unless its certificate was already evaluated: a server that stalls on ``QUIT`` does not turn a
  finished probe into a timeout).
* Everything the server sends that ends up in ``detail``, ``subject``, ``issuer`` or ``names`` is
  reduced to printable ASCII and truncated (no CR/LF can reach a log line or a metric).
* :func:`probe_partner` never raises (a bug inside ends as ``reason="other"``) except when
  cancelled.  It does not look at ``partner.send``: the caller picks whom to probe.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from cryptography import x509

from milterd.certs.common import (common_names, dns_sans, pubkey_sha256_fingerprint,
                                  sha256_fingerprint)
from milterd.core.partners import PartnerTerms
from milterd.mta.tls import verify_chain
from milterd.outbound.dns import DnsClient, DnsTempError
from milterd.policy import reasons
from milterd.policy.names import name_covers_domain, normalize_dns_name, reference_matches

__all__ = ["ProbeResult", "probe_partner", "evaluate_certificate", "PROBE_REASONS",
           "TLS_VERSION", "CONNECT_FAILED", "DNS_FAILED", "TIMEOUT"]

#: The probe's own reasons besides the outbound ones of :mod:`milterd.policy.reasons`.
TLS_VERSION = reasons.TLS_VERSION   # "tls_version": negotiated version below the partner's minimum
CONNECT_FAILED = "connect_failed"   # no address of the host accepted a TCP connection
DNS_FAILED = "dns_failed"           # MX / address lookup failed (NXDOMAIN, timeout, SERVFAIL)
TIMEOUT = "timeout"                 # the host did not finish within the time bound

#: Every ``reason`` a :class:`ProbeResult` can carry (a closed set: fit for metric labels).
#: ``other``: the server refused the session for a reason that is not TLS (greeting not 220,
#: a malformed reply, the connection closed before STARTTLS).
PROBE_REASONS = reasons.OUTBOUND_TLS_FAILURES + (
    TLS_VERSION, CONNECT_FAILED, DNS_FAILED, TIMEOUT, reasons.OUTBOUND_OTHER)

_TLS_ORDER = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")  # = tlspolicy.TLS_PROTOCOLS
_MAX_REPLY_LINES = 100
_LINE_LIMIT = 4096          # StreamReader limit: longer reply lines are a protocol error
_MAX_CHAIN = 16
_MAX_NAMES = 100
_DETAIL_MAX = 300


@dataclass(frozen=True)
class ProbeResult:
    """One MX host of one partner, as probed."""

    partner: str            # the partner entry (PartnerTerms.entry)
    mx_host: str            # the MX host name probed ("" when the MX lookup itself failed)
    address: str            # the IP address connected to ("" when none was)
    ok: bool                # would a Postfix "secure" delivery under the partner's terms pass?
    reason: str | None      # when not ok: one of PROBE_REASONS
    detail: str             # short human text: printable ASCII, no CR/LF
    tls_version: str | None = None
    cert_sha256: str | None = None      # "AB:CD:…" (sha256_fingerprint of the leaf)
    pubkey_sha256: str | None = None    # pubkey_sha256_fingerprint of the leaf
    subject: str | None = None          # RFC 4514
    issuer: str | None = None           # RFC 4514
    names: tuple[str, ...] = ()         # DNS SANs (the CN when there is none)
    not_after: float | None = None      # Unix time
    chain_sha256: tuple[str, ...] = ()  # the presented chain, leaf first
    probed_at: float = 0.0


# ---------------------------------------------------------------------------------------- text


def _clean(text: object, limit: int = _DETAIL_MAX) -> str:
    """Printable ASCII only (anything else becomes ``?``), at most ``limit`` characters."""
    s = "".join(c if " " <= c <= "~" else "?" for c in str(text)[:limit + 1])
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _names_text(names: Sequence[str]) -> str:
    shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
    return shown or "(none)"


# ---------------------------------------------------------------------------------------- CAs


def _load_pem_bundle(path: str) -> list[x509.Certificate]:
    data = Path(path).read_bytes()
    try:
        with warnings.catch_warnings():  # system bundles hold a few RFC 5280 violations
            warnings.simplefilter("ignore")
            return x509.load_pem_x509_certificates(data)
    except ValueError:
        # One bad certificate must not lose the whole bundle: parse block by block.
        out = []
        end = b"-----END CERTIFICATE-----"
        for block in data.split(end):
            start = block.find(b"-----BEGIN CERTIFICATE-----")
            if start < 0:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out.append(x509.load_pem_x509_certificate(block[start:] + end + b"\n"))
            except ValueError:
                continue
        return out


def _system_bundle() -> str | None:
    paths = ssl.get_default_verify_paths()
    for cand in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt",
                 "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"):
        if cand and Path(cand).is_file():
            return cand
    return None


def _load_cas(ca_file: str | None) -> tuple[list[x509.Certificate], str]:
    """The trust anchors, and a short error text when none could be loaded."""
    path = ca_file or _system_bundle()
    if path is None:
        return [], "no system CA bundle found"
    try:
        cas = _load_pem_bundle(path)
    except OSError as exc:
        return [], f"cannot read CA file {path}: {exc.strerror or type(exc).__name__}"
    return cas, "" if cas else f"no certificates in CA file {path}"


# ------------------------------------------------------------------------------------ evaluation


@dataclass(frozen=True)
class _Cert:
    cert_sha256: str
    pubkey_sha256: str
    subject: str
    issuer: str
    names: tuple[str, ...]
    not_after: float
    chain_sha256: tuple[str, ...]


def _cert_facts(chain: Sequence[x509.Certificate]) -> _Cert:
    leaf = chain[0]
    names = dns_sans(leaf) or common_names(leaf)[-1:]
    return _Cert(sha256_fingerprint(leaf), pubkey_sha256_fingerprint(leaf),
                 _clean(leaf.subject.rfc4514_string(), 512),
                 _clean(leaf.issuer.rfc4514_string(), 512),
                 tuple(_clean(n, 253) for n in names[:_MAX_NAMES]),
                 leaf.not_valid_after_utc.timestamp(),
                 tuple(sha256_fingerprint(c) for c in chain))


def evaluate_certificate(partner: PartnerTerms, tls_version: str | None,
                         chain: Sequence[x509.Certificate], cas: Sequence[x509.Certificate],
                         now: dt.datetime, ca_error: str = "") -> tuple[bool, str | None, str]:
    """Would Postfix ``secure`` under ``partner``'s terms accept this session?  Pure (no I/O).

    ``chain`` is what the server presented, leaf first.  Returns ``(ok, reason, detail)``; the
    checks run in Postfix's order: protocol version, chain (incl. validity period), name.
    """
    if not chain:
        return False, reasons.OUTBOUND_UNTRUSTED_CERT, "the server presented no certificate"
    minimum = partner.min_version
    if minimum in _TLS_ORDER and (tls_version not in _TLS_ORDER
                                  or _TLS_ORDER.index(tls_version) < _TLS_ORDER.index(minimum)):
        return False, TLS_VERSION, _clean(f"negotiated {tls_version}; the partner requires "
                                          f">= {minimum}")
    leaf = chain[0]
    trusted = list(cas)
    if any(c.issuer == c.subject for c in cas):
        # Presented intermediates help build the path, but only below a configured root: a
        # self-issued certificate from the server is never added (it would be a trust anchor).
        trusted += [c for c in chain[1:_MAX_CHAIN] if c.issuer != c.subject]
    ok, why = verify_chain(leaf, trusted, now=now) if cas else (False, ca_error or "no CAs")
    if not ok:
        return False, reasons.OUTBOUND_UNTRUSTED_CERT, _clean(f"certificate not trusted: {why}")
    names = dns_sans(leaf) or common_names(leaf)[-1:]
    if partner.server_names:
        refs = tuple(partner.server_names)
        good = [n for n in names if any(reference_matches(n, r) for r in refs)]
        wanted = "one of " + ", ".join(refs[:5])
    else:
        good = [n for n in names if name_covers_domain(n, partner.domain)]
        wanted = f"{partner.domain} or a host under it"
    if not good:
        return False, reasons.OUTBOUND_NAME_MISMATCH, _clean(
            f"certificate names {_names_text(names)}; required: {wanted}")
    return True, None, _clean(f"verified; {tls_version}; name {good[0]} matches {wanted}")


# ---------------------------------------------------------------------------------------- SMTP


class _Fail(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _State:
    """What one host's probe has got so far (read when the time bound cuts it off)."""

    stage: str = "looking up the host's addresses"
    address: str = ""
    writer: asyncio.StreamWriter | None = None
    result: ProbeResult | None = None
    errors: list[str] = field(default_factory=list)


async def _reply(reader: asyncio.StreamReader, what: str) -> tuple[int, list[str]]:
    lines: list[str] = []
    for _ in range(_MAX_REPLY_LINES):
        try:
            raw = await reader.readline()
        except ValueError:  # LimitOverrunError / a line over the limit
            raise _Fail(reasons.OUTBOUND_OTHER, f"{what}: reply line too long") from None
        if not raw.endswith(b"\n"):
            raise _Fail(reasons.OUTBOUND_OTHER, f"connection closed {what}")
        line = raw.rstrip(b"\r\n").decode("ascii", "replace")
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
            raise _Fail(reasons.OUTBOUND_OTHER, _clean(f"malformed reply {what}: {line[:80]}"))
        lines.append(line[4:])
        if line[3:4] != "-":
            return int(line[:3]), lines
    raise _Fail(reasons.OUTBOUND_OTHER, f"reply {what} has too many lines")


async def _command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: _State,
                   cmd: str, what: str) -> tuple[int, list[str]]:
    state.stage = f"waiting for the reply to {what}"
    writer.write(cmd.encode("ascii") + b"\r\n")
    await writer.drain()
    return await _reply(reader, f"after {what}")


async def _addresses(dns: DnsClient, host: str) -> list[str]:
    a, aaaa = await asyncio.gather(dns.query(host, "A"), dns.query(host, "AAAA"),
                                   return_exceptions=True)
    out: list[str] = []
    errors: list[str] = []
    for res in (a, aaaa):
        if isinstance(res, BaseException):
            if not isinstance(res, (DnsTempError, OSError)):
                raise res
            errors.append(_clean(res, 100))
            continue
        for rec in res.records:
            try:
                out.append(str(ipaddress.ip_address(rec.strip())))
            except ValueError:
                continue
    if not out:
        raise _Fail(DNS_FAILED, _clean(f"no address for {host}"
                                       + (": " + "; ".join(errors) if errors else "")))
    return list(dict.fromkeys(out))


def _client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE   # verification is done afterwards, in Python
    return ctx


def _presented_chain(sslobj: ssl.SSLObject) -> list[x509.Certificate]:
    leaf_der = sslobj.getpeercert(binary_form=True)
    if not leaf_der:
        return []
    ders: list[bytes] = []
    try:  # public from Python 3.13; the private _ssl method exists since 3.10
        getter = getattr(sslobj, "get_unverified_chain", None) or \
            sslobj._sslobj.get_unverified_chain  # type: ignore[attr-defined]
        der_format = ssl._ssl.ENCODING_DER  # type: ignore[attr-defined]
        for c in (getter() or [])[:_MAX_CHAIN]:
            ders.append(c if isinstance(c, bytes) else c.public_bytes(der_format))
    except Exception:
        ders = []
    if not ders or ders[0] != leaf_der:
        ders = [leaf_der]
    chain = []
    for der in ders:
        try:
            chain.append(x509.load_der_x509_certificate(der))
        except ValueError:
            if not chain:
                raise _Fail(reasons.OUTBOUND_UNTRUSTED_CERT,
                            "the server's certificate cannot be parsed") from None
            break
    return chain


async def _probe_host(partner: PartnerTerms, host: str, state: _State, *, dns: DnsClient,
                      port: int, timeout: float, helo: str, cas_loader: Callable[[], tuple],
                      clock: Callable[[], float]) -> ProbeResult:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    addresses = await _addresses(dns, host)
    addresses.sort(key=lambda a: ":" in a)  # IPv4 first, then IPv6 (stable: DNS order)
    reader = writer = None
    for i, addr in enumerate(addresses):
        remaining = deadline - loop.time()
        budget = remaining if i == len(addresses) - 1 else remaining / 2
        state.stage = f"connecting to {addr}"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(addr, port, limit=_LINE_LIMIT), max(budget, 0.001))
        except asyncio.TimeoutError:
            state.errors.append(f"{addr}: connect timed out")
            continue
        except OSError as exc:
            state.errors.append(_clean(f"{addr}: {exc.strerror or type(exc).__name__}", 80))
            continue
        state.address, state.writer = addr, writer
        break
    if reader is None or writer is None:
        raise _Fail(CONNECT_FAILED, _clean(f"port {port}: " + "; ".join(state.errors)))
    try:
        state.stage = "waiting for the greeting"
        code, lines = await _reply(reader, "in the greeting")
        if code != 220:
            raise _Fail(reasons.OUTBOUND_OTHER,
                        _clean(f"greeting {code} {lines[0] if lines else ''}", 120))
        code, lines = await _command(reader, writer, state, f"EHLO {helo}", "EHLO")
        if code != 250:
            raise _Fail(reasons.OUTBOUND_STARTTLS_NOT_OFFERED,
                        _clean(f"EHLO refused ({code}): no ESMTP, so no STARTTLS", 120))
        if not any(ln.strip().upper().split(" ")[0] == "STARTTLS" for ln in lines[1:]):
            raise _Fail(reasons.OUTBOUND_STARTTLS_NOT_OFFERED,
                        "the server did not offer STARTTLS")
        code, lines = await _command(reader, writer, state, "STARTTLS", "STARTTLS")
        if code != 220:
            raise _Fail(reasons.OUTBOUND_STARTTLS_NOT_OFFERED,
                        _clean(f"STARTTLS refused: {code} {lines[0] if lines else ''}", 120))
        state.stage = "in the TLS handshake"
        try:
            await writer.start_tls(_client_context(), server_hostname=None)
        except (ssl.SSLError, OSError, EOFError) as exc:
            raise _Fail(reasons.OUTBOUND_HANDSHAKE_FAILED,
                        _clean(f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}",
                               160)) from None
        sslobj = writer.get_extra_info("ssl_object")
        version = sslobj.version() if sslobj is not None else None
        chain = _presented_chain(sslobj) if sslobj is not None else []
        now = clock()
        facts = _cert_facts(chain) if chain else None
        cas, ca_error = cas_loader()
        ok, reason, detail = evaluate_certificate(
            partner, version, chain, cas, dt.datetime.fromtimestamp(now, dt.timezone.utc),
            ca_error)
        state.result = _result(partner, host, state.address, ok, reason, detail, now,
                               tls_version=version, facts=facts)
        state.stage = "waiting for the reply to QUIT"
        try:  # best effort, briefly: the verdict is in
            writer.write(b"QUIT\r\n")
            await asyncio.wait_for(_quit(reader, writer), min(1.0, max(deadline - loop.time(),
                                                                       0.001)))
        except (asyncio.TimeoutError, OSError, ssl.SSLError, _Fail):
            pass
        return state.result
    finally:
        writer.transport.abort()
        state.writer = None


async def _quit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await writer.drain()
    await _reply(reader, "after QUIT")


def _result(partner: PartnerTerms, host: str, address: str, ok: bool, reason: str | None,
            detail: str, now: float, *, tls_version: str | None = None,
            facts: _Cert | None = None) -> ProbeResult:
    kw = {}
    if facts is not None:
        kw = dict(cert_sha256=facts.cert_sha256, pubkey_sha256=facts.pubkey_sha256,
                  subject=facts.subject, issuer=facts.issuer, names=facts.names,
                  not_after=facts.not_after, chain_sha256=facts.chain_sha256)
    return ProbeResult(partner=partner.entry, mx_host=host, address=address, ok=ok,
                       reason=None if ok else reason, detail=_clean(detail),
                       tls_version=tls_version, probed_at=now, **kw)  # type: ignore[arg-type]


async def _host_bounded(partner: PartnerTerms, host: str, *, timeout: float,
                        clock: Callable[[], float], **kw) -> ProbeResult:
    state = _State()
    try:
        return await asyncio.wait_for(
            _probe_host(partner, host, state, timeout=timeout, clock=clock, **kw), timeout)
    except asyncio.TimeoutError:
        if state.result is not None:
            return state.result
        if state.writer is not None:
            state.writer.transport.abort()
        return _result(partner, host, state.address, False, TIMEOUT,
                       f"no progress within {timeout:g} s {state.stage}", clock())
    except _Fail as f:
        return _result(partner, host, state.address, False, f.reason, f.detail, clock())
    except (DnsTempError, OSError, EOFError, ssl.SSLError) as exc:
        return _result(partner, host, state.address, False, reasons.OUTBOUND_OTHER,
                       _clean(f"{state.stage}: {type(exc).__name__}: {exc}", 160), clock())
    except Exception as exc:  # never raise: a probe bug must not stop a watch round
        return _result(partner, host, state.address, False, reasons.OUTBOUND_OTHER,
                       _clean(f"probe error {state.stage}: {type(exc).__name__}", 160), clock())


# ---------------------------------------------------------------------------------------- MX


def _mx_hosts(records: Sequence[str]) -> tuple[list[str], bool]:
    """(hosts by preference, null MX?) from MX records in text form (``"10 mx.example."``)."""
    parsed: list[tuple[int, int, str]] = []
    null = False
    for i, rec in enumerate(records):
        parts = rec.split()
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        if parts[1] == ".":
            null = True
            continue
        host = normalize_dns_name(parts[1])
        if host is not None:
            parsed.append((int(parts[0]), i, host))
    hosts = list(dict.fromkeys(h for _, _, h in sorted(parsed)))
    return hosts, null and not hosts


async def probe_partner(partner: PartnerTerms, *, dns: DnsClient, port: int = 25,
                        timeout: float = 10.0, max_hosts: int = 5, ca_file: str | None = None,
                        helo: str = "localhost",
                        clock: Callable[[], float] = time.time) -> list[ProbeResult]:
    """Probe the partner's MX hosts (see the module docstring); one result per host probed.

    ``[]`` for a dot entry or a null MX.  Never raises except when cancelled.
    """
    if partner.entry.startswith("."):
        return []
    domain = normalize_dns_name(partner.domain)
    if domain is None:
        return [_result(partner, "", "", False, DNS_FAILED,
                        _clean(f"{partner.domain} is not a DNS name"), clock())]
    helo = helo if normalize_dns_name(helo) else "localhost"  # a DNS name only: no CR/LF to send
    try:
        mx = await asyncio.wait_for(dns.query(domain, "MX"), timeout)
    except asyncio.TimeoutError:
        return [_result(partner, "", "", False, DNS_FAILED,
                        f"MX lookup for {domain} timed out after {timeout:g} s", clock())]
    except Exception as exc:
        return [_result(partner, "", "", False, DNS_FAILED,
                        _clean(f"MX lookup for {domain} failed: {exc}"), clock())]
    if mx.nxdomain:
        return [_result(partner, "", "", False, DNS_FAILED, f"{domain}: NXDOMAIN", clock())]
    hosts, null_mx = _mx_hosts(mx.records)
    if null_mx:
        return []
    if not mx.records:
        hosts = [domain]  # implicit MX
    elif not hosts:
        return [_result(partner, "", "", False, DNS_FAILED,
                        f"{domain}: no usable MX record", clock())]
    cas_cache: list[tuple[list[x509.Certificate], str]] = []

    def cas_loader() -> tuple[list[x509.Certificate], str]:
        if not cas_cache:
            cas_cache.append(_load_cas(ca_file))
        return cas_cache[0]

    results = []
    for host in hosts[:max(1, max_hosts)]:
        results.append(await _host_bounded(partner, host, dns=dns, port=port, timeout=timeout,
                                           helo=helo, cas_loader=cas_loader, clock=clock))
    return results
