"""The listening socket handed from a running master to the next version (app/handover.py), with real sockets.

The whole handover (two gunicorn versions, 16 clients, no refused connection) is tests/e2e/test_upgrade.py.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.handover import Offer, inherited_listeners, offer_path, take

LOG = logging.getLogger("test.handover")


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


def test_sockets_are_inherited_only_when_meant_for_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    assert inherited_listeners() == 2
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))  # systemd's variables for another process
    assert inherited_listeners() == 0
    monkeypatch.delenv("LISTEN_PID")
    assert inherited_listeners() == 0
