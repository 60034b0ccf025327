"""Postfix socketmap server for ``smtp_tls_policy_maps = socketmap:inet:HOST:PORT:tlspolicy``.

Protocol (socketmap_table(5)): each request is one netstring ``<len>:<name> <key>,``; each reply
one netstring ``OK <data>`` / ``NOTFOUND `` / ``TEMP <reason>`` / ``PERM <reason>``.  Postfix
keeps connections open and sends many requests on one; replies are at most 100000 bytes.

Robustness rules:
* A framing error (non-digit length, length over ``max_request``, missing ``,``) gets
  ``PERM <reason>`` and the connection is closed — the stream cannot be re-synchronised.
* A well-framed but bad request (not ``name key``, unknown map name, undecodable key) gets
  ``PERM`` and the connection stays open.
* A resolver exception becomes ``TEMP internal error`` (no exception text reaches the peer).
* Idle connections are closed after ``idle_timeout``; at most ``max_connections`` at once
  (extra connections are closed immediately).

The server runs in its own asyncio loop; :meth:`SocketmapServer.start_in_thread` runs that loop
in a daemon thread (the milter owns the main thread).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Protocol

from milterd.outbound.tlspolicy import PolicyAnswer

__all__ = ["SocketmapServer", "ServerHandle", "encode_netstring", "MAX_REPLY"]

log = logging.getLogger(__name__)

MAX_REPLY = 100000


class _Resolver(Protocol):
    async def resolve(self, key: str) -> PolicyAnswer: ...


class _FramingError(Exception):
    pass


def encode_netstring(payload: str) -> bytes:
    data = payload.encode("utf-8")
    return str(len(data)).encode("ascii") + b":" + data + b","


class SocketmapServer:
    """Asyncio socketmap server.

    :param resolver: a :class:`milterd.outbound.tlspolicy.PolicyResolver` (anything with
        ``async resolve(key) -> PolicyAnswer``).
    :param host, port: listen address (``port=0``: ephemeral; the bound port is ``.port``).
    :param map_name: the name field Postfix sends (the last part of ``socketmap:inet:h:p:NAME``).
    :param max_request: largest accepted request payload in bytes.
    :param idle_timeout: close a connection idle this long (Postfix itself closes after 10 s).
    :param request_timeout: time limit for reading one request body and for answering it.
    :param max_connections: concurrent connection limit.

    :param tlsrpt: append the Postfix >= 3.10 TLSRPT attributes to MTA-STS answers
        (:meth:`~milterd.outbound.tlspolicy.PolicyAnswer.socketmap_reply`; ``[socketmap] tlsrpt``).
    :param on_answer: called with ``(key, answer)`` for every answer the resolver gave, just
        before it is sent (the served-policy record the maillog follower reads); exceptions
        are logged and do not change the reply.

    ``server.resolver`` and ``server.tlsrpt`` may be replaced at any time (config reload);
    requests already being answered finish with the old resolver.
    """

    def __init__(self, resolver: _Resolver, host: str = "127.0.0.1", port: int = 0,
                 map_name: str = "tlspolicy", *, max_request: int = 2048,
                 idle_timeout: float = 300.0, request_timeout: float = 60.0,
                 max_connections: int = 256, tlsrpt: bool = False,
                 on_answer: Callable[[str, PolicyAnswer], None] | None = None) -> None:
        self.resolver = resolver
        self.tlsrpt = tlsrpt
        self.on_answer = on_answer
        self.host = host
        self._port = port
        self.map_name = map_name
        self.max_request = max_request
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self._port, limit=max(64, len(str(self.max_request)) + 2))
        self._port = self._server.sockets[0].getsockname()[1]
        where = f"[{self.host}]" if ":" in self.host else self.host
        log.info("socketmap listening on %s:%d (map %s)", where, self._port, self.map_name)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= self.max_connections:
            log.warning("socketmap: connection limit %d reached, closing new connection",
                        self.max_connections)
            writer.close()
            return
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            raise
        except (ConnectionError, OSError):
            pass
        except Exception:
            log.exception("socketmap: connection handler failed")
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                payload = await self._read_netstring(reader)
            except _FramingError as exc:
                await self._reply(writer, f"PERM {exc}")
                return
            except (asyncio.TimeoutError, asyncio.IncompleteReadError):
                return
            if payload is None:
                return
            reply = await self._answer(payload)
            await self._reply(writer, reply)

    async def _read_netstring(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b":"), self.idle_timeout)
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise _FramingError("malformed netstring") from None
            return None  # clean EOF between requests
        except asyncio.LimitOverrunError:
            raise _FramingError("malformed netstring") from None
        digits = head[:-1]
        if not digits.isdigit():
            raise _FramingError("malformed netstring")
        length = int(digits)
        if length > self.max_request:
            raise _FramingError("request too large")
        data = await asyncio.wait_for(reader.readexactly(length + 1), self.request_timeout)
        if data[-1:] != b",":
            raise _FramingError("malformed netstring")
        return data[:-1]

    async def _answer(self, payload: bytes) -> str:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            return "PERM invalid request encoding"
        name, sep, key = text.partition(" ")
        if not sep or not key:
            return "PERM invalid request"
        if name != self.map_name:
            return "PERM unknown map name"
        try:
            answer = await asyncio.wait_for(self.resolver.resolve(key), self.request_timeout)
        except asyncio.TimeoutError:
            return "TEMP lookup timeout"
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("socketmap: resolving %r failed", key[:255])
            return "TEMP internal error"
        if self.on_answer is not None:
            try:
                self.on_answer(key, answer)
            except Exception:
                log.exception("socketmap: recording the answer for %r failed", key[:255])
        reply = answer.socketmap_reply(tlsrpt=self.tlsrpt)
        if len(reply.encode("utf-8")) > MAX_REPLY:
            log.error("socketmap: reply for %r over %d bytes", key[:255], MAX_REPLY)
            return "TEMP reply too large"
        return reply

    async def _reply(self, writer: asyncio.StreamWriter, reply: str) -> None:
        writer.write(encode_netstring(reply))
        await writer.drain()

    # -- thread convenience ------------------------------------------------------------------
    def start_in_thread(self, timeout: float = 10.0) -> "ServerHandle":
        """Run the server's loop in a daemon thread; returns once it listens (or raises)."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # report bind errors to the caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.stop())
                leftover = asyncio.all_tasks(loop)  # e.g. shared resolutions still running
                for t in leftover:
                    t.cancel()
                if leftover:
                    loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name="milterd-socketmap", daemon=True)
        thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("socketmap server did not start in time")
        if failure:
            thread.join(timeout)
            raise failure[0]
        return ServerHandle(self, loop, thread)


@dataclass
class ServerHandle:
    """A server running in a background thread."""

    server: SocketmapServer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self, timeout: float = 10.0) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)
