"""The command line: ``embedding-service`` (or ``python -m app``) ``serve``, ``check``, ``settings``,
``download``.

``serve`` runs what ``make run`` runs (gunicorn with :mod:`app.gunicorn_conf` serving ``app.asgi:app``);
``check`` validates the settings, loads the model, embeds one text and says what would run; ``settings``
lists every ``EMBEDDING_*`` variable from the reader the service validates with; ``download`` fetches a hub
model into a directory the service can then serve offline (the Kubernetes ``model-download`` component's
init container). Settings come from the environment, as in every other way of running the service;
``--port`` and ``--model`` are shortcuts for ``EMBEDDING_PORT`` and ``EMBEDDING_MODEL``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.config import ConfigError, Settings, byte_text, markdown_table, reference
from app.version import __version__

EXIT_CONFIG = 2
"""A setting that cannot be used (as gunicorn's master exits on one)."""
EXIT_MODEL = 3
"""The model cannot be loaded or cannot embed."""

CHECK_TEXT = "embedding-service check: one real embedding"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.gunicorn_args = rest
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    code: int = args.run(args)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedding-service",
        description="An embedding HTTP service whose memory stays flat under indexing load. Settings are "
        "EMBEDDING_* environment variables: `embedding-service settings` lists them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve the API (what `make run` starts)",
        description="Serve the API with gunicorn, one worker holding one model, as `make run`, the Docker image "
        "and the ops scripts do. Other arguments go to gunicorn as they are (e.g. --bind 127.0.0.1:8080).",
    )
    serve.add_argument("--port", type=int, help="EMBEDDING_PORT (default 5000)")
    serve.add_argument("--model", help="EMBEDDING_MODEL: a hub id, a local directory or all-minilm-l6-v2")
    serve.set_defaults(run=_serve)

    check = commands.add_parser(
        "check",
        help="validate the settings, load the model, embed one text, say what would run",
        description="Validate every EMBEDDING_* setting, load the model, embed one text, and print what `serve` "
        f"would run. Exit 0 when it can serve, {EXIT_CONFIG} for a setting that cannot be used, {EXIT_MODEL} for "
        "a model that cannot be loaded or cannot embed.",
    )
    check.add_argument("--model", help="EMBEDDING_MODEL for this check")
    check.add_argument("--json", action="store_true", help="print the report as one JSON object")
    check.set_defaults(run=_check)

    settings = commands.add_parser(
        "settings",
        help="list every EMBEDDING_* variable: default, form and meaning",
        description="Every EMBEDDING_* variable the service reads, with its default, the form its value takes "
        "and its meaning, and its value here when it is set.",
    )
    settings.add_argument("--json", action="store_true", help="print them as a JSON list")
    settings.add_argument("--markdown", action="store_true", help="print the README's configuration table")
    settings.set_defaults(run=_settings)

    download = commands.add_parser(
        "download",
        help="fetch a hub model into a directory that `serve` can load offline",
        description="Fetch the model EMBEDDING_MODEL names (or --model) from the Hugging Face hub into --to, "
        "with HF_TOKEN when it is set (private and gated models); the directory is then a model "
        "EMBEDDING_MODEL can name. A directory that already holds a complete download of the same model and "
        f"revision is left as it is. Exit 0 when the directory holds the model, {EXIT_MODEL} when it cannot be "
        "fetched.",
    )
    download.add_argument("--to", required=True, type=Path, help="the directory to fill (created when missing)")
    download.add_argument("--model", help="a hub model id (default: EMBEDDING_MODEL)")
    download.add_argument("--revision", default="main", help="a branch, tag or commit (default: main)")
    download.set_defaults(run=_download)
    return parser


