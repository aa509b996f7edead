"""The HTTP front as an ASGI application: bodies read whole and bounded, WSGI environ, disconnects, lifespan.

The real server (gunicorn, real sockets) is tested in tests/integration/test_hostile.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterable
from typing import Any

from app.front import CLIENT_GONE, ClientGone, WSGIFront

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


def front_for(app: Any, **kwargs: Any) -> WSGIFront:
    return WSGIFront(app, **{"threads": 2, "max_body_bytes": 1000, "body_timeout_s": 1.0, **kwargs})


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
    assert (start["status"], answer["error_type"]) == (413, "validation")
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


def test_bodies_held_at_once_are_bounded_and_a_waiting_body_goes_on_when_room_is_freed() -> None:
    release = threading.Event()
    app = Seen(block=release)
    front = front_for(app, max_body_bytes=100)  # room for 400 bytes of bodies at once, from arrival to answer

    async def five_requests() -> list[list[Message]]:
        sent: list[list[Message]] = [[] for _ in range(5)]

        def sender(n: int) -> Any:
            async def send(message: Message) -> None:
                sent[n].append(message)

            return send

        tasks = [asyncio.create_task(front(scope(), client(bytes([65 + n]) * 100), sender(n))) for n in range(4)]
        await asyncio.sleep(0.2)
        assert front._buffered.used == 400  # two answering, two waiting for a thread: all four bodies held
        tasks.append(asyncio.create_task(front(scope(), client(b"E" * 100), sender(4))))
        await asyncio.sleep(0.2)
        assert not tasks[4].done() and front._buffered.used == 400  # the fifth waits for room
        release.set()
        await asyncio.gather(*tasks)
        assert front._buffered.used == 0
        return sent

    sent = asyncio.run(five_requests())
    assert [s[0]["status"] for s in sent] == [200] * 5
    assert sorted(app.bodies) == [bytes([65 + n]) * 100 for n in range(5)]


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
