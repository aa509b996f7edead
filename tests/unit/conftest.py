"""The app served by the fake backend, for the route tests: a module gives its ``backend`` and ``settings``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.config import Settings
from tests.doubles import FakeBackend, serving


@pytest.fixture
def app(backend: FakeBackend, settings: Settings) -> Iterator[Flask]:
    """The app with ``backend`` loaded and ready, its service stopped after the test."""
    with serving(settings, backend) as app:
        yield app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
