"""Two CPU ranks under torchrun (gloo) train as one process does at the same global batch and seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from store.meta import Checkpoint, make_engine
from store.processes import datadiet_env, free_port, spawn, stop_process_group
from tests.conftest import REPO_ROOT
from tests.trainer.conftest import MLP, blobs
from trainer.state import TrainerState, load_state

STEPS = 20
# the same knobs for both runs; scoring every step and a reweight every 5 so the gathered scores matter
KNOBS: dict[str, Any] = {
    "outer_every": 1,
    "reweight_every": 5,
    "warmup_steps": 5,  # the learned weights take effect within the run
    "warmup_lr_steps": 5,
    "checkpoint_every": 10,  # both runs checkpoint at step 10, where the first two-rank run stops
    "torch_threads": 1,
    "progress_every_s": 3600.0,
}


def _post(api: TestClient) -> None:
    clean = blobs(300, 21, source="clean", noisy=False, prefix="c")
    noisy = blobs(200, 22, source="noisy", noisy=True, prefix="n")
    assert api.post("/v1/samples", json={"samples": clean + noisy}).status_code == 202
    val = blobs(64, 23, source="v", noisy=False, prefix="v")
    assert api.put("/v1/validation", json={"samples": val}).status_code == 200


def _final(data_dir: Path) -> tuple[dict[str, torch.Tensor], TrainerState]:
    """The newest checkpoint's tensors and trainer state."""
    import safetensors.torch

    engine = make_engine(f"sqlite:///{(data_dir / 'meta.db').resolve()}")
    with engine.connect() as conn:
        row = conn.execute(Checkpoint.__table__.select().order_by(Checkpoint.version.desc())).first()
    engine.dispose()
    assert row is not None
    state = load_state(data_dir, row.version)
    assert state is not None
    return safetensors.torch.load_file(row.path), state


def _run_two_ranks(env: dict[str, str], log: Path, *, via_cli: bool) -> None:
    """Two ranks to the end, exit status 0: through ``datadiet train --nproc 2`` (torchrun), or -- 4 s
    less on this machine, without torchrun's and the command's start and exit -- as torchrun starts them:
    ``python -m trainer`` with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT."""
    if via_cli:
        argvs = [([sys.executable, "-m", "app.cli", "train", "--nproc", "2"], env)]
    else:
        rendezvous = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        argvs = [
            ([sys.executable, "-m", "trainer"], {**env, **rendezvous, "RANK": str(r), "LOCAL_RANK": str(r)})
            for r in range(2)
        ]
    procs = [spawn(argv, log=log, env=e, cwd=REPO_ROOT) for argv, e in argvs]
    try:
        for proc in procs:
            assert proc.wait(timeout=90) == 0, log.read_text()[-4000:]
    finally:
        for proc in procs:
            stop_process_group(proc)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|: the largest difference relative to the array's scale."""
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


