"""A model that takes ``SLOW_START_S`` seconds longer to load, for the tests of start-ups longer than gunicorn's 30 s
lifespan limit (tests/e2e/test_upgrade.py). Python imports this module at the start of every process whose
PYTHONPATH names this directory (an install's service.env does): it wraps the service's model loading, once
``app.backend`` is imported, with a sleep on the thread that loads (the inference thread). Nothing in the service
knows of it; without SLOW_START_S it does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

DELAY_S = float(os.environ.get("SLOW_START_S") or 0)


class DelayedLoad(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if name != "app.backend":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            load = module.SentenceTransformerBackend.load

            def slow_load(self: Any) -> Any:
                time.sleep(DELAY_S)
                return load(self)

            module.SentenceTransformerBackend.load = slow_load

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if DELAY_S > 0:
    sys.meta_path.insert(0, DelayedLoad())
