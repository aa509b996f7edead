"""Hostile clients against a running service: headers trickled byte by byte, bodies that never finish.

    python -m loadtest.hostile --url http://127.0.0.1:5000 --slow 256 --stalled 256 --seconds 60

Opens the attack connections (``--slow``: a request line and one header byte every 3 s;
``--stalled``: complete headers announcing a body that never comes), holds them while it sends
``GET /health`` and a single-text ``POST /embed`` every second, and prints the slowest answers and what
became of the attackers' connections. tests/integration/test_hostile.py runs it against the real server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit

import requests

TRICKLE_INTERVAL_S = 3.0
SLOW_START = b"POST /embed HTTP/1.1\r\nHost: victim\r\nX-Slow: "
STALLED_START = (
    b"POST /embed HTTP/1.1\r\nHost: victim\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    b'{"inputs": ["'
)


class Attack:
    """Slow-header and stalled-body connections to ``url``, held open until the ``with`` block ends."""

    def __init__(self, url: str, slow: int, stalled: int) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.slow_count, self.stalled_count = slow, stalled
        self.sockets: list[socket.socket] = []
        self.answers: Counter[str] = Counter()
        self._closed: set[int] = set()
        self._stop = threading.Event()
        self._trickler = threading.Thread(target=self._trickle, daemon=True)

    def __enter__(self) -> Attack:
        for start in [SLOW_START] * self.slow_count + [STALLED_START] * self.stalled_count:
            sock = socket.create_connection(self.address, timeout=10)
            sock.sendall(start)
            sock.setblocking(False)
            self.sockets.append(sock)
        self._trickler.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._trickler.join(5)
        for sock in self.sockets:
            sock.close()

    def _trickle(self) -> None:
        while not self._stop.wait(TRICKLE_INTERVAL_S):
            for sock in self.sockets[: self.slow_count]:
                with contextlib.suppress(OSError):  # closed by the server: what it may do to a client this slow
                    sock.send(b"x")

    def open_connections(self) -> int:
        """Attack connections the server has not closed yet; reads (and tallies) whatever it answered."""
        for n, sock in enumerate(self.sockets):
            if n in self._closed:
                continue
            try:
                while data := sock.recv(65536):
                    self.answers[data.split(b"\r\n", 1)[0].decode("latin-1")] += 1
                self._closed.add(n)
            except BlockingIOError:
                continue
            except OSError:
                self._closed.add(n)
        return len(self.sockets) - len(self._closed)


@dataclass
class Probes:
    """The answers to the probes sent during an attack."""

    health: list[float] = field(default_factory=list)
    embed: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def worst(self) -> tuple[float, float]:
        return max(self.health, default=float("inf")), max(self.embed, default=float("inf"))


def probe(url: str, seconds: float, interval_s: float = 1.0) -> Probes:
    """``GET /health`` and a single-text ``POST /embed`` every ``interval_s`` for ``seconds``."""
    found = Probes()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for path, latencies in (("/health", found.health), ("/embed", found.embed)):
            started = time.monotonic()
            try:
                if path == "/health":
                    response = requests.get(url + path, timeout=10)
                else:
                    response = requests.post(url + path, json={"inputs": ["are you there?"]}, timeout=10)
                if response.status_code != 200:
                    found.failures.append(f"{path}: {response.status_code}")
            except requests.RequestException as exc:
                found.failures.append(f"{path}: {type(exc).__name__}")
            latencies.append(time.monotonic() - started)
        time.sleep(interval_s)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:5000")
    parser.add_argument("--slow", type=int, default=256)
    parser.add_argument("--stalled", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    with Attack(args.url, args.slow, args.stalled) as attack:
        found = probe(args.url, args.seconds)
        still_open = attack.open_connections()
    health, embed = found.worst()
    report = {
        "attack_connections": args.slow + args.stalled,
        "still_open_at_end": still_open,
        "server_answers_to_attackers": dict(attack.answers),
        "health_worst_s": round(health, 3),
        "embed_worst_s": round(embed, 3),
        "probes": len(found.health),
        "failures": found.failures,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
