"""Checkpoints: one safetensors file whose header metadata alone is enough to rebuild the model.

Header metadata (all strings):
    datadiet.format          "1"
    datadiet.kind            model kind (registry name or "package.module:factory")
    datadiet.config          JSON of the resolved model config
    datadiet.step            training step, datadiet.version: checkpoint version (decimal ints)
    datadiet.settings        JSON of the trainer settings the caller passed (redact secrets before)
    datadiet.tensors_sha256  sha256 over every tensor, in sorted name order, of
                             name NUL dtype NUL shape NUL raw bytes, so a damaged data section (or a
                             header edit that reinterprets it) is caught without an external hash
    datadiet.base_path       (LoRA models only, plain strings) the base model the adapters need, and
    datadiet.base_sha256     the sha256 of its state dict (``tensors_sha256``); loading refuses another
                             base. Such a file holds the adapters alone: the file plus the named base
                             model are enough to load it (``TrainModel.checkpoint_metadata``)
    datadiet.<other>         JSON of any other key the caller passed in ``meta`` (e.g. metrics)

Loading never unpickles: safetensors only, and the kind is looked up in the model registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from store.checkpoints import write_atomic
from trainer.models import TrainModel, UnknownModelKind, build_model
from trainer.models.base import to_device

logger = logging.getLogger(__name__)

FORMAT = "1"
PREFIX = "datadiet."
REQUIRED = ("format", "kind", "config", "step", "version", "settings", "tensors_sha256")
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, or not a datadiet checkpoint."""


def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of each tensor, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike[str], model: TrainModel, meta: Mapping[str, Any], *, replace: bool = True
) -> tuple[str, int]:
    """Write ``model`` atomically to ``path``; ``meta`` needs ``step`` and ``version`` (ints) and may
    carry ``settings`` (JSON-able dict) and other JSON-able keys. Returns (file sha256 hex, size).
    With ``replace=False`` an existing file is never replaced (FileExistsError instead)."""
    for key in ("step", "version"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"checkpoint meta[{key!r}] must be an int >= 0, got {value!r}")
    extra = model.checkpoint_metadata()
    reserved = ({"format", "kind", "config", "tensors_sha256"} | set(extra)) & set(meta)
    if reserved:
        raise ValueError(f"checkpoint meta must not set {sorted(reserved)}: they describe the model")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.checkpoint_tensors().items()}
    metadata = {
        PREFIX + "format": FORMAT,
        PREFIX + "kind": model.kind,
        PREFIX + "config": json.dumps(model.config, sort_keys=True),
        PREFIX + "step": str(meta["step"]),
        PREFIX + "version": str(meta["version"]),
        PREFIX + "settings": json.dumps(meta.get("settings", {}), sort_keys=True, default=str),
        PREFIX + "tensors_sha256": tensors_sha256(tensors),
        **{PREFIX + k: v for k, v in extra.items()},
    }
    for key, value in meta.items():
        if key not in ("step", "version", "settings"):
            metadata[PREFIX + key] = json.dumps(value, sort_keys=True, default=str)
    data = safetensors.torch.save(tensors, metadata=metadata)
    digest = write_atomic(path, data, replace=replace)
    logger.info("checkpoint v%s (step %s) -> %s, %d bytes", meta["version"], meta["step"], path, len(data))
    return digest, len(data)


class LoadedModel:
    """A checkpoint's model, ready to answer: ``predict(inputs)`` and ``loss(samples)``."""

    def __init__(self, module: TrainModel, metadata: dict[str, str], path: Path) -> None:
        self.module = module
        self.metadata = metadata
        self.path = path
        self.kind: str = metadata[PREFIX + "kind"]
        self.config: dict[str, Any] = dict(module.config)
        self.step = int(metadata[PREFIX + "step"])
        self.version = int(metadata[PREFIX + "version"])
        self.settings: dict[str, Any] = json.loads(metadata[PREFIX + "settings"])

    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        """Text kinds: greedy completions without the input (list[str]); mlp: class labels (list[int])."""
        return self.module.predict(list(inputs))

    @torch.no_grad()
    def loss(self, samples: Sequence[Mapping[str, Any]], batch_size: int = 64) -> list[float]:
        """Per-sample loss of Sample dicts, in order."""
        was_training = self.module.training
        self.module.eval()
        try:
            out: list[float] = []
            for i in range(0, len(samples), batch_size):
                batch = to_device(self.module.collate(samples[i : i + batch_size]), self.module.device)
                out.extend(float(x) for x in self.module.per_sample_loss(batch).tolist())
            return out
        finally:
            self.module.train(was_training)

    def __repr__(self) -> str:
        return (
            f"LoadedModel(kind={self.kind!r}, version={self.version}, step={self.step}, path='{self.path}')"
        )


