"""The indexing load's shape, apart from Locust (importing Locust patches the standard library with gevent)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    """How many users, how fast they arrive, and when the run ends (seconds from its start)."""

    users: int
    ramp_s: float
    end_s: float

    @classmethod
    def from_options(cls, options: Any, given: dict[str, Any]) -> Shape:
        """``--load-*`` (or their env vars), overridden by Locust's ``-u``, ``-r`` and ``-t`` where given."""
        users = int(given.get("users") or getattr(options, "load_users", 6))
        rate = given.get("spawn_rate")
        ramp = users / rate if rate else getattr(options, "load_ramp", 60.0)
        run_time = given.get("run_time")
        end = run_time if run_time else getattr(options, "load_duration", 1200.0) + getattr(options, "load_soak", 0.0)
        return cls(users=users, ramp_s=max(ramp, 1.0), end_s=float(end))

    def at(self, elapsed: float) -> tuple[int, float] | None:
        """Locust's tick: (users, spawn rate) at ``elapsed`` seconds, or None once the run is over."""
        if elapsed >= self.end_s:
            return None
        return (max(1, min(self.users, round(self.users * elapsed / self.ramp_s))), max(self.users / self.ramp_s, 1.0))
