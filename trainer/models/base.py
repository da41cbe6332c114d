"""The small interface every model kind implements.

A kind is an ``nn.Module`` that also knows how to turn contract Samples into tensors (``collate``), how
to score each sample (``per_sample_loss``), how to answer (``predict``) and which ``nn.Linear`` layers
the hypergradient covers (``scored_modules``). ``config`` is the resolved config (defaults filled): it
round-trips through JSON and rebuilds the identical architecture, so a checkpoint header can carry it.

The hypergradient scorer (``trainer/hypergrad.py``) relies on one property: ``per_sample_loss(batch)[i]``
depends on sample ``i`` only (no batch norm, no cross-sample attention). Padding must not change a
sample's loss.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

InputKind = Literal["text", "vector"]
Batch = dict[str, Tensor]


class ModelNotFound(FileNotFoundError):
    """A model, weights file or tokenizer that a model config names is not there (nothing is downloaded)."""


class TrainModel(nn.Module, ABC):
    """Base class of every model kind."""

    kind: str  # registry name, or "package.module:factory" (set by build_model)
    input_kind: InputKind  # "text": input/target are strings; "vector": numbers -> int class
    config: dict[str, Any]

    @abstractmethod
    def collate(self, samples: Sequence[Mapping[str, Any]]) -> Batch:
        """Contract Samples (``input``, ``target``, ...) -> CPU tensors; the caller moves them."""

    @abstractmethod
    def per_sample_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Each sample's loss, shape (B,); sample i's entry depends on sample i only."""

    @abstractmethod
    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        """Answers for raw inputs, without gradients (text: list[str]; vector: list[int])."""

    def scored_modules(self) -> list[Any]:
        """The layers the hypergradient covers (nn.Linear, transformers' Conv1D, hypergrad.TiedEmbedding):
        by default every nn.Linear, in module order."""
        return [m for m in self.modules() if isinstance(m, nn.Linear)]

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """The tensors a checkpoint holds: by default the whole state dict (a LoRA model: its adapters)."""
        return self.state_dict()

    def load_checkpoint_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Load what ``checkpoint_tensors`` gave; RuntimeError when the names or shapes do not fit."""
        self.load_state_dict(tensors, strict=True)

    def checkpoint_metadata(self) -> dict[str, str]:
        """Extra checkpoint header entries (``datadiet.<key>``, plain strings) naming what else loading
        needs, e.g. ``base_path`` and ``base_sha256`` of a LoRA model's base. Empty by default."""
        return {}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def to_device(batch: Mapping[str, Tensor], device: torch.device | str) -> Batch:
    """Move a collated batch to ``device`` (non-blocking where the source is pinned)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def resolve_config(kind: str, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` overridden by ``given``; unknown keys and non-JSON values are errors."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{kind}: unknown config keys {unknown}; known keys: {sorted(defaults)}")
    config = {**defaults, **given}
    try:
        if json.loads(json.dumps(config)) != config:
            raise ValueError("changes in a JSON round trip")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{kind}: config must be plain JSON (numbers, strings, lists): {e}") from e
    return config


def check_int(kind: str, config: Mapping[str, Any], key: str, lo: int, hi: int | None = None) -> int:
    """``config[key]`` as an int in [lo, hi], or a ValueError naming the key."""
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{kind}: config {key!r} must be an integer {bounds}, got {value!r}")
    return value


def check_dropout(kind: str, config: Mapping[str, Any]) -> float:
    value = config["dropout"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"{kind}: config 'dropout' must be a number in [0, 1), got {value!r}")
    return float(value)


def sample_values(kind: str, samples: Sequence[Mapping[str, Any]], name: str) -> list[Any]:
    """``sample[name]`` for every sample, or a KeyError naming the first sample that lacks it."""
    out = []
    for i, s in enumerate(samples):
        if name not in s:
            raise KeyError(f"{kind}: sample {i} has no {name!r}")
        out.append(s[name])
    return out