def load_checkpoint(
    path: str | os.PathLike[str],
    sha256: str | None = None,
    *,
    device: str | torch.device = "cpu",
    config_overrides: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Load and verify a checkpoint file (header, metadata, tensor hash; the file hash when given).

    ``config_overrides`` replace keys of the stored model config before the model is built, e.g.
    ``{"path": "/my/copy/of/the/base"}`` for an ``hf-causal-lm`` checkpoint trained elsewhere; a LoRA
    checkpoint still refuses a base whose sha256 differs from ``datadiet.base_sha256``. Raises
    CheckpointError for anything wrong with the file, the config, or the base it needs."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no such checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read checkpoint: {e}") from e
    if sha256 is not None:
        expected = sha256.strip().strip('"').lower()
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise CheckpointError(f"{p}: sha256 is {actual}, expected {expected}")
    metadata = _read_metadata(p, data)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own SafetensorError for any malformed file
        raise CheckpointError(f"{p}: not a valid safetensors file: {e}") from e
    if tensors_sha256(tensors) != metadata[PREFIX + "tensors_sha256"]:
        raise CheckpointError(f"{p}: tensor data does not match datadiet.tensors_sha256 (file damaged)")

    kind = metadata[PREFIX + "kind"]
    try:
        config = json.loads(metadata[PREFIX + "config"])
        settings = json.loads(metadata[PREFIX + "settings"])
        step, version = int(metadata[PREFIX + "step"]), int(metadata[PREFIX + "version"])
    except ValueError as e:
        raise CheckpointError(f"{p}: bad datadiet metadata value: {e}") from e
    if not isinstance(config, dict) or not isinstance(settings, dict) or step < 0 or version < 0:
        raise CheckpointError(f"{p}: bad datadiet metadata (config/settings objects, step/version >= 0)")
    config.update(config_overrides or {})
    try:
        module = build_model(kind, config)
    except UnknownModelKind as e:
        raise CheckpointError(f"{p}: {e}") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: model kind {kind!r} rejects the stored config: {e}") from e
    except (OSError, ImportError) as e:  # a base model that is not there, an extra that is not installed
        raise CheckpointError(f"{p}: cannot build its {kind!r} model: {e}") from e
    wanted = metadata.get(PREFIX + "base_sha256")
    if wanted is not None:
        have = module.checkpoint_metadata().get("base_sha256")
        if have != wanted:
            base = module.checkpoint_metadata().get("base_path", "?")
            raise CheckpointError(
                f"{p}: trained on the base {metadata.get(PREFIX + 'base_path', '?')} with sha256 {wanted}, "
                f"but the base at {base} has sha256 {have}: refusing to load adapters on another base"
            )
    try:
        module.load_checkpoint_tensors(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{p}: tensors do not fit a {kind!r} model with the stored config: {e}") from e
    module.to(device).eval()
    logger.debug("loaded checkpoint %s: kind %s, version %d, step %d", p, kind, version, step)
    return LoadedModel(module, metadata, p)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """A checkpoint file's datadiet header metadata (framing checked, tensors not read). Raises
    CheckpointError as ``load_checkpoint`` does."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            data = head + f.read(min(n, _MAX_HEADER))
            size = p.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read checkpoint: {e}") from e
    return _read_metadata(p, data, size)


def _read_metadata(p: Path, data: bytes, size: int | None = None) -> dict[str, str]:
    """Check the safetensors framing ourselves, for errors that say what is wrong; -> header metadata."""
    size = len(data) if size is None else size  # the file's length (data may hold just the header)
    if size < 8:
        raise CheckpointError(f"{p}: truncated: {size} bytes, less than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n == 0 or n > _MAX_HEADER:
        raise CheckpointError(f"{p}: garbled header length {n}; not a safetensors file")
    if 8 + n > size:
        raise CheckpointError(f"{p}: truncated: header says {n} bytes, file has {size - 8} after it")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: garbled safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: garbled safetensors header: not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{p}: no datadiet metadata in the header (not a datadiet checkpoint)")
    missing = [PREFIX + k for k in REQUIRED if PREFIX + k not in meta]
    if missing:
        raise CheckpointError(f"{p}: header metadata lacks {missing} (not a datadiet checkpoint?)")
    if meta[PREFIX + "format"] != FORMAT:
        raise CheckpointError(
            f"{p}: checkpoint format {meta[PREFIX + 'format']!r}; this code reads {FORMAT!r}"
        )
    try:
        end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: garbled tensor entries in the header: {e}") from e
    if 8 + n + end > size:
        raise CheckpointError(f"{p}: truncated: data section needs {end} bytes, has {size - 8 - n}")
    return meta
