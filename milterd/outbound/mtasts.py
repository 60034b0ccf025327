"""MTA-STS (RFC 8461) for the outbound TLS policy: TXT discovery, HTTPS policy fetch, parse, cache.

What this module does and does not do
-------------------------------------
* ``_mta-sts.<domain>`` TXT: records not starting with ``v=STSv1`` are discarded; if not exactly
  one remains, or it is malformed (``id`` must be 1..32 letters/digits), the domain has *no*
  available policy (RFC 8461 §3.1).
* Policy fetch: ``GET https://mta-sts.<domain>/.well-known/mta-sts.txt`` over HTTPS with
  certificate verification against ``ca_file`` (or the system store), SNI and name check on
  ``mta-sts.<domain>``, TLS >= 1.2, **no redirects** (any 3xx is a fetch error, §3.3), a size
  limit (64 KiB by default) and one overall time limit.  Only ``200`` with media type
  ``text/plain`` is accepted.  ``address_override`` maps a host name to a ``(host, port)`` to
  connect to instead (tests; split-horizon set-ups) — the TLS name check still uses the real
  ``mta-sts.<domain>`` name.
* Parse: ``version: STSv1``, ``mode`` (enforce | testing | none), ``max_age`` (0..31557600, larger
  values are clamped), ``mx`` (one or more; required unless mode is none).  Unknown keys are
  ignored; the first occurrence of a single-valued key wins.
* Cache (§5.1): a policy is cached by domain with its ``id`` until ``fetched + max_age``.  A
  cached, unexpired policy is used when the TXT lookup fails, when the TXT record has
  disappeared or is invalid, and when a re-fetch fails; it is re-fetched only when the TXT
  ``id`` changes.  The cache is a bounded LRU (``cache_size`` entries; every entry is bounded by
  the 64 KiB policy limit and at most ``_MAX_MX`` patterns).
* Shared cache (a fleet's store, :class:`SharedStsCache`, optional): on a local miss the client
  reads the store's ``mta-sts`` cache (key: the domain; value: JSON of the policy id, the policy
  text as fetched, its fields, who fetched it and when; expiry ``fetched + max_age``), and after
  a successful fetch it writes it there.  So a policy fetched by one host is served by every
  host — by one that restarted or just joined too, while its own DNS or HTTPS fails (§5.1: a
  cached unexpired policy survives TXT and fetch failures; §10.2).  Store calls run on a worker
  thread of their own, never on the event loop; a read waits at most ``read_timeout`` (0.5 s)
  and a store that fails or is slow is a miss, never an error — and is then left alone for
  ``retry_after`` seconds, so lookups do not pay the timeout one after another.  Writes are
  fire-and-forget.  What comes from the store is parsed again like a fetched policy.

Errors are reported with their RFC 8460 result types so TLS-RPT can use them directly:
``sts-policy-fetch-error``, ``sts-policy-invalid``, ``sts-webpki-invalid``.

Known gap: Postfix's ``match=.example.net`` (what ``*.example.net`` is translated to) matches
sub-domains at any depth, while an MTA-STS wildcard matches exactly one label.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
import re
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence

from milterd.core.cache import TtlLruCache
from milterd.policy.names import name_matches, normalize_dns_name

__all__ = [
    "StsPolicy",
    "StsLookup",
    "StsError",
    "TxtResolver",
    "MtaStsClient",
    "SharedStsCache",
    "parse_sts_txt",
    "parse_sts_policy",
    "MAX_POLICY_SIZE",
]

log = logging.getLogger(__name__)

MAX_POLICY_SIZE = 64 * 1024
MAX_AGE_LIMIT = 31557600
_MAX_MX = 64
_MAX_HEADER_BYTES = 16 * 1024
_ID_RE = re.compile(r"[A-Za-z0-9]{1,32}\Z")
_FIELD_RE = re.compile(r"([A-Za-z0-9_]+)[ \t]*:[ \t]*(.*?)[ \t]*\Z")
_MX_PATTERN_RE = re.compile(r"(\*\.)?[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\.?\Z")

StsMode = Literal["enforce", "testing", "none"]
StsErrorType = Literal["sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid"]


class StsError(Exception):
    """A policy could not be fetched or parsed; ``result_type`` is the RFC 8460 result type."""

    def __init__(self, result_type: StsErrorType, detail: str):
        super().__init__(detail)
        self.result_type: StsErrorType = result_type
        self.detail = detail


@dataclass(frozen=True)
class StsPolicy:
    """A parsed MTA-STS policy (RFC 8461 §3.2)."""

    mode: StsMode
    mx: tuple[str, ...]
    max_age: int

    def matches_mx(self, host: str) -> bool:
        """RFC 8461 §4.1: exact name, or ``*.base`` matching exactly one left-most label."""
        return any(name_matches(pattern, host) for pattern in self.mx)

    def postfix_match(self) -> str:
        """The mx patterns in Postfix ``match=`` form (``*.example.net`` -> ``.example.net``)."""
        out: list[str] = []
        for pattern in self.mx:
            p = pattern[1:] if pattern.startswith("*.") else pattern
            if p not in out:
                out.append(p)
        return ":".join(out)

    def policy_strings(self) -> list[str]:
        """The policy as RFC 8460 ``policy-string`` lines (one per field, canonical order)."""
        lines = ["version: STSv1", f"mode: {self.mode}"]
        lines += [f"mx: {m}" for m in self.mx]
        lines.append(f"max_age: {self.max_age}")
        return lines


@dataclass(frozen=True)
class StsLookup:
    """Outcome of an MTA-STS lookup for one domain.

    ``status``: ``fetched`` (new policy), ``cached`` (cached policy used), ``none`` (no policy
    published), ``dns-error`` (TXT lookup failed, nothing cached), ``error`` (a policy is
    advertised but could not be fetched/parsed, nothing cached; ``error`` holds the RFC 8460
    result type).  ``policy`` is set for fetched/cached.
    """

    domain: str
    status: Literal["fetched", "cached", "none", "dns-error", "error"]
    policy: StsPolicy | None = None
    policy_id: str | None = None
    error: StsErrorType | None = None
    detail: str | None = None


class TxtResolver(Protocol):
    """What the client needs from DNS (:class:`milterd.outbound.dns.DnsClient` provides it)."""

    async def txt(self, name: str) -> list[str] | None:
        """TXT strings at ``name`` (each record's strings joined), ``[]`` for NODATA, ``None``
        for NXDOMAIN; raises an exception on a temporary failure (timeout, SERVFAIL)."""
        ...


def parse_sts_txt(records: Sequence[str]) -> str | None:
    """The policy ``id`` from the ``_mta-sts`` TXT records, or None if no valid policy record."""
    candidates = [r for r in records if r.startswith("v=STSv1")]
    if len(candidates) != 1:
        return None
    fields: dict[str, str] = {}
    for part in candidates[0].split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            return None
        fields.setdefault(key.strip(), value.strip())
    if fields.get("v") != "STSv1":
        return None
    pid = fields.get("id", "")
    return pid if _ID_RE.match(pid) else None


def parse_sts_policy(text: str) -> StsPolicy:
    """Parse a policy body; raises :class:`StsError` (``sts-policy-invalid``) when invalid."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for raw in re.split(r"\r?\n", text):
        if not raw.strip():
            continue
        m = _FIELD_RE.match(raw)
        if not m:
            raise StsError("sts-policy-invalid", "malformed policy line")
        key, value = m.group(1), m.group(2)
        if key == "mx":
            if not _MX_PATTERN_RE.match(value):
                raise StsError("sts-policy-invalid", "invalid mx pattern")
            pattern = value.lower().rstrip(".")
            base = pattern[2:] if pattern.startswith("*.") else pattern
            if normalize_dns_name(base) is None:
                raise StsError("sts-policy-invalid", "invalid mx pattern")
            if pattern not in mx:
                mx.append(pattern)
            if len(mx) > _MAX_MX:
                raise StsError("sts-policy-invalid", "too many mx patterns")
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise StsError("sts-policy-invalid", "version is not STSv1")
    mode = fields.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise StsError("sts-policy-invalid", "invalid or missing mode")
    age = fields.get("max_age", "")
    if not re.fullmatch(r"[0-9]{1,10}", age):
        raise StsError("sts-policy-invalid", "invalid or missing max_age")
    if mode != "none" and not mx:
        raise StsError("sts-policy-invalid", "no mx patterns")
    return StsPolicy(mode=mode, mx=tuple(mx), max_age=min(int(age), MAX_AGE_LIMIT))  # type: ignore[arg-type]


class SharedStsCache:
    """The fleet's MTA-STS cache in the store (``ns = "mta-sts"``, see the module docstring).

    :param store_getter: returns the store (``cache_get``/``cache_put``) or None (no store now).
    :param host: this host's name, written with each entry.
    :param read_timeout: how long a lookup waits for a read.
    :param retry_after: after a failed or slow call, the store is not asked for this long.
    :param max_pending: store calls queued at most (more: a miss / a skipped write).
    """

    NS = "mta-sts"

    def __init__(self, store_getter: Callable[[], Any], host: str, *, read_timeout: float = 0.5,
                 retry_after: float = 30.0, max_pending: int = 64,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._getter = store_getter
        self.host = host
        self.read_timeout = read_timeout
        self.retry_after = retry_after
        self._monotonic = monotonic
        self._q: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future]] = \
            queue.Queue(max(1, max_pending))
        self._down_until = 0.0
        self._down = False
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.reads = self.hits = self.writes = self.failures = 0

    # -- the worker thread -------------------------------------------------------------------
    def _submit(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future | None:
        if self._monotonic() < self._down_until:
            return None
        store = self._getter()
        if store is None:
            return None
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._q.put_nowait((lambda: fn(store), fut))
        except queue.Full:
            return None
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="milterd-sts-store",
                                                daemon=True)
                self._worker.start()
        return fut

    def _work(self) -> None:
        while True:
            fn, fut = self._q.get()
            if not fut.set_running_or_notify_cancel():
                continue                         # the lookup stopped waiting before it ran
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                self._failed(exc)
                fut.set_exception(exc)
            else:
                self._succeeded()
                fut.set_result(result)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self._down_until = self._monotonic() + self.retry_after
        if not self._down:
            self._down = True
            log.warning("shared MTA-STS cache unavailable (%s): local cache and fetches only, "
                        "asked again in %g s", exc if str(exc) else type(exc).__name__,
                        self.retry_after)

    def _succeeded(self) -> None:
        if self._down:
            self._down = False
            log.info("shared MTA-STS cache available again")

    # -- the client's calls ------------------------------------------------------------------
    async def get(self, domain: str, now: float) -> tuple[str, "StsPolicy", float, str] | None:
        """``(policy id, policy, expires_at, host)`` of the shared entry, or None (absent,
        expired, malformed, or the store failed or was slower than ``read_timeout``)."""
        fut = self._submit(lambda store: store.cache_get(self.NS, domain, now))
        if fut is None:
            return None
        self.reads += 1
        try:
            entry = await asyncio.wait_for(asyncio.wrap_future(fut), self.read_timeout)
        except asyncio.TimeoutError:
            self._failed(TimeoutError(f"no answer within {self.read_timeout:g} s"))
            return None
        except Exception:  # noqa: BLE001 - logged once by _failed
            return None
        if entry is None:
            return None
        try:
            value = json.loads(entry.value)
            policy_id = value["id"]
            if not isinstance(policy_id, str) or not _ID_RE.match(policy_id):
                raise ValueError("bad id")
            policy = parse_sts_policy(value["policy"])
        except (ValueError, KeyError, TypeError, StsError) as exc:
            log.warning("shared MTA-STS cache: entry for %s unusable (%s): ignored", domain, exc)
            return None
        self.hits += 1
        return policy_id, policy, float(entry.expires_at), str(entry.host)

    def put(self, domain: str, policy_id: str, text: str, policy: "StsPolicy", now: float) -> None:
        """Share a policy just fetched (fire and forget; skipped while the store fails)."""
        if policy.max_age <= 0:
            return
        value = json.dumps({"v": 1, "id": policy_id, "policy": text, "mode": policy.mode,
                            "mx": list(policy.mx), "max_age": policy.max_age, "fetched": now,
                            "host": self.host}, separators=(",", ":"), sort_keys=True)
        if self._submit(lambda store: store.cache_put(self.NS, domain, value,
                                                      now + policy.max_age, self.host, now)):
            self.writes += 1


