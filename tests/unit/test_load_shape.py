"""The Locust load shape: the project's --load-* defaults, Locust's -u, -r and -t where given."""

from __future__ import annotations

from types import SimpleNamespace

from loadtest.shape import Shape

DEFAULTS = SimpleNamespace(load_users=6, load_ramp=60.0, load_duration=1200.0, load_soak=0.0)
NOTHING_GIVEN = {"users": None, "spawn_rate": None, "run_time": None}


def test_without_locust_options_the_project_defaults_apply() -> None:
    shape = Shape.from_options(DEFAULTS, NOTHING_GIVEN)
    assert shape == Shape(users=6, ramp_s=60.0, end_s=1200.0)
    assert shape.at(0) == (1, 1.0)
    assert shape.at(30) == (3, 1.0)
    assert shape.at(1199.9) == (6, 1.0)
    assert shape.at(1200) is None


def test_soak_extends_the_run() -> None:
    soak = SimpleNamespace(**{**vars(DEFAULTS), "load_soak": 600.0})
    assert Shape.from_options(soak, NOTHING_GIVEN).end_s == 1800.0


def test_locust_users_rate_and_run_time_win() -> None:
    shape = Shape.from_options(DEFAULTS, {"users": 8, "spawn_rate": 4.0, "run_time": 60})
    assert shape == Shape(users=8, ramp_s=2.0, end_s=60.0)
    assert shape.at(1) == (4, 4.0)
    assert shape.at(2) == (8, 4.0)
    assert shape.at(59.9) == (8, 4.0)
    assert shape.at(60) is None


def test_each_locust_option_alone_overrides_only_its_own_part() -> None:
    assert Shape.from_options(DEFAULTS, {**NOTHING_GIVEN, "run_time": 20}) == Shape(6, 60.0, 20.0)
    assert Shape.from_options(DEFAULTS, {**NOTHING_GIVEN, "users": 12}) == Shape(12, 60.0, 1200.0)
    assert Shape.from_options(DEFAULTS, {**NOTHING_GIVEN, "spawn_rate": 3.0}) == Shape(6, 2.0, 1200.0)
