"""The HTTP front: an ASGI application that reads each request whole, then runs Flask on a thread.

With gunicorn's threaded worker, each of the ``EMBEDDING_HTTP_THREADS`` request threads read its own
request from the socket, so as many clients trickling their headers, or sending headers and never the
body, held every thread and the service stopped answering. Here the event loop reads each request
completely before a thread is committed to it: its headers within ``EMBEDDING_HEADER_TIMEOUT_S``
(:mod:`app.server`, the gunicorn worker that serves this application), its body within
``EMBEDDING_BODY_TIMEOUT_S`` and ``EMBEDDING_MAX_BODY_BYTES`` (here). A slow or idle client costs a socket,
not a thread; bodies held in memory at once are bounded too (``BUFFER_FACTOR``). A kept-alive connection
is closed after gunicorn's ``keepalive`` seconds without a new request.

The same place answers what it decides itself (408, 413, 503) with the service's JSON error body, and
tells a request when its client disconnects (:class:`ClientGone`), so the engine drops its queued texts
instead of computing them.

Probes and scrapes (``/health``, ``/ready``, ``/metrics``) run on a small pool of their own, so a service
whose request threads all wait for the model still answers its liveness check.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from app.errors import error_for_status

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

OPS_PATHS = frozenset({"/health", "/ready", "/metrics"})
"""Answered on their own threads: probes and scrapes never wait behind embedding requests."""

OPS_THREADS = 4
CLIENT_GONE = "embedding.client_gone"
"""The WSGI environ key of the request's :class:`ClientGone`."""

DISCARD_FACTOR = 4
"""After a 413, read and drop up to this many times the body limit, so the client can read the answer."""

BUFFER_FACTOR = 4
"""Request bodies held in memory at once, from their first byte to their answer: at most this many times the
body limit. A body that finds no room waits (its client's sending stalls) until the body deadline, then 503."""

MAX_DETAIL_CHARS = 200
"""Longest quote of client input in an error message."""


def error_body(status: int, message: str, path: str = "") -> bytes:
    """The service's JSON error body for the route at ``path`` (TEI's shape on TEI's routes)."""
    return json.dumps(error_for_status(status, message).body_for(path)).encode()


