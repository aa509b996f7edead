"""A webhook receiver for Alertmanager: every notification becomes one JSON line.

    python ops/alert_receiver.py --port 9095 [--host 0.0.0.0] [--out notifications.jsonl]

The compose stack's stand-in for a pager (ops/alertmanager.yml posts to /page, /ticket and
/heartbeat), and the receiving end of the alerting pipeline's end-to-end test. Each line holds
the path it was posted to, when it arrived, and Alertmanager's payload as sent (``status``,
``alerts`` with their labels, annotations, ``startsAt`` and ``endsAt``, ...). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

MAX_BODY_BYTES = 10 * 1024 * 1024


class Receiver(ThreadingHTTPServer):
    """Appends each JSON body posted to it, with its path and arrival time, to ``out`` and stdout."""

    def __init__(self, address: tuple[str, int], out: IO[str] | None) -> None:
        super().__init__(address, Handler)
        self.out = out
        self.lock = threading.Lock()

    def record(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self.lock:
            for stream in filter(None, (self.out, sys.stdout)):
                stream.write(line)
                stream.flush()


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY_BYTES:
            self._answer(400, {"error": "expected a JSON body of at most 10 MiB"})
            return
        try:
            payload = json.loads(self.rfile.read(length))
        except json.JSONDecodeError as exc:
            self._answer(400, {"error": f"not JSON: {exc}"})
            return
        self.server.record({"path": self.path, "received_at": time.time(), "payload": payload})
        self._answer(200, {"status": "received"})

    def do_GET(self) -> None:
        self._answer(200, {"status": "ok"})  # health check

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the notifications are the log."""

    def _answer(self, status: int, body: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="0.0.0.0")  # noqa: S104  (in its compose network, Alertmanager connects from another container)
    parser.add_argument("--port", type=int, default=9095)
    parser.add_argument("--out", type=Path, help="also append the lines to this file")
    args = parser.parse_args()
    out = args.out.open("a", encoding="utf-8") if args.out else None
    with Receiver((args.host, args.port), out) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
