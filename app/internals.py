"""What :mod:`app.server` (and :mod:`app.gunicorn_conf`'s handover hook) relies on inside gunicorn that gunicorn
does not publish, checked before it is used.

gunicorn's asyncio worker has no public hook for what the service's protocol does (a deadline for a request's
headers, JSON bodies for the errors its parser answers, ``Host`` required, chunk sizes checked against the
body limit, half-closed clients answered): :class:`app.server.Protocol` subclasses its protocol and reads its
state. The exact pin of gunicorn in ``pyproject.toml`` guards it at install time; this check guards it at
start-up, so that a gunicorn release that renames or drops one of these stops the worker with a message that
names what is missing, instead of failing a request later. ``tests/unit/test_internals.py`` runs it too.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

PROTOCOL_METHODS = (
    "_on_headers_complete",
    "_on_body",
    "_send_response_start",
    "_send_error_response",
    "_safe_write",
    "_close_transport",
    "connection_made",
    "data_received",
)
"""Methods of gunicorn's ``ASGIProtocol`` that the service's protocol overrides or calls."""

PROTOCOL_STATE = ("_callback_parser", "_closed", "_body_receiver", "_current_request", "_keepalive", "_request_ready")
"""Attributes each ``ASGIProtocol`` sets in its ``__init__`` and the service's protocol reads or writes."""

RECEIVER_STATE = ("_complete",)
"""Attributes of gunicorn's ``BodyReceiver`` read by the service's protocol."""


def missing(protocol_module: ModuleType | None = None, worker_module: ModuleType | None = None) -> list[str]:
    """What the service relies on and the installed gunicorn lacks, each named; empty when all is there."""
    if protocol_module is None or worker_module is None:
        import gunicorn.asgi.protocol
        import gunicorn.workers.gasgi

        protocol_module, worker_module = gunicorn.asgi.protocol, gunicorn.workers.gasgi
    lacking = []
    protocol: Any = getattr(protocol_module, "ASGIProtocol", None)
    receiver: Any = getattr(protocol_module, "BodyReceiver", None)
    if protocol is None:
        lacking.append("gunicorn.asgi.protocol.ASGIProtocol")
    else:
        lacking += [f"ASGIProtocol.{name}" for name in PROTOCOL_METHODS if not callable(getattr(protocol, name, None))]
        assigned = protocol.__init__.__code__.co_names
        lacking += [f"ASGIProtocol().{name}" for name in PROTOCOL_STATE if name not in assigned]
    if receiver is None:
        lacking.append("gunicorn.asgi.protocol.BodyReceiver")
    else:
        assigned = receiver.__init__.__code__.co_names
        lacking += [f"BodyReceiver().{name}" for name in RECEIVER_STATE if name not in assigned]
    if not isinstance(getattr(protocol_module, "_REASON_PHRASES", None), dict):
        lacking.append("gunicorn.asgi.protocol._REASON_PHRASES")
    if getattr(worker_module, "ASGIProtocol", None) is None:
        lacking.append("gunicorn.workers.gasgi.ASGIProtocol (the name its worker builds protocols from)")
    worker: Any = getattr(worker_module, "ASGIWorker", None)
    if worker is None:
        lacking.append("gunicorn.workers.gasgi.ASGIWorker")
    else:
        if "asgi" not in _names_in(getattr(worker, "load_wsgi", None)):
            lacking.append("ASGIWorker.load_wsgi (setting .asgi: the worker reads the served app's settings there)")
        if "create_server" not in _names_in(getattr(worker, "_serve", None)):
            lacking.append("ASGIWorker._serve (listening through loop.create_server: the worker sets its backlog)")
    from gunicorn.arbiter import Arbiter

    if not isinstance(getattr(Arbiter, "LISTENERS", None), list):  # app.gunicorn_conf's when_ready offers them
        lacking.append("gunicorn.arbiter.Arbiter.LISTENERS")
    return lacking


def _names_in(function: Any) -> tuple[str, ...]:
    """The global and attribute names ``function``'s code uses (empty for anything else)."""
    return tuple(getattr(getattr(function, "__code__", None), "co_names", ()))


def check() -> None:
    """Raise, naming each missing member and the gunicorn version, when the installed gunicorn lacks one."""
    lacking = missing()
    if lacking:
        import gunicorn

        raise RuntimeError(
            f"gunicorn {gunicorn.__version__} lacks what the service's protocol (app/server.py) relies on: "
            + ", ".join(lacking)
            + "; install the gunicorn version pyproject.toml pins"
        )
