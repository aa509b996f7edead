"""The HTTP front: an ASGI application that reads each request whole, then runs Flask on a thread.

With gunicorn's threaded worker, each of the ``EMBEDDING_HTTP_THREADS`` request threads read its own
request from the socket, so as many clients trickling their headers, or sending headers and never the
body, held every thread and the service stopped answering. Here the event loop reads each request
completely before a thread is committed to it: its headers within ``EMBEDDING_HEADER_TIMEOUT_S``
(:mod:`app.server`, the gunicorn worker that serves this application), its body within
``EMBEDDING_BODY_TIMEOUT_S`` and ``EMBEDDING_MAX_BODY_BYTES`` (here). A slow or idle client costs a socket,
not a thread. A kept-alive connection is closed after gunicorn's ``keepalive`` seconds without a new request.

Every request body is held in the memory budget (:mod:`app.budget`) from its first byte to its answer: a
body whose length is declared is admitted whole or refused at once, before it is read; a chunked one is
counted as it arrives, and refused the moment it passes the body limit or finds no room. Nothing waits for
room, so many large uploads at once cannot starve each other until their deadline.

The same place answers what it decides itself (408, 413, 429) with the service's JSON error body, logs
and counts each refusal (``on_refusal``), and tells a request when its client disconnects
(:class:`ClientGone`), so the engine drops its queued texts instead of computing them.

Probes and scrapes (:data:`app.routes.PROBE_PATHS`) run on a small pool of their own, so a service
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

from app.budget import MemoryBudget, Reservation, body_estimate
from app.errors import PayloadTooLarge, RequestTimeout, ServiceError, error_for_status
from app.routes import PROBE_PATHS

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

OPS_THREADS = 4
CLIENT_GONE = "embedding.client_gone"
"""The WSGI environ key of the request's :class:`ClientGone`."""
RESERVATION = "embedding.reservation"
"""The WSGI environ key of the request's :class:`app.budget.Reservation`, held until its answer is written."""
BODY = "embedding.body"
"""The WSGI environ key of the whole body as read here: routes parse it without copying it from the stream."""

DISCARD_FACTOR = 4
"""After a refusal, read and drop up to this many times the body limit, so the client can read the answer."""

Refused = Callable[[Scope, int, str, str, bool], None]
"""Told of each refusal the front decides: (scope, status, reason, message, already counted by the budget)."""
Authorize = Callable[[Scope], ServiceError | None]
"""The refusal of a request, from its method, path and headers alone (the API key), or None to let it in."""

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


class WSGIFront:
    """An ASGI application that reads each request whole, then runs a WSGI application on a thread."""

    def __init__(
        self,
        wsgi_app: WSGIApp,
        *,
        threads: int,
        max_body_bytes: int,
        body_timeout_s: float,
        budget: MemoryBudget,
        on_refusal: Refused | None = None,
        on_startup: Callable[[], None] | None = None,
        on_shutdown: Callable[[], None] | None = None,
        authorize: Authorize | None = None,
    ) -> None:
        self.wsgi_app = wsgi_app
        self._authorize = authorize
        self.budget = budget
        self._max_body = max_body_bytes
        self._body_timeout = body_timeout_s
        self.on_refusal = on_refusal
        """Told of every refusal decided before Flask: here, and by the protocol (app/server.py)."""
        self._on_startup = on_startup
        self._on_shutdown = on_shutdown
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
        reservation = self.budget.reservation()  # what this request holds, from its first byte to its answer
        try:
            body = await self._read_body(scope, receive, send, reservation)
            if body is None:
                return
            gone = ClientGone()
            loop = asyncio.get_running_loop()
            pool = self._ops if scope["path"] in PROBE_PATHS else self._requests
            watcher = loop.create_task(_watch_disconnect(receive, gone))
            try:
                environ = wsgi_environ(scope, body, gone)
                environ[RESERVATION] = reservation
                del body  # the environ holds it, until the answer
                status, headers, content = await loop.run_in_executor(pool, self._call, environ)
                del environ
            finally:
                watcher.cancel()
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": content})
        finally:
            reservation.release()

    async def _read_body(self, scope: Scope, receive: Receive, send: Send, reservation: Reservation) -> bytes | None:
        """The whole body, or None after refusing it (401, 408, 413, 429) or when the client left."""
        refusal = self._authorize(scope) if self._authorize is not None else None
        if refusal is not None:  # before a byte of the body is read or held
            await self._refuse(scope, receive, send, refusal, "unauthorized")
            return None
        declared = _content_length(scope)
        if declared is not None and declared > self._max_body:
            await self._refuse(scope, receive, send, PayloadTooLarge(self._too_large()), "body_too_large")
            return None
        if declared and not await self._reserve(scope, receive, send, reservation, declared):
            return None  # admitted whole or refused at once: a declared body is never read only to find no room
        return await self._receive_body(scope, receive, send, reservation, counted=declared is None)

    async def _receive_body(
        self, scope: Scope, receive: Receive, send: Send, reservation: Reservation, *, counted: bool
    ) -> bytes | None:
        """Read the body's chunks until its end; a ``counted`` one (chunked: its length unknown until then) is
        held in the budget as it grows."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._body_timeout
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                late = RequestTimeout(f"the request body did not arrive within {self._body_timeout:g} s")
                await self._refuse(scope, None, send, late, "body_timeout")
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                await self._refuse(scope, receive, send, PayloadTooLarge(self._too_large()), "body_too_large")
                return None
            if counted and not await self._reserve(scope, receive, send, reservation, size):
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _reserve(self, scope: Scope, receive: Receive, send: Send, reservation: Reservation, length: int) -> bool:
        """Hold a body of ``length`` bytes in the budget; False after refusing the request (429, or 413 when it
        could never fit)."""
        try:
            reservation.resize(body_estimate(length))
        except ServiceError as refusal:
            await self._refuse(scope, receive, send, refusal, "budget", counted=True)
            return False
        return True

    def _too_large(self) -> str:
        return f"request body is larger than the limit of {self._max_body} bytes (EMBEDDING_MAX_BODY_BYTES)"

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive | None,
        send: Send,
        error: ServiceError,
        reason: str,
        *,
        counted: bool = False,
    ) -> None:
        """Answer ``error`` and close; read and drop what the client still sends (unless ``receive`` is None),
        so it can read the answer; tell ``on_refusal``."""
        path = scope["path"]
        body = json.dumps(error.body_for(path)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *((name.lower().encode(), value.encode()) for name, value in error.headers().items()),
        ]
        status = error.status_for(path)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        if self.on_refusal is not None:
            self.on_refusal(scope, status, reason, error.message, counted)
        if receive is not None:
            await self._discard(receive)

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
                # Completes within milliseconds, however long the model takes to load (the server waits at most
                # 30 s for it): the service starts its threads and returns. A worker that must not accept before
                # the model is ready holds its listeners instead (app.server.AcceptOnceReady).
                if self._on_startup is not None:
                    # On the loop's own thread, before any other exists (it starts threads, within milliseconds):
                    # the glibc arena cap must come first.
                    self._on_startup()
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
        BODY: body,
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
