"""Service settings: one frozen, typed object read from ``EMBEDDING_*`` variables.

Every value is parsed and checked once, at start. A bad value raises
:class:`ConfigError` naming the variable and the accepted form, so the service
refuses to start instead of misbehaving later.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from app.allocator import ALLOCATORS, REEXEC_MARK
from app.reasons import MemoryPolicy

PREFIX = "EMBEDDING_"
DEFAULT_MODEL = "intfloat/multilingual-e5-small"
MEMORY_POLICIES = tuple(MemoryPolicy)
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("auto", "torch", "openvino")
LOG_LEVELS = ("debug", "info", "warning", "error")
MODEL_NAME_POLICIES = ("any", "served")
SECRETS = frozenset({"admin_token", "api_key"})
"""Settings never logged."""

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the variable."""


def parse_bytes(text: str) -> int:
    """Parse ``2.5GB``, ``512MiB``, ``1000`` into a number of bytes."""
    match = _BYTES_RE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise ValueError(f"not a byte size: {text!r}")
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


def byte_text(size: int) -> str:
    """``size`` as :func:`parse_bytes` reads it back: in decimal units where one decimal writes it exactly (2.5GB),
    else in the largest binary unit that does (16MiB)."""
    for unit, factor in (("GB", 1000**3), ("MB", 1000**2), ("kB", 1000)):
        if size >= factor and size % (factor // 10) == 0:
            return f"{size / factor:g}{unit}"
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _parse_int(text: str) -> int:
    return int(text.strip())


def _parse_float(text: str) -> float:
    value = float(text.strip())
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything the service can be configured with; see README "Configuration"."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "auto"
    cache_dir: str | None = None
    port: int = 5000
    batch_size: int = 32
    max_batch_tokens: int = 2048
    max_inputs: int = 512
    max_input_chars: int = 32_768
    max_body_bytes: int = 16 * 1024**2
    queue_size: int = 4096
    request_timeout_s: float = 120.0
    startup_timeout_s: float = 600.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    connection_max_age_s: float = 60.0
    connection_max_requests: int = 0
    torch_threads: int = 0
    http_threads: int = 32
    memory_elevated_bytes: int = 2_000_000_000
    memory_high_bytes: int = 2_500_000_000
    memory_limit_bytes: int | None = None
    memory_budget_bytes: int | None = None
    cleanup_interval_s: float = 300.0
    cleanup_every_requests: int = 50
    cleanup_cooldown_s: float = 30.0
    manual_cleanup_interval_s: float = 10.0
    monitor_interval_s: float = 60.0
    memory_policy: MemoryPolicy = MemoryPolicy.SMART
    trim_after_batch: bool = True
    trim_interval_s: float = 2.0
    allocator: str = "jemalloc"
    malloc_arenas: int = 2
    admin_token: str | None = None
    debug_endpoints: bool = False
    log_level: str = "info"
    state_dir: str | None = None
    served_model_name: tuple[str, ...] = ()
    """More names the model answers to on the OpenAI routes (its id and the id's last part always do)."""
    model_name_policy: str = "any"
    """``any``: a request naming another model is answered by this one (TEI's behaviour); ``served``: 404."""
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(self.device in DEVICES, "DEVICE", f"one of {', '.join(DEVICES)}")
        _check(self.dtype in DTYPES, "DTYPE", f"one of {', '.join(DTYPES)}")
        _check(self.backend in BACKENDS, "BACKEND", f"one of {', '.join(BACKENDS)}")
        _check(1 <= self.port <= 65535, "PORT", "a port number from 1 to 65535")
        _check(1 <= self.batch_size <= 4096, "BATCH_SIZE", "a whole number from 1 to 4096")
        _check(self.max_batch_tokens >= 1, "MAX_BATCH_TOKENS", "a whole number of at least 1")
        _check(self.max_inputs >= 1, "MAX_INPUTS", "a whole number of at least 1")
        _check(self.max_input_chars >= 1, "MAX_INPUT_CHARS", "a whole number of at least 1")
        _check(self.max_body_bytes >= 1024, "MAX_BODY_BYTES", "a byte size of at least 1KiB")
        _check(
            self.queue_size >= self.max_inputs,
            "QUEUE_SIZE",
            f"a whole number of at least EMBEDDING_MAX_INPUTS ({self.max_inputs})",
        )
        _check(self.request_timeout_s > 0, "REQUEST_TIMEOUT_S", "a number of seconds above 0")
        _check(self.startup_timeout_s > 0, "STARTUP_TIMEOUT_S", "a number of seconds above 0")
        _check(self.header_timeout_s > 0, "HEADER_TIMEOUT_S", "a number of seconds above 0")
        _check(self.connection_max_age_s >= 0, "CONNECTION_MAX_AGE_S", "a number of seconds, 0 for no limit")
        _check(self.connection_max_requests >= 0, "CONNECTION_MAX_REQUESTS", "a whole number, 0 for no limit")
        _check(self.body_timeout_s > 0, "BODY_TIMEOUT_S", "a number of seconds above 0")
        _check(self.torch_threads >= 0, "TORCH_THREADS", "0 (one per usable CPU) or more")
        _check(self.http_threads >= 1, "HTTP_THREADS", "a whole number of at least 1")
        _check(self.memory_elevated_bytes > 0, "MEMORY_ELEVATED_BYTES", "a byte size above 0")
        _check(
            self.memory_high_bytes >= self.memory_elevated_bytes,
            "MEMORY_HIGH_BYTES",
            "a byte size not below EMBEDDING_MEMORY_ELEVATED_BYTES",
        )
        _check(
            self.memory_limit_bytes is None or self.memory_limit_bytes > 0,
            "MEMORY_LIMIT_BYTES",
            "a byte size above 0, or empty for no limit",
        )
        _check(
            self.memory_budget_bytes is None or self.memory_budget_bytes > 0,
            "MEMORY_BUDGET_BYTES",
            "a byte size above 0, or empty to derive it from the thresholds and the warmed baseline",
        )
        _check(self.cleanup_interval_s > 0, "CLEANUP_INTERVAL_S", "a number of seconds above 0")
        _check(self.cleanup_every_requests >= 1, "CLEANUP_EVERY_REQUESTS", "a whole number of at least 1")
        _check(self.cleanup_cooldown_s >= 0, "CLEANUP_COOLDOWN_S", "a number of seconds, 0 or more")
        _check(self.manual_cleanup_interval_s >= 0, "MANUAL_CLEANUP_INTERVAL_S", "a number of seconds, 0 or more")
        _check(self.monitor_interval_s > 0, "MONITOR_INTERVAL_S", "a number of seconds above 0")
        _check(self.trim_interval_s >= 0, "TRIM_INTERVAL_S", "a number of seconds, 0 or more")
        _check(self.allocator in ALLOCATORS, "ALLOCATOR", f"one of {', '.join(ALLOCATORS)}")
        _check(self.malloc_arenas >= 0, "MALLOC_ARENAS", "0 (the C library's default) or more")
        _check(self.memory_policy in MEMORY_POLICIES, "MEMORY_POLICY", f"one of {', '.join(MEMORY_POLICIES)}")
        object.__setattr__(self, "memory_policy", MemoryPolicy(self.memory_policy))  # a plain string given: typed
        _check(
            not self.debug_endpoints or bool(self.admin_token),
            "DEBUG_ENDPOINTS",
            "false unless EMBEDDING_ADMIN_TOKEN is set (the debug routes answer only with the admin token)",
        )
        _check(self.log_level in LOG_LEVELS, "LOG_LEVEL", f"one of {', '.join(LOG_LEVELS)}")
        _check(bool(self.model.strip()), "MODEL", "a hub model id, a local directory or a bundled model name")
        _check(
            self.model_name_policy in MODEL_NAME_POLICIES,
            "MODEL_NAME_POLICY",
            f"one of {', '.join(MODEL_NAME_POLICIES)}",
        )
        _check(
            self.api_key is None
            or (len(self.api_key) >= 16 and self.api_key.isprintable() and " " not in self.api_key),
            "API_KEY",
            "at least 16 printable characters without spaces (e.g. openssl rand -hex 32)",
        )
        _check(
            all(origin == "*" or _ORIGIN_RE.match(origin) for origin in self.cors_origins),
            "CORS_ORIGINS",
            "a comma-separated list of origins such as https://app.example.com, or *",
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every ``EMBEDDING_*`` variable; unset or empty ones keep their default."""
        env = os.environ if environ is None else environ
        values = _read(_EnvReader(env))
        return cls(**{name: value for name, value in values.items() if value is not None})

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]  # field types are checked in __post_init__


def _read(reader: _EnvReader) -> dict[str, Any]:
    """Each setting's value from its variable (None where unset), through ``reader``."""
    return {
        "model": reader.get("MODEL", str, "a hub id, a local directory or all-minilm-l6-v2"),
        "device": reader.get("DEVICE", _lower),
        "dtype": reader.get("DTYPE", _lower),
        "backend": reader.get("BACKEND", _lower),
        "cache_dir": reader.get("CACHE_DIR", str, "a directory"),
        "port": reader.get("PORT", _parse_int, "a whole number"),
        "batch_size": reader.get("BATCH_SIZE", _parse_int, "a whole number"),
        "max_batch_tokens": reader.get("MAX_BATCH_TOKENS", _parse_int, "a whole number"),
        "max_inputs": reader.get("MAX_INPUTS", _parse_int, "a whole number"),
        "max_input_chars": reader.get("MAX_INPUT_CHARS", _parse_int, "a whole number"),
        "max_body_bytes": reader.get("MAX_BODY_BYTES", parse_bytes, "a byte size such as 16MiB"),
        "queue_size": reader.get("QUEUE_SIZE", _parse_int, "a whole number"),
        "request_timeout_s": reader.get("REQUEST_TIMEOUT_S", _parse_float, "a number of seconds"),
        "startup_timeout_s": reader.get("STARTUP_TIMEOUT_S", _parse_float, "a number of seconds"),
        "header_timeout_s": reader.get("HEADER_TIMEOUT_S", _parse_float, "a number of seconds"),
        "connection_max_age_s": reader.get("CONNECTION_MAX_AGE_S", _parse_float, "a number of seconds"),
        "connection_max_requests": reader.get("CONNECTION_MAX_REQUESTS", _parse_int, "a whole number"),
        "body_timeout_s": reader.get("BODY_TIMEOUT_S", _parse_float, "a number of seconds"),
        "torch_threads": reader.get("TORCH_THREADS", _parse_int, "a whole number"),
        "http_threads": reader.get("HTTP_THREADS", _parse_int, "a whole number"),
        "memory_elevated_bytes": reader.get("MEMORY_ELEVATED_BYTES", parse_bytes, "a byte size such as 2GB"),
        "memory_high_bytes": reader.get("MEMORY_HIGH_BYTES", parse_bytes, "a byte size such as 2.5GB"),
        "memory_limit_bytes": reader.get("MEMORY_LIMIT_BYTES", parse_bytes, "a byte size such as 3GB"),
        "memory_budget_bytes": reader.get("MEMORY_BUDGET_BYTES", parse_bytes, "a byte size such as 1GB"),
        "cleanup_interval_s": reader.get("CLEANUP_INTERVAL_S", _parse_float, "a number of seconds"),
        "cleanup_every_requests": reader.get("CLEANUP_EVERY_REQUESTS", _parse_int, "a whole number"),
        "cleanup_cooldown_s": reader.get("CLEANUP_COOLDOWN_S", _parse_float, "a number of seconds"),
        "manual_cleanup_interval_s": reader.get("MANUAL_CLEANUP_INTERVAL_S", _parse_float, "a number of seconds"),
        "monitor_interval_s": reader.get("MONITOR_INTERVAL_S", _parse_float, "a number of seconds"),
        "memory_policy": reader.get("MEMORY_POLICY", _lower),
        "trim_after_batch": reader.get("TRIM_AFTER_BATCH", _parse_bool, "true or false"),
        "trim_interval_s": reader.get("TRIM_INTERVAL_S", _parse_float, "a number of seconds"),
        "allocator": reader.get("ALLOCATOR", _lower),
        "malloc_arenas": reader.get("MALLOC_ARENAS", _parse_int, "a whole number"),
        # Stripped as the token a client sends is: a value written with a trailing newline still matches.
        "admin_token": reader.get("ADMIN_TOKEN", str.strip, "a secret"),
        "debug_endpoints": reader.get("DEBUG_ENDPOINTS", _parse_bool, "true or false"),
        "state_dir": reader.get("STATE_DIR", str, "a directory"),
        "log_level": reader.get("LOG_LEVEL", _lower),
        "served_model_name": reader.get("SERVED_MODEL_NAME", _parse_list, "a comma-separated list of names"),
        "model_name_policy": reader.get("MODEL_NAME_POLICY", _lower),
        "api_key": reader.get("API_KEY", str.strip, "a secret of at least 16 characters"),
        "cors_origins": reader.get("CORS_ORIGINS", _parse_list, "a comma-separated list of origins"),
    }


HELP: dict[str, str] = {
    "model": "the model to serve (all-minilm-l6-v2: the bundled offline one); one that cannot be loaded stops the "
    "start, no other is ever swapped in",
    "device": "where the model runs: auto picks CUDA, then MPS, then the CPU",
    "dtype": "the precision the model computes in; auto: bfloat16 where the hardware computes it natively and a "
    "start-up probe agrees, else float32",
    "backend": "the runtime of the forward pass: torch (on the CPU its forward recorded as a graph where it gives "
    "the eager forward's outputs), or openvino (the same model converted at start, CPU only); auto: openvino where "
    "a start-up check finds it faster on this machine and the fidelity probe agrees",
    "cache_dir": "where a converted model is kept between starts, keyed by the model's files and the runtime's "
    "version; unset: $XDG_CACHE_HOME/embedding-service (~/.cache); not writable: converted at every start",
    "port": "the listening port (all interfaces)",
    "batch_size": "most texts in one model batch",
    "max_batch_tokens": "most padded tokens (texts x longest) in one model batch: bounds a batch's activations",
    "max_inputs": "most texts in one request",
    "max_input_chars": "most characters of a text read: a longer one is cut with truncation on, else a 422",
    "max_body_bytes": "largest request body",
    "queue_size": "most texts waiting for the model; beyond it, 429",
    "request_timeout_s": "longest time from a request's arrival to its answer",
    "startup_timeout_s": "longest time a worker may take from its start to its model loaded, calibrated and warmed; "
    "past it the worker exits with code 3 and the server stops. The ops scripts' readiness wait and the Kubernetes "
    "startup probe take their budget from it",
    "header_timeout_s": "a new connection's request headers must arrive within this, else 408",
    "connection_max_age_s": "a kept-alive connection is closed after the first answer past this age (give or take "
    "10%), so that long-lived clients spread over new replicas; 0: no limit",
    "connection_max_requests": "a kept-alive connection is closed after this many answers; 0: no limit",
    "body_timeout_s": "a request body must arrive within this once its headers have, else 408",
    "torch_threads": "torch threads; 0: one per usable CPU",
    "http_threads": "request threads (each runs a request once it has been read whole)",
    "memory_elevated_bytes": "memory status elevated above this",
    "memory_high_bytes": "memory status high above this: the cleanup threshold",
    "memory_limit_bytes": "hard limit: above it, new embedding requests are shed (503); unset: 90% of the cgroup's",
    "memory_budget_bytes": "memory the requests in flight may hold at once; unset: derived from the thresholds and "
    "the warmed model's RSS",
    "cleanup_interval_s": "periodic cleanup interval",
    "cleanup_every_requests": "a cleanup after this many embedding requests",
    "cleanup_cooldown_s": "least time between two threshold cleanups while memory stays high",
    "manual_cleanup_interval_s": "least time between two POST /cleanup; sooner is a 429",
    "monitor_interval_s": "memory monitor period",
    "memory_policy": "smart, legacy (the old behaviour, for comparison) or off (no automatic cleanup)",
    "trim_after_batch": "smart only: give the allocator's free memory back between batches",
    "trim_interval_s": "least time between two of those trims",
    "allocator": "the C allocator: jemalloc (preloaded when installed) or glibc",
    "malloc_arenas": "most malloc arenas shared by all threads; 0: the allocator's default",
    "admin_token": "Bearer token the admin routes (POST /cleanup) require; unset: loopback clients only",
    "debug_endpoints": "true adds POST /debug/memory/snapshot (needs EMBEDDING_ADMIN_TOKEN)",
    "log_level": "the log level",
    "state_dir": "where a run marks itself, to count unclean exits; unset: one per port in the temporary directory",
    "served_model_name": "more names the model answers to on the OpenAI routes (comma-separated)",
    "model_name_policy": "any: a request naming another model is answered by this one; served: it is a 404",
    "api_key": "when set, every route that reads texts needs Authorization: Bearer <key>",
    "cors_origins": "web origins allowed to call the API from a browser (comma-separated), or *; unset: none",
}
"""Each setting's meaning in one line: ``settings`` on the command line, and the README's table."""

_CHOICES: dict[str, tuple[str, ...]] = {
    "device": DEVICES,
    "dtype": DTYPES,
    "backend": BACKENDS,
    "memory_policy": MEMORY_POLICIES,
    "allocator": ALLOCATORS,
    "log_level": LOG_LEVELS,
    "model_name_policy": MODEL_NAME_POLICIES,
}


@dataclass(frozen=True)
class SettingDoc:
    """One setting as the command line's ``settings`` and the README list it."""

    variable: str
    default: str
    form: str
    meaning: str


def reference() -> list[SettingDoc]:
    """Every setting: its variable, default, the form its value takes and its meaning, from the same reader and
    defaults :meth:`Settings.from_env` validates with."""
    reader = _EnvReader({})
    names = {f"{PREFIX}{field.upper()}": field for field in _read(reader)}
    defaults = Settings()
    docs = []
    for variable, form in reader.forms.items():
        field = names[variable]
        value = getattr(defaults, field)
        default = "unset" if value in (None, ()) else str(value).lower() if isinstance(value, bool) else str(value)
        if form.startswith("a byte size") and isinstance(value, int):
            default = byte_text(value)
        choices = _CHOICES.get(field)
        docs.append(
            SettingDoc(variable, default, f"one of {', '.join(choices)}" if choices else form or "text", HELP[field])
        )
    return docs


def markdown_table() -> str:
    """The README's configuration table, from :func:`reference` (``embedding-service settings --markdown``)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{d.variable}` | `{d.default}` | {d.meaning}; {d.form} |" for d in reference()]
    return "\n".join(rows) + "\n"


# EMBEDDING_* variables that are not settings: the ops scripts' (ops/*.sh), the allocator's re-exec mark and
# what the image says of its build (the Dockerfile's, reported by GET /info).
NOT_SETTINGS = frozenset(
    {
        "EMBEDDING_HOME",
        "EMBEDDING_PIP_ARGS",
        "EMBEDDING_HANDOVER_DIR",
        REEXEC_MARK,
        "EMBEDDING_BUILD_SHA",
        "EMBEDDING_DOCKER_LABEL",
    }
)


def setting_variables() -> frozenset[str]:
    """Every ``EMBEDDING_*`` variable :meth:`Settings.from_env` reads (recorded, so never out of step)."""
    read: set[str] = set()

    class Recording(dict[str, str]):
        def get(self, key: str, default: Any = None) -> Any:
            read.add(key)
            return super().get(key, default)

    Settings.from_env(Recording())
    return frozenset(read)


def unknown_variables(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """``EMBEDDING_*`` variables that are neither a setting nor one of :data:`NOT_SETTINGS` (a typo, most
    likely: they change nothing), each with the setting it most resembles, if any."""
    env = os.environ if environ is None else environ
    known = setting_variables()
    unknown = sorted(name for name in env if name.startswith(PREFIX) and name not in known | NOT_SETTINGS)
    suffixes = [name.removeprefix(PREFIX) for name in known]  # the shared prefix would make everything alike

    def closest(name: str) -> str | None:
        match = difflib.get_close_matches(name.removeprefix(PREFIX), suffixes, n=1)
        return PREFIX + match[0] if match else None

    return {name: closest(name) for name in unknown}


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _parse_list(text: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(","))
    if not all(items):
        raise ValueError(f"an empty item in {text!r}")
    return items


_ORIGIN_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:\d{1,5})?$")


def _lower(text: str) -> str:
    return text.strip().lower()


def _check(ok: bool, name: str, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"{PREFIX}{name}: expected {accepted}")


class _EnvReader:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self._env = environ
        self.forms: dict[str, str] = {}
        """Each variable read, with the form its value takes."""

    def get(self, name: str, parse: Callable[[str], T], form: str = "") -> T | None:
        self.forms[PREFIX + name] = form
        raw = self._env.get(PREFIX + name, "")
        if raw.strip() == "":
            return None
        try:
            return parse(raw)
        except ValueError:
            raise ConfigError(f"{PREFIX}{name}={raw!r}: expected {form or 'a valid value'}") from None