def clip(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """``text`` up to ``limit`` characters, marked when cut."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class ClientGone:
    """Set from the event loop when a request's client disconnects; runs each callback once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._gone = False

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the client goes (at once if it has gone already)."""
        with self._lock:
            if not self._gone:
                self._callbacks.append(callback)
                return
        callback()

    def is_set(self) -> bool:
        return self._gone

    def set(self) -> None:
        with self._lock:
            self._gone = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class ByteBudget:
    """Bytes of request bodies held at once, across requests; used from the event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed: asyncio.Event | None = None

    async def take(self, size: int) -> None:
        """Wait until ``size`` more bytes fit (a request alone always fits), then hold them."""
        while self.used and self.used + size > self.limit:
            if self._freed is None:
                self._freed = asyncio.Event()
            await self._freed.wait()
        self.used += size

    def give_back(self, size: int) -> None:
        self.used -= size
        if self._freed is not None:
            self._freed.set()  # every waiter checks again
            self._freed = None


class WSGIFront:
    """An ASGI application that reads each request whole, then runs a WSGI application on a thread."""

    def __init__(
        self,
        wsgi_app: WSGIApp,
        *,
        threads: int,
        max_body_bytes: int,
        body_timeout_s: float,
        on_shutdown: Callable[[], None] | None = None,
    ) -> None:
        self.wsgi_app = wsgi_app
        self._max_body = max_body_bytes
        self._body_timeout = body_timeout_s
        self._on_shutdown = on_shutdown
        self._buffered = ByteBudget(BUFFER_FACTOR * max_body_bytes)
        self._requests = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="http")
        self._ops = ThreadPoolExecutor(max_workers=OPS_THREADS, thread_name_prefix="http-ops")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # Anything else (websocket) is not served: returning without accepting refuses it.

    # --- HTTP ---------------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        held = [0]  # bytes of this request's body counted in the budget
        try:
            body = await self._read_body(scope, receive, send, held)
            if body is None:
                return
            gone = ClientGone()
            loop = asyncio.get_running_loop()
            pool = self._ops if scope["path"] in OPS_PATHS else self._requests
            watcher = loop.create_task(_watch_disconnect(receive, gone))
            try:
                environ = wsgi_environ(scope, body, gone)
                status, headers, content = await loop.run_in_executor(pool, self._call, environ)
            finally:
                watcher.cancel()
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": content})
        finally:
            self._buffered.give_back(held[0])

    async def _read_body(self, scope: Scope, receive: Receive, send: Send, held: list[int]) -> bytes | None:
        """The whole body, or None after answering 408, 413 or 503 (or when the client left)."""
        declared = _content_length(scope)
        if declared is not None and declared > self._max_body:
            await self._refuse(scope, send, 413, self._too_large())
            await self._discard(receive)
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._body_timeout
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                await self._refuse(scope, send, 408, f"the request body did not arrive within {self._body_timeout:g} s")
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                await self._refuse(scope, send, 413, self._too_large())
                await self._discard(receive)
                return None
            try:
                await asyncio.wait_for(self._buffered.take(len(chunk)), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                await self._refuse(
                    scope,
                    send,
                    503,
                    "the service holds as many request bodies as it may; retry shortly",
                    retry_after_s=5,
                )
                return None
            held[0] += len(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> str:
        return f"request body is larger than the limit of {self._max_body} bytes (EMBEDDING_MAX_BODY_BYTES)"

    async def _refuse(
        self, scope: Scope, send: Send, status: int, message: str, retry_after_s: int | None = None
    ) -> None:
        body = error_body(status, message, scope["path"])
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        if retry_after_s is not None:
            headers.append((b"retry-after", str(retry_after_s).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _discard(self, receive: Receive) -> None:
        """Read and drop what the client still sends, up to a bound, so it can read the answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._body_timeout
        left = DISCARD_FACTOR * self._max_body
        while left > 0:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                return
            if message["type"] != "http.request":
                return
            left -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    def _call(self, environ: dict[str, Any]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Run the WSGI application on this thread and collect its whole response."""
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[..., Any]:
            started[:] = [status, headers]
            return _no_write

        result = self.wsgi_app(environ, start_response)
        try:
            content = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = started
        encoded = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        return int(status.split(" ", 1)[0]), encoded, content

    # --- lifespan -----------------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # After gunicorn has let the connections finish: stop the engine (it drains its queue).
                if self._on_shutdown is not None:
                    await asyncio.get_running_loop().run_in_executor(None, self._on_shutdown)
                self._requests.shutdown(wait=False)
                self._ops.shutdown(wait=False)
                await send({"type": "lifespan.shutdown.complete"})
                return


def _no_write(data: bytes) -> None:
    raise NotImplementedError("the service's routes return their bodies; the WSGI write() callable is not served")


async def _watch_disconnect(receive: Receive, gone: ClientGone) -> None:
    """Once the body is read, ``receive()`` returns only when the client disconnects."""
    message = await receive()
    if message["type"] == "http.disconnect":
        gone.set()


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP parser has refused a malformed one already
    return None


def wsgi_environ(scope: Scope, body: bytes, gone: ClientGone) -> dict[str, Any]:
    """A PEP 3333 environ for an ASGI HTTP scope whose body has been read."""
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client") or ("", 0)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode("utf-8").decode("latin-1"),
        "PATH_INFO": scope["path"].encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope['http_version']}",
        "REMOTE_ADDR": str(client[0]),
        "REMOTE_PORT": str(client[1]),
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        CLIENT_GONE: gone,
    }
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        if name in ("content-length", "transfer-encoding"):
            continue  # the body is whole now: its length is CONTENT_LENGTH
        key = "CONTENT_TYPE" if name == "content-type" else "HTTP_" + name.upper().replace("-", "_")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ
