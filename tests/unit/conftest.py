"""The app served by the fake backend, for the route tests: a module gives its ``backend`` and ``settings``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import components, create_app
from app.config import Settings
from tests.doubles import FakeBackend, ready


@pytest.fixture
def app(backend: FakeBackend, settings: Settings) -> Iterator[Flask]:
    """The app with ``backend`` loaded and ready, its engine stopped after the test."""
    app = ready(create_app(settings, backend=backend))
    yield app
    components(app).engine.stop(5)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
