"""The trainer's resumable state, saved beside every published checkpoint.

``state-v<N>.safetensors`` holds the weight table's columns (with the sampling probabilities), the running
validation gradient, the validation set the run trained against (orjson bytes) and torch's RNG state, with
a JSON header (step, sources, the weighting rule's state, loss averages, numpy's RNG); ``optim-v<N>.pt``
the optimizer's state dict (tensors and numbers only, loaded with ``weights_only=True``: nothing is
unpickled). Both are written atomically before the checkpoint's SQL row, so the newest row always has its
state. Together with the model they are everything a run holds, so a resumed run continues as the
uninterrupted one would (tests/trainer/test_resume.py pins this bit for bit on the CPU).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import safetensors.numpy
import torch

from store.checkpoints import write_atomic


def state_paths(data_dir: Path, version: int) -> tuple[Path, Path]:
    d = Path(data_dir) / "trainer"
    return d / f"state-v{version:08d}.safetensors", d / f"optim-v{version:08d}.pt"


@dataclass
class TrainerState:
    step: int
    table_arrays: dict[str, np.ndarray]
    info: dict[str, Any]  # table info, weighting state, validation version, rng
    optimizer: dict[str, Any]
    g_val: list[np.ndarray] | None
    validation: list[dict[str, Any]] = field(default_factory=list)  # the validation set's samples
    torch_rng: np.ndarray | None = None  # torch.get_rng_state() as uint8


def save_state(data_dir: Path, version: int, state: TrainerState) -> None:
    state_file, optim_file = state_paths(data_dir, version)
    arrays = {f"table.{k}": v for k, v in state.table_arrays.items()}
    for i, g in enumerate(state.g_val or []):
        arrays[f"g_val.{i}"] = np.ascontiguousarray(g, dtype=np.float32)
    arrays["validation"] = np.frombuffer(orjson.dumps(state.validation), dtype=np.uint8).copy()
    if state.torch_rng is not None:
        arrays["torch_rng"] = np.ascontiguousarray(state.torch_rng, dtype=np.uint8)
    header = {"step": str(state.step), "info": json.dumps(state.info)}
    write_atomic(state_file, safetensors.numpy.save(arrays, metadata=header))
    buf = io.BytesIO()
    torch.save(state.optimizer, buf)
    write_atomic(optim_file, buf.getvalue())


def load_state(data_dir: Path, version: int) -> TrainerState | None:
    state_file, optim_file = state_paths(data_dir, version)
    if not state_file.exists() or not optim_file.exists():
        return None
    data = state_file.read_bytes()
    arrays = safetensors.numpy.load(data)
    header = _metadata(data)
    table = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("table.")}
    n_g = sum(1 for k in arrays if k.startswith("g_val."))
    g_val = [arrays[f"g_val.{i}"] for i in range(n_g)] or None
    optimizer = torch.load(optim_file, map_location="cpu", weights_only=True)
    validation = orjson.loads(arrays["validation"].tobytes()) if "validation" in arrays else []
    return TrainerState(
        int(header["step"]),
        table,
        json.loads(header["info"]),
        optimizer,
        g_val,
        validation,
        arrays.get("torch_rng"),
    )


def _metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})


def prune_states(data_dir: Path, keep_version: int) -> None:
    """Remove state files older than ``keep_version`` (checkpoints themselves are kept)."""
    d = Path(data_dir) / "trainer"
    for f in d.glob("*-v*.*"):
        try:
            v = int(f.stem.rsplit("-v", 1)[1])
        except (IndexError, ValueError):
            continue
        if v < keep_version:
            f.unlink(missing_ok=True)
