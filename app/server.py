"""The gunicorn worker: gunicorn's asyncio worker with a deadline for request headers and JSON errors.

It serves :class:`app.front.WSGIFront` (``app.asgi:app``), which reads each request body in the event
loop. Here, at the protocol: the first request's headers must arrive within ``EMBEDDING_HEADER_TIMEOUT_S``
(later ones on a kept-alive connection within gunicorn's ``keepalive``), else 408 and the connection is
closed; the errors gunicorn's HTTP parser answers itself (400, 414, 431, 501) carry the service's JSON
error body; an HTTP/1.1 request without ``Host`` is a 400 (RFC 9112 section 3.2); a chunk announced larger
than the body limit is a 413 before a byte of it is read; and a client that sends its whole request and
then closes its sending side (``shutdown(SHUT_WR)``) still gets its answer, while one that closed its
socket is told to the request (its texts are dropped).

Kept-alive connections are retired, so that clients spread over replicas that were added after they
connected (a Kubernetes Service balances connections, not requests): the answer after a connection's
``EMBEDDING_CONNECTION_MAX_AGE_S`` (give or take 10%, so that clients do not reconnect in step) or its
``EMBEDDING_CONNECTION_MAX_REQUESTS``-th answer says ``Connection: close``, and the connection closes once it
is written; nothing is cut mid-request. So does every 429 and 503: the client's retry opens a new connection,
which may reach a replica with room.

Everything that reaches into gunicorn's protocol (its parser's state, its private hooks) is in this module;
:mod:`app.internals` lists it and checks, when the worker starts, that the installed gunicorn still has it.
"""

from __future__ import annotations

import asyncio
import functools
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from flask import Flask
from gunicorn.asgi import protocol as gunicorn_protocol
from gunicorn.workers import gasgi
from werkzeug.exceptions import HTTPException

from app import internals
from app.auth import api_key_refusal
from app.components import components
from app.errors import ServiceError
from app.front import Scope, WSGIFront, clip, error_body
from app.logs import configure_logging
from app.routes import label_for
from app.service import Service

log = structlog.get_logger("app.http")

PEER_CHECK_S = (0.05, 0.25)
"""After a client's end of stream: when to look for the reset that a closed socket answers our 100 with, and
how often after that while its request runs."""

_TCP_CLOSE = 7  # tcpi_state of a connection the peer has reset (Linux <netinet/tcp.h>)

AGE_JITTER = 0.1
"""Each connection's age limit is EMBEDDING_CONNECTION_MAX_AGE_S times a factor drawn from 1 +- this."""

RETRY_ELSEWHERE = frozenset({429, 503})
"""Answers that ask the client to retry later: the connection closes after them."""