class MtaStsClient:
    """Discovers, fetches and caches MTA-STS policies.

    :param dns: anything with ``async txt(name)`` (see :class:`TxtResolver`).
    :param ca_file: PEM bundle to verify policy hosts against (default: system store).
    :param address_override: ``{"mta-sts.example.com": ("127.0.0.1", 8443)}`` — connect there
        instead of resolving the name; TLS still verifies ``mta-sts.example.com``.
    :param fetch_timeout: overall time limit of one fetch (connect + TLS + response), seconds.
    :param max_policy_size: body size limit in bytes (RFC 8461 §3.3 suggests 64 KiB).
    :param cache_size: maximum number of cached policies (LRU).
    :param clock: ``time.time``-like, for tests.
    :param shared_cache: a :class:`SharedStsCache` (the fleet's store), or None.
    """

    def __init__(
        self,
        dns: TxtResolver,
        *,
        ca_file: str | None = None,
        address_override: Mapping[str, tuple[str, int]] | None = None,
        fetch_timeout: float = 10.0,
        max_policy_size: int = MAX_POLICY_SIZE,
        cache_size: int = 10000,
        clock: Callable[[], float] = time.time,
        shared_cache: SharedStsCache | None = None,
    ) -> None:
        self._dns = dns
        self._clock = clock
        self._shared = shared_cache
        self._warming: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._ca_file = ca_file
        self._override = dict(address_override or {})
        self._timeout = fetch_timeout
        self._max_size = max_policy_size
        # domain -> (policy id, policy), each until fetched + max_age (wall clock)
        self._cache: TtlLruCache[str, tuple[str, StsPolicy]] = TtlLruCache(cache_size, clock=clock)
        self._ssl: ssl.SSLContext | None = None

    # -- cache -------------------------------------------------------------------------------
    def cached(self, domain: str) -> StsLookup | None:
        """The cached, unexpired policy for ``domain`` (no I/O), or None.  With a shared cache,
        a miss asks the store in the background (when called on an event loop), so the next
        call finds what another host fetched."""
        entry = self._cache.get(domain)
        if entry is None:
            if self._shared is not None and domain not in self._warming:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    return None
                self._warming.add(domain)
                task = loop.create_task(self._from_shared(domain))
                self._tasks.add(task)
                task.add_done_callback(lambda t, d=domain: (self._tasks.discard(t),
                                                            self._warming.discard(d)))
            return None
        policy_id, policy = entry
        return StsLookup(domain, "cached", policy, policy_id)

    async def cached_shared(self, domain: str) -> StsLookup | None:
        """The cached policy for ``domain``: the local cache, else the shared one."""
        return self._local(domain) or await self._from_shared(domain)

    async def _from_shared(self, domain: str, *, want_id: str | None = None) -> StsLookup | None:
        """The shared entry (installed in the local cache), if any — and if it has the policy
        id ``want_id`` when one is given."""
        if self._shared is None:
            return None
        got = await self._shared.get(domain, self._clock())
        if got is None:
            return None
        policy_id, policy, expires_at, host = got
        ttl = expires_at - self._clock()
        if ttl <= 0 or (want_id is not None and policy_id != want_id):
            return None
        self._cache.put(domain, (policy_id, policy), ttl=ttl)
        return StsLookup(domain, "cached", policy, policy_id, detail=f"shared cache ({host})")

    def _local(self, domain: str) -> StsLookup | None:
        entry = self._cache.get(domain)
        return None if entry is None else StsLookup(domain, "cached", entry[1], entry[0])

    def _store(self, domain: str, policy_id: str, policy: StsPolicy) -> None:
        self._cache.put(domain, (policy_id, policy), ttl=policy.max_age)  # max_age 0: forgotten

    # -- lookup ------------------------------------------------------------------------------
    async def lookup(self, domain: str) -> StsLookup:
        """Policy for ``domain`` (normalised A-label form), following RFC 8461 §5.1 caching."""
        cached = self._local(domain)
        asked_shared = False
        if cached is None and self._shared is not None:
            cached, asked_shared = await self._from_shared(domain), True
        try:
            records = await self._dns.txt(f"_mta-sts.{domain}")
        except Exception as exc:  # DNS temporary failure: a cached policy survives it
            log.info("MTA-STS TXT lookup for %s failed: %s", domain, type(exc).__name__)
            return cached if cached else StsLookup(domain, "dns-error", detail="TXT lookup failed")
        policy_id = parse_sts_txt(records or [])
        if policy_id is None:
            return cached if cached else StsLookup(domain, "none")
        if cached and cached.policy_id == policy_id:
            return cached
        if self._shared is not None and not asked_shared:
            shared = await self._from_shared(domain, want_id=policy_id)  # fetched elsewhere
            if shared is not None:
                return shared
        try:
            body = await asyncio.wait_for(self._fetch(domain), self._timeout)
            policy = parse_sts_policy(body)
        except asyncio.TimeoutError:
            err = StsError("sts-policy-fetch-error", "policy fetch timed out")
            return self._fetch_failed(domain, cached, policy_id, err)
        except StsError as err:
            return self._fetch_failed(domain, cached, policy_id, err)
        self._store(domain, policy_id, policy)
        if self._shared is not None:
            self._shared.put(domain, policy_id, body, policy, self._clock())
        return StsLookup(domain, "fetched", policy, policy_id)

    def _fetch_failed(self, domain: str, cached: StsLookup | None, policy_id: str,
                      err: StsError) -> StsLookup:
        log.warning("MTA-STS policy for %s: %s (%s)", domain, err.detail, err.result_type)
        if cached:
            return cached
        return StsLookup(domain, "error", None, policy_id, err.result_type, err.detail)

    # -- HTTPS -------------------------------------------------------------------------------
    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=self._ca_file)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._ssl = ctx
        return self._ssl

    async def _fetch(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        conn_host, conn_port = self._override.get(host, (host, 443))
        try:
            ctx = self._context()
            reader, writer = await asyncio.open_connection(
                conn_host, conn_port, ssl=ctx, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            raise StsError("sts-webpki-invalid", f"certificate of {host}: {exc.verify_message}") from None
        except (OSError, ssl.SSLError) as exc:
            raise StsError("sts-policy-fetch-error", f"cannot connect to {host}: {type(exc).__name__}") from None
        try:
            request = (f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\n"
                       "User-Agent: milterd\r\nAccept: text/plain\r\nConnection: close\r\n\r\n")
            writer.write(request.encode("ascii"))
            await writer.drain()
            return await self._read_response(reader)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            raise StsError("sts-policy-fetch-error", f"reading from {host}: {type(exc).__name__}") from None
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass

    async def _read_response(self, reader: asyncio.StreamReader) -> str:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await reader.read(4096)
            if not chunk:
                raise StsError("sts-policy-fetch-error", "connection closed in response header")
            head += chunk
            if len(head) > _MAX_HEADER_BYTES + self._max_size:
                raise StsError("sts-policy-fetch-error", "response header too large")
        head, _, rest = head.partition(b"\r\n\r\n")
        if len(head) > _MAX_HEADER_BYTES:
            raise StsError("sts-policy-fetch-error", "response header too large")
        lines = head.decode("latin-1").split("\r\n")
        m = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
        if not m:
            raise StsError("sts-policy-fetch-error", "malformed HTTP status line")
        status = int(m.group(1))
        if 300 <= status < 400:
            raise StsError("sts-policy-fetch-error", f"HTTP {status}: redirects are not followed")
        if status != 200:
            raise StsError("sts-policy-fetch-error", f"HTTP {status}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                headers.setdefault(name.strip().lower(), value.strip())
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "text/plain":
            raise StsError("sts-policy-invalid", f"media type {ctype or 'missing'} is not text/plain")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked(reader, rest)
        else:
            length = headers.get("content-length")
            if length is not None:
                if not re.fullmatch(r"[0-9]{1,12}", length):  # not isdigit(): "²" is a digit
                    raise StsError("sts-policy-fetch-error", "bad Content-Length")
                if int(length) > self._max_size:
                    raise StsError("sts-policy-fetch-error", "policy larger than the size limit")
            body = rest
            while True:
                if len(body) > self._max_size:
                    raise StsError("sts-policy-fetch-error", "policy larger than the size limit")
                if length is not None and len(body) >= int(length):
                    body = body[: int(length)]
                    break
                chunk = await reader.read(4096)
                if not chunk:
                    if length is not None:
                        raise StsError("sts-policy-fetch-error", "truncated response body")
                    break
                body += chunk
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise StsError("sts-policy-invalid", "policy is not UTF-8") from None

    async def _read_chunked(self, reader: asyncio.StreamReader, buf: bytes) -> bytes:
        body = b""

        async def fill(n: int) -> None:
            nonlocal buf
            while len(buf) < n:
                chunk = await reader.read(4096)
                if not chunk:
                    raise StsError("sts-policy-fetch-error", "truncated chunked body")
                buf += chunk

        while True:
            while b"\r\n" not in buf:
                if len(buf) > 64:
                    raise StsError("sts-policy-fetch-error", "malformed chunk header")
                await fill(len(buf) + 1)
            size_line, _, buf = buf.partition(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise StsError("sts-policy-fetch-error", "malformed chunk header") from None
            if size == 0:
                return body
            if len(body) + size > self._max_size:
                raise StsError("sts-policy-fetch-error", "policy larger than the size limit")
            await fill(size + 2)
            body += buf[:size]
            buf = buf[size + 2:]
