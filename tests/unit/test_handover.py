"""The listening socket handed from a running master to the next version (app/handover.py), with real sockets.

The whole handover (two gunicorn versions, 16 clients, no refused connection) is tests/e2e/test_upgrade.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.handover import Offer, Served, inherited_listeners, offer_path, take, unix_address
from app.server import AcceptOnceReady

LOG = logging.getLogger("test.handover")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    yield server
    server.close()


def test_the_taken_socket_is_the_offered_one_and_shares_its_queue(listener: socket.socket, tmp_path: Path) -> None:
    offer = Offer([listener], tmp_path, LOG)
    try:
        assert offer.path == offer_path(tmp_path) == tmp_path / f"handover.{os.getpid()}.sock"
        assert stat.S_IMODE(offer.path.stat().st_mode) == 0o600
        (taken,) = take(offer.path)
        assert taken.getsockname() == listener.getsockname()
        # One accept queue: a connection made before either accepts is accepted by the other one, the
        # offered socket closed meanwhile (the old version stops accepting) loses nothing.
        client = socket.create_connection(listener.getsockname())
        listener.close()
        taken.settimeout(2)
        accepted, _ = taken.accept()
        client.sendall(b"ping")
        assert accepted.recv(4) == b"ping"
        accepted.close()
        client.close()
        taken.close()
    finally:
        offer.close()
    assert not offer.path.exists()  # the master exited: nothing left to take
    with pytest.raises(OSError):
        take(offer.path)


@pytest.fixture
def deep(tmp_path: Path) -> Path:
    """A run/ directory whose sockets' paths are longer than a Unix socket's address holds (107 bytes)."""
    run = tmp_path / ("an-install-directory-deeper-" * 3) / "embedding-service" / "run"
    run.mkdir(parents=True)
    return run


def test_an_install_deeper_than_a_unix_socket_address_still_hands_over(listener: socket.socket, deep: Path) -> None:
    offer = Offer([listener], deep, LOG)
    try:
        assert len(os.fsencode(offer.path)) > 107
        assert stat.S_IMODE(offer.path.stat().st_mode) == 0o600
        (taken,) = take(offer.path)
        assert taken.getsockname() == listener.getsockname()
        taken.close()
    finally:
        offer.close()
    assert not offer.path.exists()


def test_the_ops_scripts_ask_a_version_through_a_check_socket_deeper_than_an_address_holds(deep: Path) -> None:
    """ops/lib.sh's ``http`` with VIA= the socket of a version started beside the running one (run/next.sock)."""
    check = deep / ("next-" * 8 + "check.sock")
    assert len(os.fsencode(check)) > 107
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with unix_address(check) as address:
        server.bind(address)
    server.listen(1)

    def answer() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"ready": true}')

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    asked = subprocess.run(
        ["bash", "-c", f'. "{ROOT}/ops/lib.sh" && VIA="$1" http GET /ready', "http", str(check)],
        env={**os.environ, "EMBEDDING_HOME": str(deep.parent)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    thread.join(5)
    server.close()
    assert asked.stdout == '200 {"ready": true}\n', asked.stderr


def test_sockets_are_inherited_only_when_meant_for_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    assert inherited_listeners() == 2
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))  # systemd's variables for another process
    assert inherited_listeners() == 0
    monkeypatch.delenv("LISTEN_PID")
    assert inherited_listeners() == 0


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


@pytest.mark.parametrize("then", ["ready", "failed"])
def test_a_held_worker_accepts_nothing_until_its_model_is_ready(listener: socket.socket, then: str) -> None:
    """The listeners of a worker on an inherited socket: a client's connection waits in the shared accept queue,
    unanswered, while the model loads (past gunicorn's 30 s lifespan limit, on a slow start: nothing here is timed
    by gunicorn), is accepted and answered once it is ready, and is never accepted by a worker whose load failed
    (it exits, and the version it was to replace answers)."""
    state = ["loading"]
    accepting: list[bool] = []
    answers: list[bytes] = []

    async def run() -> bool:
        loop = asyncio.get_running_loop()
        gate = AcceptOnceReady(loop.create_server, lambda: state[0], lambda: accepting.append(True))
        server = await gate.create_server(Echo, sock=listener)
        held = asyncio.create_task(gate.accept_when_ready())
        client = socket.create_connection(listener.getsockname())  # the kernel completes the handshake
        client.settimeout(0.5)
        client.sendall(b"ping")
        await asyncio.sleep(0.5)
        with pytest.raises(TimeoutError):
            await loop.run_in_executor(None, client.recv, 4)  # nobody accepted it
        assert not held.done() and not accepting
        state[0] = then
        accepted = await asyncio.wait_for(held, 2)
        client.settimeout(2 if accepted else 0.5)
        with contextlib.suppress(TimeoutError):
            answers.append(await loop.run_in_executor(None, client.recv, 4))
        client.close()
        server.close()
        return accepted

    accepted = asyncio.run(run())
    assert accepted == (then == "ready")
    assert answers == ([b"ping"] if then == "ready" else [])
    assert accepting == ([True] if then == "ready" else [])


def test_once_a_worker_served_the_next_one_gunicorn_starts_is_not_held() -> None:
    """The flag the master's workers share: set by the first worker that accepts, seen by every worker forked after
    it (a crash's replacement answers at once, 503 while it loads, instead of leaving clients unanswered)."""
    served = Served()
    assert not served.is_set()
    pid = os.fork()
    if pid == 0:  # the first worker: it served
        served.set()
        os._exit(0)
    os.waitpid(pid, 0)
    assert served.is_set()
    seen = Served()
    assert not seen.is_set()  # another master's flag
