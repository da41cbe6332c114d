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
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import safetensors.numpy
import torch
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from store.checkpoints import write_atomic
from store.meta import Checkpoint
from trainer.checkpoint import load_checkpoint
from trainer.table import WeightTable

if TYPE_CHECKING:
    from trainer.loop import Trainer

log = logging.getLogger("datadiet.trainer")


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


# --- what a run holds, captured and restored -----------------------------------------------------------


def capture(t: Trainer) -> TrainerState:
    """Everything trainer ``t`` holds beyond its model (which the checkpoint file carries)."""
    arrays, table_info = t.table.state()
    v = t.validation
    return TrainerState(
        step=t.step,
        table_arrays=arrays,
        info={
            "table": table_info,
            "weighting": t.learner.weighting.state(),
            "scorings": t.learner.scorings,
            "val_version": v.version,
            "rng": t.rng.bit_generator.state,
            "val_loss": _exact(v.loss),
            "train_loss": _exact(t.learner.train_loss),
            "checked_ordinal": _checked_saved(v.checked_ordinal),
            "quarantined": t.quarantine.count,
            "pending_quarantine": [list(q) for q in t.quarantine.pending],
        },
        optimizer=t.learner.opt.state_dict(),
        g_val=[g.float().cpu().numpy() for g in v.g_val] if v.g_val is not None else None,
        validation=v.samples,
        torch_rng=torch.get_rng_state().numpy(),
    )


def resume(t: Trainer, engine: Engine) -> None:
    """Restore trainer ``t`` from the newest checkpoint of its model kind and config that has its state
    (the newest one alone, model only, if none has); a fresh start when there is none. Raises the
    database's errors."""
    model = t.learner.model
    with Session(engine) as session:
        rows = session.scalars(select(Checkpoint).order_by(Checkpoint.version.desc()).limit(20)).all()
    complete = [r for r in rows if all(f.exists() for f in state_paths(t.settings.data_dir, r.version))]
    row = complete[0] if complete else (rows[0] if rows else None)
    if row is None:
        log.info("no checkpoint yet: starting a new %s model", model.kind)
        return
    if row.model_kind != model.kind or row.config != model.config:
        log.warning(
            "newest checkpoint v%d is a %s %s, not this %s %s: starting fresh",
            row.version,
            row.model_kind,
            row.config,
            model.kind,
            model.config,
        )
        return
    loaded = load_checkpoint(row.path, sha256=row.sha256, device=model.device)
    model.load_checkpoint_tensors(loaded.module.checkpoint_tensors())  # a LoRA model: its adapters
    state = load_state(t.settings.data_dir, row.version)
    t.step = t.checkpointed_step = row.step
    if state is None:
        log.warning("checkpoint v%d has no trainer state: resuming the model only", row.version)
        return
    info = state.info
    t.learner.opt.load_state_dict(state.optimizer)
    t.table = WeightTable.from_state(state.table_arrays, info["table"])
    t.learner.weighting.attach(t.table)
    t.learner.weighting.load_state(info.get("weighting", {}))
    t.learner.scorings = int(info.get("scorings", 0))
    t.learner.train_loss = _nan_if_none(info.get("train_loss"))
    if "rng" in info:
        t.rng.bit_generator.state = info["rng"]
    if state.torch_rng is not None:
        torch.set_rng_state(torch.from_numpy(state.torch_rng.copy()))
    # the validation set the run trained against, not just its version: without the samples a resumed run
    # would think itself up to date and never score again
    v = t.validation
    v.version = int(info.get("val_version", -1))
    v.samples = state.validation
    v.loss = _nan_if_none(info.get("val_loss"))
    checked = info.get("checked_ordinal")
    v.checked_ordinal = (
        t.table.max_ordinals() if checked is None else np.atleast_1d(np.asarray(checked, np.int64))
    )
    if state.g_val is not None:
        v.g_val = [torch.from_numpy(g).to(model.device) for g in state.g_val]
    if v.samples:
        t.learner.weighting.on_validation(t.table, v.samples, v.version, task_changed=False)
    t.quarantine.count = int(info.get("quarantined", 0))
    t.quarantine.pending = [(int(o), str(s), str(r)) for o, s, r in info.get("pending_quarantine", [])]
    log.info("resumed from checkpoint v%d at step %d with %d samples", row.version, t.step, t.table.live)


def _checked_saved(checked: np.ndarray) -> int | list[int]:
    """Validation.checked_ordinal as saved: an int for one shard (as states were before sharding), else a
    list per shard."""
    values = [int(x) for x in np.atleast_1d(checked)]
    return values[0] if len(values) == 1 else (values or -1)


def _exact(x: float) -> float | None:
    """A loss average as saved: exact (no rounding), None for NaN."""
    return None if math.isnan(x) else float(x)


def _nan_if_none(x: float | None) -> float:
    return math.nan if x is None else float(x)