def _serve(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    if args.port is not None:
        env["EMBEDDING_PORT"] = str(args.port)
    if args.model is not None:
        env["EMBEDDING_MODEL"] = args.model
    try:
        Settings.from_env(env)
    except ConfigError as error:
        sys.stderr.write(f"embedding service: configuration error: {error}\n")
        return EXIT_CONFIG
    extra = [arg for arg in args.gunicorn_args if arg != "--"]
    command = [sys.executable, "-m", "gunicorn", "-c", "python:app.gunicorn_conf", *extra, "app.asgi:app"]
    os.execve(sys.executable, command, env)  # noqa: S606  (the service's own gunicorn, in this environment)


def _check(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    if args.model is not None:
        env["EMBEDDING_MODEL"] = args.model
    try:
        settings = Settings.from_env(env)
    except ConfigError as error:
        return _report(args, {"ok": False, "error": f"configuration error: {error}"}, EXIT_CONFIG)
    report = _would_run(settings)
    try:
        report.update(_load_and_embed(settings))
    except Exception as error:  # noqa: BLE001  (every way a model fails to load or embed is the answer here)
        report.update(ok=False, error=f"{type(error).__name__}: {error}")
        return _report(args, report, EXIT_MODEL)
    report["ok"] = True
    return _report(args, report, 0)


def _would_run(settings: Settings) -> dict[str, Any]:
    from app.allocator import jemalloc_library
    from app.memory import CGROUP_LIMIT_SHARE, cgroup_memory_limit

    jemalloc = jemalloc_library()
    cgroup = cgroup_memory_limit()
    if settings.memory_limit_bytes is not None:
        limit = byte_text(settings.memory_limit_bytes)
    elif cgroup is not None:
        limit = f"{byte_text(int(cgroup * CGROUP_LIMIT_SHARE))} (90% of the cgroup's {byte_text(cgroup)})"
    else:
        limit = "none (no EMBEDDING_MEMORY_LIMIT_BYTES, no cgroup limit)"
    allocator = settings.allocator if settings.allocator == "glibc" or jemalloc else "glibc (jemalloc is not installed)"
    return {
        "version": __version__,
        "model": settings.model,
        "port": settings.port,
        "allocator": allocator,
        "memory_policy": str(settings.memory_policy),
        "thresholds": {
            "elevated": byte_text(settings.memory_elevated_bytes),
            "high": byte_text(settings.memory_high_bytes),
            "limit": limit,
        },
        "limits": {
            "max_inputs": settings.max_inputs,
            "max_input_chars": settings.max_input_chars,
            "max_body_bytes": byte_text(settings.max_body_bytes),
            "request_timeout_s": settings.request_timeout_s,
        },
        "model_name_policy": settings.model_name_policy,
        "api_key": "set" if settings.api_key else "unset",
    }


def _load_and_embed(settings: Settings) -> dict[str, Any]:
    import numpy as np

    from app.backend import backend_for

    backend = backend_for(settings)
    started = time.perf_counter()
    info = backend.load()
    loaded = time.perf_counter()
    vectors = backend.finish(backend.encode(backend.prepare([CHECK_TEXT])))
    if vectors.shape != (1, info.dimensions) or not np.isfinite(vectors).all():
        raise RuntimeError(f"the model answered an array of shape {vectors.shape}, or non-finite values")
    return {
        "model_id": info.model_id,
        "dimensions": info.dimensions,
        "max_seq_length": info.max_seq_length,
        "device": info.device,
        "dtype": info.dtype,
        "dtype_reason": info.dtype_reason,
        "backend": info.backend,
        "backend_reason": info.backend_reason,
        "calibration": f"{info.calibration} (measured {info.calibrated_at}; {info.calibration_note})",
        "load_s": round(loaded - started, 2),
        "embed_s": round(time.perf_counter() - loaded, 3),
    }


DOWNLOADED = ".embedding-service-download.json"
"""Written into a download's directory last: which model and revision it holds, complete."""

SKIPPED_FILES = ["*.onnx", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "tf_model*", "flax_model*", "coreml/*"]
"""Other runtimes' copies of the weights, which sentence-transformers on torch never reads."""


def _download(args: argparse.Namespace) -> int:
    from app.backend import ModelLoadError, resolve_model

    model = (args.model or os.environ.get("EMBEDDING_MODEL", "")).strip()
    try:  # a hub id resolves to itself; a directory or a bundled model's name to a place on this disk
        hub_id = bool(model) and resolve_model(model).location == model and not Path(model).is_dir()
    except ModelLoadError:  # a path that does not exist
        hub_id = False
    if not hub_id:
        sys.stderr.write(
            f"embedding service: download needs a hub model id (--model or EMBEDDING_MODEL), got {model!r}\n"
        )
        return EXIT_CONFIG
    target: Path = args.to
    wanted = {"model": model, "revision": args.revision}
    marker = target / DOWNLOADED
    try:
        held = json.loads(marker.read_text())
    except (OSError, ValueError):
        held = None
    if isinstance(held, dict) and {key: held.get(key) for key in wanted} == wanted:
        _say(f"{target} already holds {model} at {args.revision} (commit {held.get('commit')}): nothing to fetch")
        return 0
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        sys.stderr.write("embedding service: HF_HUB_OFFLINE is set, so nothing can be fetched: set HF_HUB_OFFLINE=0\n")
        return EXIT_MODEL
    started = time.perf_counter()
    try:
        marker.unlink(missing_ok=True)  # a partial download is never taken for a complete one
        path = snapshot_download(model, revision=args.revision, local_dir=target, ignore_patterns=SKIPPED_FILES)
    except Exception as error:  # noqa: BLE001  (every way a download fails is the answer here)
        token = "with" if os.environ.get("HF_TOKEN") else "without"
        sys.stderr.write(
            f"embedding service: cannot fetch {model} at {args.revision} ({token} HF_TOKEN): "
            f"{type(error).__name__}: {error}\n"
        )
        return EXIT_MODEL
    commit = _downloaded_commit(Path(path))
    marker.write_text(json.dumps({**wanted, "commit": commit}) + "\n")
    size = sum(file.stat().st_size for file in target.rglob("*") if file.is_file() and ".cache" not in file.parts)
    _say(
        f"fetched {model} at {args.revision} (commit {commit}) into {target}: {byte_text(size)} in "
        f"{time.perf_counter() - started:.1f} s"
    )
    return 0


def _downloaded_commit(directory: Path) -> str | None:
    """The commit huggingface_hub recorded for a ``local_dir`` download (its ``.cache`` metadata), if any."""
    for metadata in sorted((directory / ".cache" / "huggingface" / "download").rglob("*.metadata")):
        first = metadata.read_text().splitlines()[:1]
        if first and len(first[0]) == 40:
            return first[0]
    return None


def _report(args: argparse.Namespace, report: dict[str, Any], code: int) -> int:
    if args.json:
        _say(json.dumps(report))
        return code
    for key, value in report.items():
        shown = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else value
        _say(f"{key:>18}: {shown}")
    return code


def _settings(args: argparse.Namespace) -> int:
    docs = reference()
    if args.markdown:
        sys.stdout.write(markdown_table())
        return 0
    if args.json:
        _say(json.dumps([{**vars(doc), "set": _value_here(doc.variable, doc.form)} for doc in docs]))
        return 0
    for doc in docs:
        here = _value_here(doc.variable, doc.form)
        _say(f"{doc.variable}  [default: {doc.default}]" + (f"  [set: {here}]" if here is not None else ""))
        _say(f"    {doc.meaning}; {doc.form}")
    return 0


def _value_here(variable: str, form: str) -> str | None:
    """The variable's value in this environment (a secret only as "(set)"), None when unset or empty."""
    value = os.environ.get(variable, "").strip()
    if not value:
        return None
    return "(set)" if form.startswith("a secret") else value


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
