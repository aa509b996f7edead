"""The start-up check of what the service relies on inside gunicorn (app/internals.py): the installed gunicorn has
all of it, and a release that lacks a member is named, not found later by a failing request."""

from __future__ import annotations

import asyncio
import types

import gunicorn.asgi.protocol
import gunicorn.workers.gasgi
import pytest

from app import internals


def test_the_pinned_gunicorn_has_everything_the_protocol_relies_on() -> None:
    assert internals.missing() == []
    internals.check()


def copy_of(module: types.ModuleType, **changes: object) -> types.ModuleType:
    copy = types.ModuleType(module.__name__)
    copy.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    copy.__dict__.update(changes)
    return copy


@pytest.mark.parametrize(
    ("member", "named"),
    [
        ("_send_error_response", "ASGIProtocol._send_error_response"),
        ("_on_headers_complete", "ASGIProtocol._on_headers_complete"),
    ],
)
def test_a_release_without_a_method_is_named(member: str, named: str) -> None:
    renamed = type(
        "ASGIProtocol", (), {k: v for k, v in vars(gunicorn.asgi.protocol.ASGIProtocol).items() if k != member}
    )
    protocol = copy_of(gunicorn.asgi.protocol, ASGIProtocol=renamed)
    assert internals.missing(protocol, gunicorn.workers.gasgi) == [named]


def test_a_release_whose_protocol_keeps_its_state_elsewhere_is_named() -> None:
    class ASGIProtocol(gunicorn.asgi.protocol.ASGIProtocol):  # type: ignore[misc]
        def __init__(self) -> None:  # sets none of the state the service reads
            pass

    protocol = copy_of(gunicorn.asgi.protocol, ASGIProtocol=ASGIProtocol)
    lacking = internals.missing(protocol, gunicorn.workers.gasgi)
    assert lacking == [f"ASGIProtocol().{name}" for name in internals.PROTOCOL_STATE]


def test_a_release_without_the_reason_phrases_or_the_worker_name_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    protocol = copy_of(gunicorn.asgi.protocol, _REASON_PHRASES=None)
    worker = copy_of(gunicorn.workers.gasgi, ASGIProtocol=None)
    assert internals.missing(protocol, worker) == [
        "gunicorn.asgi.protocol._REASON_PHRASES",
        "gunicorn.workers.gasgi.ASGIProtocol (the name its worker builds protocols from)",
    ]
    monkeypatch.setattr(gunicorn.asgi.protocol, "_REASON_PHRASES", None)
    with pytest.raises(RuntimeError, match=r"gunicorn \S+ lacks .*: gunicorn.asgi.protocol._REASON_PHRASES;"):
        internals.check()


def test_a_release_whose_arbiter_keeps_its_listeners_elsewhere_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from gunicorn.arbiter import Arbiter

    monkeypatch.delattr(Arbiter, "LISTENERS")
    assert internals.missing() == ["gunicorn.arbiter.Arbiter.LISTENERS"]


def test_a_release_whose_worker_loads_the_app_elsewhere_is_named() -> None:
    class ASGIWorker:  # gunicorn's worker without the load_wsgi step the service's worker extends
        pass

    worker = copy_of(gunicorn.workers.gasgi, ASGIWorker=ASGIWorker)
    assert internals.missing(gunicorn.asgi.protocol, worker) == [
        "ASGIWorker.load_wsgi (setting .asgi: the worker reads the served app's settings there)",
        "ASGIWorker._serve (listening through loop.create_server: the worker sets its backlog)",
    ]


def test_a_release_whose_worker_listens_another_way_is_named() -> None:
    class ASGIWorker(gunicorn.workers.gasgi.ASGIWorker):  # type: ignore[misc]
        async def _serve(self) -> None:  # listens without loop.create_server: the backlog would not be set
            await asyncio.sleep(0)

    worker = copy_of(gunicorn.workers.gasgi, ASGIWorker=ASGIWorker)
    assert internals.missing(gunicorn.asgi.protocol, worker) == [
        "ASGIWorker._serve (listening through loop.create_server: the worker sets its backlog)"
    ]