@pytest.mark.parametrize(
    ("batch_size", "stops"),
    [
        # odd: shards of 17 and 16 rows; stopped at step 10 and resumed, so rank 0 must send the resumed
        # model and optimizer state to rank 1 (a rank with other Adam moments would drift apart from it)
        (33, [10, STEPS]),
        # fewer rows than ranks: rank 1 trains a stand-in with coefficient 0 (it must join the all-reduce)
        (1, [STEPS]),
    ],
)
def test_two_gloo_ranks_train_like_one_process_at_the_same_global_batch(
    batch_size: int,
    stops: list[int],
    redis_url: str,
    tmp_path: Path,
    make_settings: Callable[..., Any],
    make_client: Callable[..., TestClient],
    make_trainer: Callable[..., Any],
) -> None:
    """The same buffer, validation set, seed and global batch, 20 steps, every one a scoring step: the
    two runs draw the same rows, so visits, ordinals and the sampling sequence agree exactly, and
    everything computed in float32 agrees within a tolerance.

    Why a tolerance: with two ranks each parameter's gradient is two partial sums (over 17 and 16 rows
    of a 33-row batch), added by gloo's all-reduce, where one process sums the 33 rows in one matmul;
    float32 addition in another order differs by about 1e-7 relative per gradient entry. What
    accumulates: 20 AdamW steps on the slightly different gradients (Adam divides by sqrt(v), so a
    relative error in g is a relative error in the step, carried in the parameters), the per-sample ghost
    scores computed on those parameters and summed into the weights over 20 scoring steps, and the
    running losses. Measured here: model tensors, weights and score sums within 3e-7 relative of their
    scale. The test allows 1e-4: two orders of margin, and still far below a real error (a loss not
    scaled by N moves the model by 6%, through Adam's epsilon and the gradient clip; a shard dropped
    fails the scorer; shards gathered out of order mix up the scores)."""
    knobs = {**KNOBS, "batch_size": batch_size}
    for name in ("one", "ddp"):
        _post(make_client(make_settings(redis_prefix=name, model="mlp", model_params=MLP)))
    one = make_trainer(redis_prefix="one", data_dir=tmp_path / "one", max_steps=STEPS, **knobs)
    assert one.run() == 0 and one.step == STEPS

    log = tmp_path / "ddp.log"
    for i, max_steps in enumerate(stops):
        env = datadiet_env(
            redis_url=redis_url,
            redis_prefix="ddp",
            data_dir=str(tmp_path / "ddp"),
            model="mlp",
            model_config=json.dumps(MLP),
            max_steps=str(max_steps),
            **{k: str(v) for k, v in knobs.items()},
        )
        _run_two_ranks(env, log, via_cli=batch_size > 1 and i == 0)
    text = log.read_text()
    assert text.count("data-parallel: 2 ranks (gloo)") == len(stops), text[-3000:]
    if len(stops) > 1:
        assert "resumed from checkpoint v1 at step 10" in text, text[-3000:]

    (model1, s1), (model2, s2) = _final(tmp_path / "one"), _final(tmp_path / "ddp")
    assert s1.step == s2.step == STEPS
    for col in ("ordinal", "alive", "visits"):  # the same draws and scorings, exactly
        np.testing.assert_array_equal(s1.table_arrays[col], s2.table_arrays[col], err_msg=col)
    assert int(s2.table_arrays["visits"].sum()) > 0
    assert model1.keys() == model2.keys()
    for name, tensor in model1.items():
        moved = _rel(model2[name].numpy(), tensor.numpy())
        assert moved < 1e-4, f"{name}: {moved:.2e} relative"
    for col in ("weight", "bilevel_score_sum", "bilevel_evidence"):
        diff = _rel(s2.table_arrays[col].astype(np.float64), s1.table_arrays[col].astype(np.float64))
        assert diff < 1e-4, f"{col}: {diff:.2e} relative"
    assert s1.info["train_loss"] == pytest.approx(s2.info["train_loss"], rel=1e-4)
    assert s1.info["val_loss"] == pytest.approx(s2.info["val_loss"], rel=1e-4)
    # and what agents read: the published source weights
    w1 = make_client(make_settings(redis_prefix="one")).get("/v1/weights").json()["sources"]
    w2 = make_client(make_settings(redis_prefix="ddp")).get("/v1/weights").json()["sources"]
    assert w1.keys() == w2.keys() == {"clean", "noisy"}
    for source, weight in w1.items():
        assert w2[source] == pytest.approx(weight, rel=1e-4), source


def test_train_nproc_must_be_a_positive_count() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "train", "--nproc", "0"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=datadiet_env(),
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "datadiet train: error: argument --nproc: must be in [1, 1024], got 0"
    )


def test_train_nproc_refuses_a_per_batch_rule_in_one_line_before_starting_torchrun() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "train", "--nproc", "2"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=datadiet_env(reweight="rholoss"),
        timeout=60,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "datadiet: DATADIET_REWEIGHT=rholoss re-weights each batch between its forward and backward, "
        "which torchrun ranks do not support yet: run one trainer process (no --nproc)"
    ]


def test_train_nproc_stopped_with_sigterm_exits_0_after_the_ranks_write_a_final_checkpoint(
    redis_url: str, tmp_path: Path, make_settings: Callable[..., Any], make_client: Callable[..., TestClient]
) -> None:
    """A supervisor stops ``datadiet train --nproc 2`` as it stops one trainer: SIGTERM, then a clean exit
    (0) once both ranks have finished their step and rank 0 has published a final checkpoint; a rank's
    own failure status would be the command's (not torchrun's blanket 1)."""
    import re
    import signal

    from tests.trainer.conftest import wait_for

    api = make_client(make_settings(model="mlp", model_params=MLP))
    _post(api)
    log = tmp_path / "ddp.log"
    env = datadiet_env(
        redis_url=redis_url,
        data_dir=str(tmp_path / "ddp"),
        model="mlp",
        model_config=json.dumps(MLP),
        checkpoint_every="25",
        torch_threads="1",
    )
    proc = spawn([sys.executable, "-m", "app.cli", "train", "--nproc", "2"], log=log, env=env, cwd=REPO_ROOT)
    try:
        wait_for(lambda: "published checkpoint" in log.read_text(), 120, "the ranks' first checkpoint", log)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    finally:
        stop_process_group(proc)
    text = log.read_text()
    assert "stopped by SIGTERM; the ranks have finished" in text and "Traceback" not in text, text[-3000:]
    signalled = text.index("signal 15: ")
    if "nothing trained since the last checkpoint" not in text[signalled : signalled + 100]:
        assert signalled < text.rindex("published checkpoint"), text[-3000:]  # the final one
    version, step = re.findall(r"published checkpoint v(\d+) at step (\d+)", text)[-1]
    _, state = _final(tmp_path / "ddp")  # the newest row is the final checkpoint, with its trainer state
    assert state.step == int(step) and f"v{int(version):08d}" in text
