"""A gapless handover of the listening socket from the running version to the next one.

The ops scripts (``ops/lib.sh``) replace a running service without a moment in which its port refuses a
connection. The running gunicorn master *offers* its TCP listening sockets on a Unix socket of the install,
``run/handover.<master pid>.sock`` (``EMBEDDING_HANDOVER_DIR``, set by the scripts; mode 0600, and only a
peer of the same user is answered). The next version's launcher takes them (SCM_RIGHTS) and starts gunicorn
with them as inherited sockets, the way systemd's socket activation passes them (``LISTEN_FDS``, which
gunicorn reads). Both processes then hold *one* socket with one accept queue: a connection waits in it
until one of them accepts it, and none is lost when the old one stops accepting (two sockets bound with
``SO_REUSEPORT`` would each have a queue, and the connections waiting in the closed one's are reset).

The first worker of a master whose socket was inherited accepts only once its model is loaded and warmed
(:class:`app.server.AcceptOnceReady`): until then the running version answers every connection, so no client
meets a version that is not ready. The same holds under systemd's socket activation. A worker gunicorn starts
again after that one served (a crash, an OOM kill) accepts at once and answers 503 with ``Retry-After`` while its
model loads, as a fresh start does: no other process answers for it any more (:class:`Served`).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

HANDOVER_DIR_VARIABLE = "EMBEDDING_HANDOVER_DIR"
"""Where the master offers its listening sockets; unset: it offers none (``make run``, the image)."""


def inherited_listeners() -> int:
    """How many listening sockets this process inherited (systemd's ``LISTEN_FDS``, meant for this pid)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return 0
    try:
        return max(0, int(os.environ.get("LISTEN_FDS", "0")))
    except ValueError:
        return 0


class Served:
    """Whether a worker of this master has accepted connections: one byte of memory shared with the workers it
    forks (created in the master before any). On an inherited socket the first worker holds its listeners until
    its model is ready, while the version it replaces answers; once one has served, that version is gone, and a
    worker started again after a crash answers at once (503 while loading) rather than leave every client
    waiting in the queue with no answer."""

    def __init__(self) -> None:
        self._byte = mmap.mmap(-1, 1)  # anonymous and shared: a forked worker writes what the master reads

    def set(self) -> None:
        self._byte[0] = 1

    def is_set(self) -> bool:
        return self._byte[0] == 1


def offer_path(directory: str | os.PathLike[str], pid: int | None = None) -> Path:
    return Path(directory) / f"handover.{os.getpid() if pid is None else pid}.sock"


UNIX_PATH_MAX = 108
"""The bytes a Unix socket's address holds on Linux (``sun_path``), its terminating zero included."""


@contextlib.contextmanager
def unix_address(path: str | os.PathLike[str]) -> Iterator[str]:
    """A name of ``path`` short enough to bind or connect a Unix socket to: the path itself where it fits, else
    the path through a descriptor of its directory (``/proc/self/fd/N/NAME``), valid while the block runs. An
    install's directory can be any depth; its run/ directory's sockets are reached either way."""
    path = Path(path)
    if len(os.fsencode(path)) < UNIX_PATH_MAX:
        yield str(path)
        return
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{directory}/{path.name}"
    finally:
        os.close(directory)


def _bind_private(server: socket.socket, path: Path) -> None:
    """Bind ``server`` to ``path``, readable and writable by this user only (mode 0600 from the start)."""
    path.unlink(missing_ok=True)  # a stale one: its process is gone (a pid is reused only after that)
    previous = os.umask(0o177)
    try:
        with unix_address(path) as address:
            server.bind(address)
    finally:
        os.umask(previous)


class Offer:
    """Hands ``listeners`` to any process of this user that connects to :attr:`path`, until closed. Runs in
    the gunicorn master, whose logger (JSON lines, like the service's) it writes to."""

    def __init__(self, listeners: list[socket.socket], directory: str | os.PathLike[str], log: logging.Logger) -> None:
        self._log = log
        self.path = offer_path(directory)
        self._fds = [listener.fileno() for listener in listeners]
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _bind_private(self._server, self.path)
        self._server.listen(4)
        self._thread = threading.Thread(target=self._serve, name="handover", daemon=True)
        self._thread.start()
        self._log.info("handover: offering %d listening socket(s) at %s", len(self._fds), self.path)

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return  # closed
            with connection:
                try:
                    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                    pid, uid, _gid = struct.unpack("3i", credentials)
                    if uid != os.getuid():
                        self._log.warning("handover: refused pid %d of another user (uid %d)", pid, uid)
                        continue
                    socket.send_fds(connection, [b"L"], self._fds)
                    self._log.info("handover: gave the listening socket(s) to pid %d", pid)
                except OSError as exc:
                    self._log.warning("handover: failed: %s", exc)

    def close(self) -> None:
        """Stop offering (the master exits): remove the path, which names this pid only."""
        self.path.unlink(missing_ok=True)
        self._server.close()


def take(path: str | os.PathLike[str], timeout_s: float = 10.0) -> list[socket.socket]:
    """The TCP listening sockets offered at ``path`` (raises OSError when nothing answers there)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout_s)
        with unix_address(path) as address:
            client.connect(address)
        _, fds, _, _ = socket.recv_fds(client, 1, 16)
    if not fds:
        raise OSError(f"{path} offered no socket")
    return [socket.socket(fileno=fd) for fd in fds]


def launch(offered: Path, check: Path, command: list[str]) -> None:
    """Become ``command`` (the next version's ``python -m app serve``) with the sockets offered at ``offered``
    and a new Unix socket ``check`` as its inherited listeners: the ops scripts ask the new version alone for
    ``/ready`` and one embedding through ``check``, while the shared port is answered by whichever is ready."""
    listeners = take(offered)
    checker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _bind_private(checker, check)
    checker.listen(64)
    # Inherited sockets are numbered from 3 (sd_listen_fds): copied out of the way first (os.dup's copies are
    # not inherited), then into place, inherited.
    high = [os.dup(s.fileno()) for s in [*listeners, checker]]
    for number, fd in enumerate(high, start=3):
        os.dup2(fd, number, inheritable=True)
    os.environ.update(LISTEN_FDS=str(len(high)), LISTEN_PID=str(os.getpid()))
    os.execv(command[0], command)  # noqa: S606  (the next version's own interpreter, named by the ops scripts)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m app.handover", description=launch.__doc__)
    parser.add_argument("--from", dest="offered", type=Path, required=True, help="the running master's offer")
    parser.add_argument("--check", type=Path, required=True, help="the Unix socket the ops scripts check through")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to become")
    args = parser.parse_args(argv)
    command = [part for part in args.command if part != "--"] or parser.error("no command")
    launch(args.offered, args.check, command)


if __name__ == "__main__":
    main()
