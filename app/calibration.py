"""What a start measures, kept for the next start of the same model on the same machine.

Loading a model is quick; deciding how to run it is not. A start measures the dtype (the fidelity probe in
float32 and in the reduced dtype), whether the linear layers' weights can be held in it, whether the recorded
forward graph gives the eager forward's outputs on other batches, the batch planner's cost of a pass, and with
``EMBEDDING_BACKEND=auto`` which runtime is faster (:meth:`app.backend.SentenceTransformerBackend.load`): about
10 s of a 15-23 s start of the bundled model beside a test run, more for a wider one, and the same answer at
every start of the same model on the same CPU with the same libraries and settings.

So the answer is kept as one JSON file in ``EMBEDDING_CACHE_DIR/calibration/``, beside the converted models,
named by a digest of everything that could change it (:func:`calibration_key`): the model's files (names,
sizes, times) or hub commit, the CPU's model name and flags, the versions of this service and of the libraries
that compute, the settings that choose (device, dtype, runtime, threads, allocator) and the variables that cap
the CPU's instruction sets. A changed key measures again. The file also keeps the fidelity probe's vectors as
the chosen configuration computed them: a start that reads the file computes the probe once and compares, so
whatever no key covers (a model file rewritten in place with the same size and time, another machine's kernels)
measures again instead of serving other vectors than were checked. A corrupt or foreign file is measured again
and rewritten; a directory that cannot be written only costs the time, and the start says so.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
"""Bumped when what is measured, or how, changes: an entry of another format is measured again."""

KERNEL_VARIABLES = ("ONEDNN_", "DNNL_", "MKL_", "ATEN_CPU_CAPABILITY", "OMP_", "KMP_", "GOMP_", "TBB_", "OV_")
"""Prefixes of environment variables that change which kernels run, or how many threads: part of the key."""

PROBE_AGREEMENT = 0.9999
"""The least cosine between each probe vector a start computes and the one kept: the same configuration on the
same CPU computes the same vectors (measured: identical), so anything lower means something the key does not
cover has changed."""


@dataclass(frozen=True)
class Calibration:
    """What one start measured, and the fidelity probe's vectors as the configuration it chose computes them."""

    dtype: str
    dtype_reason: str
    hold_linear: bool
    """The linear layers' weights are held in the dtype (they gave the probe's vectors bit for bit)."""
    backend: str
    backend_reason: str
    traced: bool
    """torch's forward runs as the recorded graph (it gave the eager forward's outputs on other batches)."""
    batch_overhead_tokens: int
    batch_cost: str
    probe: np.ndarray
    measured_at: float
    """When it was measured (Unix time)."""

    def measured_at_text(self) -> str:
        return dt.datetime.fromtimestamp(self.measured_at, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    def to_json(self, key: str, inputs: dict[str, Any]) -> str:
        fields = asdict(self)
        probe = np.ascontiguousarray(self.probe, dtype="<f4")
        fields["probe"] = {"shape": list(probe.shape), "float32": base64.b64encode(probe.tobytes()).decode()}
        return json.dumps({"format": FORMAT, "key": key, "inputs": inputs, "calibration": fields}, indent=1)

    @classmethod
    def from_json(cls, text: str, key: str) -> Calibration:
        """Raises ValueError (KeyError, TypeError included) for anything but an entry of this format and key."""
        entry = json.loads(text)
        if entry.get("format") != FORMAT or entry.get("key") != key:
            raise ValueError(f"an entry of format {entry.get('format')!r} for another key")
        fields = dict(entry["calibration"])
        raw = base64.b64decode(fields["probe"]["float32"], validate=True)
        fields["probe"] = np.frombuffer(raw, dtype="<f4").reshape(fields["probe"]["shape"]).astype(np.float32)
        calibration = cls(**fields)
        if not (isinstance(calibration.batch_overhead_tokens, int) and calibration.probe.ndim == 2):
            raise ValueError("malformed")
        return calibration


def cpu_identity() -> dict[str, str]:
    """The CPU's model name and flags (Linux ``/proc/cpuinfo``), and the machine's architecture."""
    found = {"machine": platform.machine(), "model": "", "flags": ""}
    try:
        with Path("/proc/cpuinfo").open() as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                if name.strip() == "model name" and not found["model"]:
                    found["model"] = value.strip()
                elif name.strip() == "flags" and not found["flags"]:
                    found["flags"] = " ".join(sorted(value.split()))
    except OSError:
        pass
    return found


def library_versions() -> dict[str, str]:
    """This service's version and those of the libraries that load, convert and compute."""
    from importlib.metadata import PackageNotFoundError, version

    from app.version import __version__

    found = {"service": __version__}
    for package in ("torch", "transformers", "sentence-transformers", "openvino", "tokenizers", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = ""
    return found


def calibration_key(model: Any, choices: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The entry's name and what it is a digest of: ``model`` (the model's files or hub commit), ``choices``
    (the settings that decide, as resolved here), the CPU, the versions and the kernels' variables."""
    inputs = {
        "format": FORMAT,
        "model": model,
        "choices": choices,
        "cpu": cpu_identity(),
        "versions": library_versions(),
        "variables": {k: v for k, v in sorted(os.environ.items()) if k.startswith(KERNEL_VARIABLES)},
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return digest[:32], inputs


class CalibrationStore:
    """The calibration of one key in ``directory`` (``EMBEDDING_CACHE_DIR/calibration``)."""

    def __init__(self, directory: Path, key: str, inputs: dict[str, Any]) -> None:
        self.path = directory / f"{key}.json"
        self._key = key
        self._inputs = inputs

    def read(self) -> tuple[Calibration | None, str]:
        """The kept calibration, or None and why there is none to use."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None, "none kept for this model, machine and settings"
        except OSError as exc:
            return None, f"cannot read {self.path} ({exc.strerror or exc})"
        try:
            return Calibration.from_json(text, self._key), f"read from {self.path}"
        except (ValueError, KeyError, TypeError) as exc:
            return None, f"{self.path} is not a calibration of this format ({type(exc).__name__}: {exc})"

    def write(self, calibration: Calibration) -> str:
        """Keep ``calibration`` (written aside, then renamed into place: a reader sees all of it or none); what
        happened, in words."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(
                "w", dir=self.path.parent, prefix=".writing-", suffix=".json", delete=False
            ) as scratch:
                scratch.write(calibration.to_json(self._key, self._inputs))
            try:
                os.replace(scratch.name, self.path)
            except OSError:
                Path(scratch.name).unlink(missing_ok=True)
                raise
        except OSError as exc:
            return f"not kept ({exc.strerror or exc}: {self.path.parent}): the next start measures again"
        return f"kept in {self.path}"
