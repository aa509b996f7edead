"""The gunicorn worker: gunicorn's asyncio worker with a deadline for request headers and JSON errors.

It serves :class:`app.front.WSGIFront` (``app.asgi:app``), which reads each request body in the event
loop. Here: the first request's headers must arrive within ``EMBEDDING_HEADER_TIMEOUT_S`` (later ones on a
kept-alive connection within gunicorn's ``keepalive``), else 408 and the connection is closed; and the
errors gunicorn's HTTP parser answers itself (400, 414, 431, 501) carry the service's JSON error body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from flask import Flask
from gunicorn.asgi import protocol as gunicorn_protocol
from gunicorn.workers import gasgi

from app.components import components
from app.config import Settings
from app.front import WSGIFront, clip, error_body


class Protocol(gunicorn_protocol.ASGIProtocol):  # type: ignore[misc]  # gunicorn is untyped
    """gunicorn's HTTP/1 protocol with a deadline for the first request's headers and JSON errors."""

    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Later requests on a kept-alive connection are bounded by gunicorn's keepalive timer instead.
        self._header_deadline = self.worker.loop.call_later(self.worker.header_timeout_s, self._headers_too_slow)

    def _on_headers_complete(self) -> bool:
        self._cancel_header_deadline()
        return bool(super()._on_headers_complete())

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self._closed or self._current_request is not None:
            return
        self._send_error_response(408, f"the request headers did not arrive within {self.worker.header_timeout_s:g} s")
        self._close_transport()
        if self._request_ready is not None:
            self._request_ready.set()  # the connection loop sees the close and ends

    def _send_error_response(self, status: int, message: str, extra_headers: Iterable[tuple[str, str]] = ()) -> None:
        body = error_body(status, clip(message))
        reason = gunicorn_protocol._REASON_PHRASES.get(status, "Error")
        extra = "".join(f"{name}: {value}\r\n" for name, value in extra_headers)
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n"
        )
        self._safe_write(head.encode("latin-1") + body)


class Worker(gasgi.ASGIWorker):  # type: ignore[misc]  # gunicorn is untyped
    """gunicorn's asyncio worker, serving connections with :class:`Protocol`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = Settings.from_env().header_timeout_s

    def init_process(self) -> None:
        # gunicorn's worker builds each connection's protocol from this module-level name; in this (forked
        # worker) process it is ours.
        gasgi.ASGIProtocol = Protocol
        super().init_process()


def serve(flask_app: Flask, settings: Settings) -> WSGIFront:
    """``flask_app`` behind the front, stopped in order at shutdown (``app.asgi:app``, and the tests' leaky app)."""

    def stop() -> None:
        """After the last connection: end a heap trace, stop the memory monitor, then let the engine drain
        its queue and stop."""
        parts = components(flask_app)
        if parts.heap_tracer is not None:
            parts.heap_tracer.stop()
        parts.memory.stop()
        parts.engine.stop(timeout_s=max(30.0, settings.request_timeout_s))

    return WSGIFront(
        flask_app,
        threads=settings.http_threads,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        on_shutdown=stop,
    )
