"""The HTTP front as an ASGI application: bodies read whole and bounded, WSGI environ, disconnects, lifespan.

The real server (gunicorn, real sockets) is tested in tests/integration/test_hostile.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterable
from typing import Any

from app.budget import MemoryBudget, body_estimate
from app.front import CLIENT_GONE, RESERVATION, ClientGone, WSGIFront
from app.metrics import Metrics

Message = dict[str, Any]


class Seen:
    """A WSGI app that records what it was called with."""

    def __init__(self, block: threading.Event | None = None) -> None:
        self.environs: list[dict[str, Any]] = []
        self.bodies: list[bytes] = []
        self.block = block

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.environs.append(environ)
        self.bodies.append(environ["wsgi.input"].read())
        if self.block is not None:
            self.block.wait(5)
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Seen", "yes")])
        return [b"done"]


def scope(path: str = "/v1/embeddings", headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "root_path": "",
        "query_string": b"a=1",
        "headers": headers or [(b"content-type", b"application/json")],
        "server": ("127.0.0.1", 5000),
        "client": ("127.0.0.1", 40000),
    }


def client(*chunks: bytes, then_wait: float | None = None, complete: bool = True) -> Any:
    """An ASGI receive() that delivers ``chunks`` (the last one ends the body if ``complete``), then waits
    (for ``then_wait`` s, then a disconnect)."""
    last = len(chunks) - 1
    messages = [
        {"type": "http.request", "body": c, "more_body": n < last or not complete} for n, c in enumerate(chunks)
    ]

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(then_wait if then_wait is not None else 3600)
        return {"type": "http.disconnect"}

    return receive


def run(front: WSGIFront, receive: Any, request_scope: dict[str, Any] | None = None) -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(front(request_scope or scope(), receive, send))
    return sent


def front_for(app: Any, *, capacity: int = 1_000_000, **kwargs: Any) -> WSGIFront:
    budget = MemoryBudget(capacity, Metrics())
    return WSGIFront(app, **{"threads": 2, "max_body_bytes": 1000, "body_timeout_s": 1.0, "budget": budget, **kwargs})


def error_of(sent: list[Message]) -> tuple[int, dict[str, Any], dict[bytes, bytes]]:
    start, body = sent
    return start["status"], json.loads(body["body"])["error"], dict(start["headers"])


def test_a_body_in_chunks_reaches_the_app_whole_with_its_length() -> None:
    app = Seen()
    sent = run(front_for(app), client(b'{"inputs": ', b'["one"]}'), scope(headers=[(b"transfer-encoding", b"chunked")]))
    assert app.bodies == [b'{"inputs": ["one"]}']
    environ = app.environs[0]
    assert environ["CONTENT_LENGTH"] == "19"
    assert "HTTP_TRANSFER_ENCODING" not in environ
    assert (environ["REQUEST_METHOD"], environ["PATH_INFO"], environ["QUERY_STRING"]) == (
        "POST",
        "/v1/embeddings",
        "a=1",
    )
    assert environ["REMOTE_ADDR"] == "127.0.0.1"
    assert sent[0]["status"] == 200
    assert (b"x-seen", b"yes") in sent[0]["headers"]
    assert sent[1]["body"] == b"done"


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    app = Seen()
    received: list[int] = []
    feed = client(b"x" * 600, b"x" * 600, then_wait=0)

    async def counting_receive() -> Message:
        message = await feed()
        received.append(len(message.get("body", b"")))
        return message

    sent = run(front_for(app), counting_receive, scope(headers=[(b"content-length", b"1200")]))
    status, error, headers = error_of(sent)
    assert (status, error["code"], error["type"]) == (413, 413, "invalid_request_error")
    assert "larger than the limit of 1000 bytes" in error["message"]
    assert headers[b"connection"] == b"close"
    assert received[:2] == [600, 600]  # what the client still sent was read and dropped, so it can read the 413
    assert app.environs == []


def test_a_refusal_on_a_text_embeddings_inference_route_has_its_body() -> None:
    feed = client(b"x" * 600, b"x" * 600, then_wait=0)
    start, body = run(front_for(Seen()), feed, scope("/embed", headers=[(b"content-length", b"1200")]))
    answer = json.loads(body["body"])
    assert (start["status"], answer["error_type"]) == (413, "Validation")
    assert "larger than the limit of 1000 bytes" in answer["error"]


def test_a_chunked_body_over_the_limit_is_a_413_not_a_cut_body() -> None:
    app = Seen()
    sent = run(front_for(app), client(b"x" * 600, b"x" * 600, b"x" * 10))
    assert error_of(sent)[0] == 413
    assert app.environs == []


def test_a_body_that_stops_coming_is_a_408() -> None:
    app = Seen()
    sent = run(front_for(app, body_timeout_s=0.2), client(b'{"inputs": ', then_wait=10, complete=False))
    status, error, _ = error_of(sent)
    assert (status, error["type"]) == (408, "timeout_error")
    assert error["message"] == "the request body did not arrive within 0.2 s"
    assert app.environs == []


def test_a_client_that_disconnects_is_told_to_the_request() -> None:
    release = threading.Event()
    app = Seen(block=release)
    gone_seen: list[bool] = []

    def watching_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        gone: ClientGone = environ[CLIENT_GONE]
        gone.subscribe(lambda: (gone_seen.append(True), release.set()))
        return app(environ, start_response)

    run(front_for(watching_app), client(b"{}", then_wait=0.05))
    assert gone_seen == [True]


def concurrently(front: WSGIFront, requests: list[tuple[dict[str, Any], Any]], *, hold: threading.Event) -> Any:
    """Start each (scope, receive) on ``front`` in order; returns what each was sent, once ``hold`` is set."""

    async def go() -> list[list[Message]]:
        sent: list[list[Message]] = [[] for _ in requests]

        def sender(n: int) -> Any:
            async def send(message: Message) -> None:
                sent[n].append(message)

            return send

        tasks = []
        for n, (request_scope, receive) in enumerate(requests):
            tasks.append(asyncio.create_task(front(request_scope, receive, sender(n))))
            await asyncio.sleep(0.05)  # in arrival order
        await asyncio.sleep(0.2)
        used_while_held = front.budget.used
        hold.set()
        await asyncio.gather(*tasks)
        return [sent, used_while_held]

    return asyncio.run(go())


def sized(n: int, length: int = 100) -> tuple[dict[str, Any], Any]:
    return scope(headers=[(b"content-length", str(length).encode())]), client(bytes([65 + n]) * length)


def test_declared_bodies_are_admitted_whole_or_refused_at_once_in_arrival_order() -> None:
    hold = threading.Event()
    app = Seen(block=hold)
    refusals: list[tuple[int, str, bool]] = []
    front = front_for(
        app,
        max_body_bytes=100,
        capacity=body_estimate(100) * 2,  # room for two bodies of 100 bytes at once
        on_refusal=lambda scope, status, reason, message, counted: refusals.append((status, reason, counted)),
    )
    sent, used_while_held = concurrently(front, [sized(n) for n in range(4)], hold=hold)
    statuses = [s[0]["status"] for s in sent]
    assert statuses == [200, 200, 429, 429]  # the first two in, the later ones refused without waiting
    assert used_while_held == 2 * body_estimate(100)  # each admitted body held whole from the start
    assert front.budget.used == 0  # and given back once answered
    refused = dict(sent[2][0]["headers"])
    assert refused[b"retry-after"] == b"2" and refused[b"connection"] == b"close"
    assert json.loads(sent[2][1]["body"])["error"]["type"] == "rate_limit_error"
    assert refusals == [(429, "budget", True), (429, "budget", True)]  # counted by the budget, told to the log
    assert sorted(app.bodies) == [b"A" * 100, b"B" * 100]


def test_a_chunked_body_is_counted_as_it_arrives_and_refused_when_it_finds_no_room() -> None:
    hold = threading.Event()
    front = front_for(Seen(block=hold), max_body_bytes=1000, capacity=body_estimate(300))
    first = scope(headers=[(b"content-length", b"200")]), client(b"x" * 200)
    chunked = scope(headers=[(b"transfer-encoding", b"chunked")]), client(b"y" * 50, b"y" * 50, b"y" * 50)
    sent, _ = concurrently(front, [first, chunked], hold=hold)
    assert [s[0]["status"] for s in sent] == [200, 429]  # 200 + 100 bytes fit; the third chunk does not


def test_a_body_that_could_never_fit_is_a_413_at_once() -> None:
    app = Seen()
    front = front_for(app, max_body_bytes=1000, capacity=body_estimate(500))
    status, error, _ = error_of(run(front, client(b"z" * 600), scope(headers=[(b"content-length", b"600")])))
    assert status == 413
    assert "more than the service's whole budget" in error["message"]
    assert app.environs == []


def test_the_request_holds_its_reservation_until_its_answer() -> None:
    held: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        held.append(environ[RESERVATION].bytes)
        environ[RESERVATION].resize(5000)  # the route's own estimate, once parsed
        start_response("200 OK", [])
        return [b"ok"]

    front = front_for(app)
    sent = run(front, client(b"x" * 100), scope(headers=[(b"content-length", b"100")]))
    assert sent[0]["status"] == 200
    assert held == [body_estimate(100)]
    assert front.budget.used == 0 and front.budget.peak == 5000


def test_lifespan_shutdown_stops_the_engine() -> None:
    stopped: list[bool] = []
    front = front_for(Seen(), on_shutdown=lambda: stopped.append(True))
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return inbox.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(front({"type": "lifespan"}, receive, send))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert stopped == [True]


def test_lifespan_startup_completes_at_once_however_long_the_model_takes() -> None:
    """gunicorn gives the ASGI lifespan's startup 30 s, then stops the whole server: startup only starts the
    service's threads (the model loads on its own) and completes at once. Holding connections until the model is
    ready is the worker's (app.server.AcceptOnceReady, tests/unit/test_handover.py)."""
    started: list[float] = []
    sent: list[tuple[str, float]] = []

    async def run() -> None:
        front = front_for(Seen(), on_startup=lambda: started.append(time.monotonic()))
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        await inbox.put({"type": "lifespan.startup"})

        async def send(message: Message) -> None:
            sent.append((message["type"], time.monotonic()))

        task = asyncio.create_task(front({"type": "lifespan"}, inbox.get, send))
        await asyncio.sleep(0.2)
        task.cancel()

    asyncio.run(run())
    ((kind, at),) = sent
    assert kind == "lifespan.startup.complete" and len(started) == 1
    assert at - started[0] < 0.1


def test_every_refusal_is_told_with_its_reason() -> None:
    told: list[tuple[int, str, bool]] = []

    def front(**kwargs: Any) -> WSGIFront:
        return front_for(
            Seen(), on_refusal=lambda s, status, reason, m, counted: told.append((status, reason, counted)), **kwargs
        )

    run(front(), client(b"x" * 600, b"x" * 600, then_wait=0), scope(headers=[(b"content-length", b"1200")]))
    run(front(), client(b"x" * 600, b"x" * 600))  # chunked, past the limit
    run(front(body_timeout_s=0.1), client(b"{", then_wait=5, complete=False))
    run(front(capacity=1000), client(b"x" * 500), scope(headers=[(b"content-length", b"500")]))
    assert told == [
        (413, "body_too_large", False),
        (413, "body_too_large", False),
        (408, "body_timeout", False),
        (413, "budget", True),  # 3 x 500 bytes could never fit a budget of 1000: counted by the budget itself
    ]