class Protocol(gunicorn_protocol.ASGIProtocol):  # type: ignore[misc]  # gunicorn is untyped
    """gunicorn's HTTP/1 protocol with a deadline for the first request's headers, JSON errors, ``Host``
    required, chunk sizes checked against the body limit, and half-closed clients answered."""

    _header_deadline: asyncio.TimerHandle | None = None
    _answering = False  # the current request's response has started
    _body_seen = 0  # body bytes of the current request so far
    _peer_check: asyncio.TimerHandle | None = None
    _answers = 0  # requests whose headers arrived on this connection
    _retire_at = float("inf")  # the event loop's time after which the next answer closes the connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        settings = self.worker.settings
        if settings.connection_max_age_s > 0:
            jitter = random.uniform(1 - AGE_JITTER, 1 + AGE_JITTER)  # noqa: S311  (spreading, not security)
            self._retire_at = self.worker.loop.time() + settings.connection_max_age_s * jitter
        # Later requests on a kept-alive connection are bounded by gunicorn's keepalive timer instead.
        self._header_deadline = self.worker.loop.call_later(settings.header_timeout_s, self._headers_too_slow)

    def _retire(self) -> None:
        """Close the connection once the current answer is written: gunicorn's own keep-alive switch, which
        announces ``Connection: close`` and ends the connection loop after the answer."""
        self._keepalive = 0

    def _on_headers_complete(self) -> bool:
        self._cancel_header_deadline()
        self._answering, self._body_seen = False, 0
        self._answers += 1
        most = self.worker.settings.connection_max_requests
        if (most and self._answers >= most) or self.worker.loop.time() >= self._retire_at:
            self._retire()
        parser = self._callback_parser
        if parser.http_version == (1, 1) and not any(name == b"host" for name, _ in parser.headers):
            self._refuse(400, "an HTTP/1.1 request must have a Host header (RFC 9112 section 3.2)")
            return False
        return bool(super()._on_headers_complete())

    def _on_body(self, chunk: bytes) -> None:
        self._body_seen += len(chunk)
        super()._on_body(chunk)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        parser = self._callback_parser
        if self._closed or parser is None or getattr(parser, "_chunk_state", None) != "data":
            return
        announced = self._body_seen + int(getattr(parser, "_chunk_remaining", 0))
        limit = self.worker.settings.max_body_bytes
        if announced > limit:
            self._refuse(
                413,
                f"request body is larger than the limit of {limit} bytes "
                f"(EMBEDDING_MAX_BODY_BYTES): a chunk announced would make it {announced} bytes",
            )

    def _send_response_start(self, status: int, headers: Any, request: Any, close: bool = False) -> Any:
        self._answering = True
        if status in RETRY_ELSEWHERE:  # known only now: gunicorn decided to keep the connection a moment ago
            self._retire()
            close = True
        return super()._send_response_start(status, headers, request, close=close)

    def eof_received(self) -> bool | None:
        """The client ended its stream. With its request whole and unanswered it may only have closed its
        sending side, and wait for the answer: keep the connection, answer, then close. Whether it closed its
        socket altogether shows once it is written to: a 100 (Continue), which HTTP/1.1 clients read past,
        makes a closed socket's kernel answer with a reset (:meth:`_check_peer`)."""
        receiver = self._body_receiver
        waiting = self._current_request is not None and receiver is not None and receiver._complete
        if self._closed or not waiting or self._answering:
            return None  # asyncio closes the connection
        self._keepalive = 0  # no request can follow: close after the answer
        if self._current_request.version == (1, 1):
            self._safe_write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._peer_check = self.worker.loop.call_later(PEER_CHECK_S[0], self._check_peer)
        return True

    def _check_peer(self) -> None:
        """After a 100 was written to a client that ended its stream: a reset means it is gone."""
        self._peer_check = None
        if self._closed or self._answering:
            return
        sock = self.transport.get_extra_info("socket")
        try:
            state = struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]
            gone = state == _TCP_CLOSE or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
        except (OSError, AttributeError):  # not a TCP socket on Linux: no way to tell, so keep answering
            return
        if gone:
            self.transport.abort()  # connection_lost: the request learns its client left
            return
        self._peer_check = self.worker.loop.call_later(PEER_CHECK_S[1], self._check_peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        if self._peer_check is not None:
            self._peer_check.cancel()
            self._peer_check = None
        super().connection_lost(exc)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self._closed or self._current_request is not None:
            return
        self._refuse(408, f"the request headers did not arrive within {self.worker.settings.header_timeout_s:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with the JSON error body (in the shape of the request's route, once it is known)
        and close the connection."""
        request = self._current_request
        where = {"path": request.path, "method": request.method} if request is not None else {}
        self._send_error_response(status, message, **where)
        self._close_transport()
        if self._request_ready is not None:
            self._request_ready.set()  # the connection loop sees the close and ends

    def _send_error_response(
        self,
        status: int,
        message: str,
        extra_headers: Iterable[tuple[str, str]] = (),
        path: str = "",
        method: str = "",
    ) -> None:
        """Every answer the protocol decides (ours and gunicorn's parser's), with the JSON error body; a refusal
        is logged and counted through the front."""
        if status == 501:  # gunicorn's parser says only the coding it does not know
            message = (
                f"transfer coding {message!r} is not supported: send the body with a Content-Length, or with "
                "Transfer-Encoding: chunked"
            )
        if not path:  # gunicorn's parser refused the request: the route its request line named, if it got that far
            target, verb = (getattr(self._callback_parser, name, None) for name in ("path", "method"))
            path = target.decode("latin-1").partition("?")[0] if isinstance(target, bytes) else ""
            method = verb.decode("latin-1") if isinstance(verb, bytes) and not method else method
        reason = PROTOCOL_REFUSALS.get(status)
        refused = getattr(self.app, "on_refusal", None)
        if reason is not None and refused is not None:
            refused({"path": path, "method": method}, status, reason, message, False)
        body = error_body(status, clip(message), path)
        reason = gunicorn_protocol._REASON_PHRASES.get(status, "Error")
        extra = "".join(f"{name}: {value}\r\n" for name, value in extra_headers)
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n"
        )
        self._safe_write(head.encode("latin-1") + body)


HOLD_POLL_S = 0.05
"""How often a worker holding its listeners looks whether the model is ready."""

CreateServer = Callable[..., Awaitable[asyncio.AbstractServer]]


class AcceptOnceReady:
    """Listeners that accept nothing until the model is ready, for a worker on a socket another process may be
    answering: a running version during a handover, or systemd's queue under socket activation (app.handover).
    Connections wait in the kernel's one accept queue meanwhile, answered by whoever accepts.

    The hold is here, on the listeners, and not in the ASGI lifespan's startup: gunicorn waits at most 30 s for
    that, then stops the whole server, and a model can take longer to load on a busy machine. Meanwhile the
    worker's main loop runs and tells the master it is alive, however long the load takes; the start-up deadline
    is the service's own (``EMBEDDING_STARTUP_TIMEOUT_S``, :class:`app.engine.Engine`)."""

    def __init__(self, create_server: CreateServer, state: Callable[[], str], then: Callable[[], None]) -> None:
        self._create = create_server
        self._state = state
        self._then = then
        self._held: list[asyncio.AbstractServer] = []
        self._accepting = False

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.AbstractServer:
        """``loop.create_server``, accepting at once only once the model is ready."""
        server = await self._create(*args, **{**kwargs, "start_serving": self._accepting})
        if not self._accepting:
            self._held.append(server)
        return server

    async def accept_when_ready(self) -> bool:
        """Start every listener once the model is ready, then call ``then``; False when it never is (its load
        failed, and the worker exits; or the worker is stopping)."""
        started = time.monotonic()
        while self._state() in ("created", "loading"):
            await asyncio.sleep(HOLD_POLL_S)
        if self._state() != "ready":
            return False
        self._accepting = True
        for server in self._held:
            await server.start_serving()
        log.info("worker.accepting", listeners=len(self._held), held_s=round(time.monotonic() - started, 3))
        self._held.clear()
        self._then()
        return True


class Worker(gasgi.ASGIWorker):  # type: ignore[misc]  # gunicorn is untyped
    """gunicorn's asyncio worker, serving connections with :class:`Protocol`."""

    _accepted: Callable[[], None] | None = None  # set by accept_once_ready: the worker holds its listeners

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        internals.check()  # before anything relies on them: a clear stop, naming what a gunicorn release changed
        super().__init__(*args, **kwargs)

    def accept_once_ready(self, then: Callable[[], None]) -> None:
        """Hold the listeners until the model is ready (:class:`AcceptOnceReady`), then call ``then``. Called from
        app.gunicorn_conf's ``post_worker_init``, before the worker runs."""
        self._accepted = then

    def load_wsgi(self) -> None:
        super().load_wsgi()
        # The protocol's limits are the served app's settings (read once, when app.asgi was imported).
        self.settings = components(self.asgi.wsgi_app).settings

    def init_process(self) -> None:
        # gunicorn's worker builds each connection's protocol from this module-level name; in this (forked
        # worker) process it is ours.
        gasgi.ASGIProtocol = Protocol
        super().init_process()

    def run(self) -> None:
        # asyncio's create_server listens again on the inherited socket with its own backlog (100), replacing
        # gunicorn's (--backlog, 2048): of 1,000 clients connecting at once, the kernel dropped the handshakes of
        # hundreds, which then waited without an answer. The worker's servers listen with gunicorn's.
        create_server: CreateServer = functools.partial(self.loop.create_server, backlog=self.cfg.backlog)
        if self._accepted is not None:
            engine = components(self.asgi.wsgi_app).engine
            gate = AcceptOnceReady(create_server, lambda: engine.state, self._accepted)
            create_server = gate.create_server
            self._gate = self.loop.create_task(gate.accept_when_ready())  # runs once the loop does
        self.loop.create_server = create_server
        super().run()


PROTOCOL_REFUSALS = {
    400: "bad_request",
    408: "header_timeout",
    413: "body_too_large",
    414: "uri_too_long",
    431: "headers_too_large",
    501: "not_supported",
}
"""The reason of each refusal the protocol answers itself, by status."""

FRONT_REASONS = frozenset({*PROTOCOL_REFUSALS.values(), "body_timeout", "unauthorized"})
"""Refusals the front and the protocol decide; counted in ``embedding_rejected_total`` by :func:`serve`."""


def serve(service: Service) -> WSGIFront:
    """``service``'s app behind the front; the ASGI lifespan starts the service once gunicorn's worker runs (after
    the fork: no thread exists in the master) and stops it after the last connection (``app.asgi:app``, and the
    tests' leaky app)."""
    flask_app, settings, metrics = service.app, service.settings, service.metrics
    for reason in FRONT_REASONS:
        metrics.rejected.labels(reason=reason)  # zeros from the start, for rates and alerts

    def start() -> None:
        configure_logging(settings.log_level)
        service.start()

    def refused(scope: Scope, status: int, reason: str, message: str, counted: bool) -> None:
        """Log and count a request the front or the protocol refused before Flask saw it."""
        route = _route(flask_app, scope.get("path", ""), scope.get("method", ""))
        metrics.requests.labels(route=route, code=str(status)).inc()
        if not counted:
            metrics.rejected.labels(reason=reason).inc()
        log.info("request.rejected", route=route, status=status, reason=reason, error=clip(message))

    def authorize(scope: Scope) -> ServiceError | None:
        """The API key, checked from the headers before the body is read."""
        if settings.api_key is None:
            return None
        headers = dict(scope.get("headers", ()))
        raw = headers.get(b"authorization")
        return api_key_refusal(settings.api_key, scope["method"], scope["path"], raw.decode("latin-1") if raw else None)

    return WSGIFront(
        flask_app,
        authorize=authorize,
        threads=settings.http_threads,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        budget=service.memory.budget,
        on_refusal=refused,
        on_startup=start,
        on_shutdown=service.stop,
    )


def _route(flask_app: Flask, path: str, method: str) -> str:
    """The route (rule) ``path`` would reach, as request metrics name it; "unmatched" for none."""
    if not path:
        return "unmatched"
    try:
        rule, _ = flask_app.url_map.bind("localhost").match(path, method=method or None, return_rule=True)
    except HTTPException:
        return "unmatched"
    return label_for(method, str(rule.rule))
