"""One run of the quality benchmark (bench/quality.py): one scenario, one method, one seed, through the real
pipeline, and the metrics read back over HTTP.

A run starts its own redis-server, the API (uvicorn, one worker) and the trainer (``python -m trainer``)
on a SQLite database in a scratch directory; posts the validation set and the method's training stream
with the client; polls ``/v1/weights`` while the trainer runs to ``DATADIET_MAX_STEPS``; then reads the
checkpoints' metrics, pulls the final checkpoint for the held-out test set and fetches every posted
sample's weight (a random 50,000 of them on longer streams). Drift runs PUT ``validation_v2`` and post the
rest of the stream once the trainer has passed ``switch_step``. A run with a stream ``rate`` posts its
stream as the trainer goes (bench/quality_stream.py) instead of all of it up front. Every run records the
trainer's unscored backlog (``trainer.unscored`` in ``GET /v1/stats``, where the trainer publishes it).

Methods that are not weighting rules are realised by what is posted, trained uniformly:
``random`` (a random subset of the stream, as large as bilevel's effective fraction of it), ``val-only``
(the validation set as the training stream) and ``oracle`` (the stream without corrupted samples and
without the flood source).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.demo.scenarios import Scenario, build_scenario
from app.demo.tasks import exact_match
from bench.quality_stream import BATCH_SIZE, Pacer, Posted, paced_share, rate_label, training_stream
from datadiet import Client
from store.processes import datadiet_env, spawn, start_api_process, start_redis_server, stop_process_group
from trainer import load_checkpoint

TRAINER_METHOD = {
    "random": "uniform",
    "val-only": "uniform",
    "oracle": "uniform",
    "bilevel-hypergrad": "bilevel",
    "bilevel-queue-all": "bilevel",
    "bilevel-cheap": "bilevel",
    "bilevel-lean": "bilevel",
}
EXTRA_SETTINGS = {
    # Learning to Reweight Examples uses a fresh validation gradient every step (no running average)
    "l2rw": {"val_grad_every": "1", "val_grad_beta": "0"},
    # an ablation: bilevel on the one-step hypergradient score alone, without the trusted-set teacher
    "bilevel-hypergrad": {"teacher": "false"},
    # an ablation: every queued sample scored, whatever its source's weight (issue 12 item 1 before)
    "bilevel-queue-all": {"weighted_scoring": "false"},
    # issue 14's cheaper outer loop: score every other step, the validation gradient every 16 steps, the
    # teacher calibrated every 100
    "bilevel-cheap": {"outer_every": "2", "val_grad_every": "8", "teacher_calibrate_every": "100"},
    # ... and without halving the scoring: every step scored, the rest as above
    "bilevel-lean": {"val_grad_every": "8", "teacher_calibrate_every": "100"},
}
POLL_S = 0.5
PACED_PUBLISH_S = "0.25"  # paced runs: the trainer publishes its step this often (default 2 s), for the pacer
MAX_WEIGHED = 50_000  # posted samples whose final weight is fetched (a seeded random subset beyond)
REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class RunSpec:
    scenario: str
    method: str
    seed: int
    steps: int
    checkpoint_every: int
    n_stream: int
    switch_step: int | None = None  # drift: the trainer step after which validation_v2 is PUT
    keep_fraction: float | None = None  # random: the share of the stream posted
    rate: float | None = None  # new samples per step / batch size (quality_stream.py); None: all up front

    @property
    def rate_label(self) -> str:
        return rate_label(self.rate)

    @property
    def plot_name(self) -> str:
        """The scenario, with the rate where it is not ``all`` (``noisy-4x``): plots are drawn per name."""
        return self.scenario if self.rate is None else f"{self.scenario}-{self.rate_label}"


@dataclass
class RunResult:
    spec: RunSpec
    test_acc: float = math.nan
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss) per checkpoint
    effective_fraction: float = math.nan
    auc_sample: float = math.nan
    auc_content: float = math.nan
    auc_unique: float = math.nan  # auc_sample without the flood's copies (where the scenario has a flood)
    spearman: float = math.nan
    sources: dict[str, float] = field(default_factory=dict)  # final published source weights
    source_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    switched_at: int | None = None  # drift: the last checkpoint step on the old validation set
    pre_switch_loss: float = math.nan  # drift: the old task's validation loss at that checkpoint
    curve_v2: list[tuple[int, float]] = field(default_factory=list)  # drift: new task's validation loss
    recovery_steps: float = math.nan  # drift: see recovery()
    n_posted: int = 0
    flood_share: float = math.nan  # the flood source's final share of the weight mass (its source weight)
    flood_sample_share: float = math.nan  # the flood's share of the samples posted
    flood_distinct_share: float = math.nan  # the flood's items' share of the distinct items posted
    flood_groups_per_item: float = math.nan  # content groups the service sees per flood item
    backlog: list[tuple[int, int]] = field(default_factory=list)  # (step, trainer.unscored) as published
    backlog_max: float = math.nan  # nan where the trainer does not publish it
    backlog_bound: float = math.nan  # the trainer's DATADIET_MAX_UNSCORED default, where it has one
    arrivals: list[tuple[int, int]] = field(default_factory=list)  # paced: (step, samples posted)
    min_lead: float = math.nan  # paced: fewest steps' worth of stream ahead of the trainer (< 0: behind)
    status_gap: int = 0  # paced: the largest step jump between two reads of the trainer's status
    pauses: int = 0  # paced: times the trainer was stopped to wait for the stream
    paused_s: float = 0.0
    exhausted_at: int | None = None  # paced: the step at which the stream ran out, if before the end
    wall_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds from the run's start to each phase
    error: str | None = None
    weights: np.ndarray | None = None  # per posted sample, for the histograms (not saved)
    positive: np.ndarray | None = None  # per posted sample: clean (or, for drift, of the new task)

    def summary(self) -> dict[str, Any]:
        skip = {"weights", "positive", "spec"}
        out = {k: v for k, v in self.__dict__.items() if k not in skip}
        return {**self.spec.__dict__, **out}


def snapshot_code(dest: Path) -> str:
    """Copy the service's packages (app, store, trainer) to ``dest``, so colleagues' edits during a long
    benchmark do not reach its processes; returns a short hash of the copied trainer package."""
    h = hashlib.sha256()
    for pkg in ("app", "store", "trainer"):
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in sorted((dest / "trainer").rglob("*.py")):
        h.update(str(path.relative_to(dest)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:10]


def run(spec: RunSpec, workdir: Path, code: Path | None = None) -> RunResult:
    """Run ``spec`` in ``workdir/<scenario>-<rate>-<method>-<seed>`` (removed afterwards), its API and
    trainer importing the packages under ``code`` (a snapshot_code copy; None: this checkout); never
    raises."""
    result = RunResult(spec)
    run_dir = workdir / f"{spec.scenario}-{spec.rate_label}-{spec.method}-{spec.seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    t0 = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    redis = None
    try:
        redis = start_redis_server(run_dir / "redis")
        _run(spec, run_dir, redis.url, code, procs, result)
    except Exception as e:  # a failed run is reported in the table, the benchmark goes on
        logs = "".join(_tail(run_dir / name) for name in ("trainer.log", "api.log"))
        result.error = f"{type(e).__name__}: {e}\n{logs}"
    finally:
        for proc in procs:
            stop_process_group(proc)
        if redis is not None:
            redis.stop()
        result.wall_s = time.monotonic() - t0
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _tail(path: Path, n: int = 2000) -> str:
    return f"--- {path.name}:\n{path.read_text(errors='replace')[-n:]}\n" if path.exists() else ""


def _run(
    spec: RunSpec,
    run_dir: Path,
    redis_url: str,
    code: Path | None,
    procs: list[subprocess.Popen[bytes]],
    result: RunResult,
) -> None:
    scn = build_scenario(spec.scenario, spec.seed)
    paced = spec.rate is not None and spec.method != "val-only"
    env = datadiet_env(
        redis_url=redis_url,
        data_dir=str(run_dir / "data"),
        database_url=f"sqlite:///{run_dir / 'meta.db'}",
        model=scn.model,
        model_config=json.dumps(scn.model_config),
        reweight=TRAINER_METHOD.get(spec.method, spec.method),
        max_steps=str(spec.steps),
        checkpoint_every=str(spec.checkpoint_every),
        seed=str(spec.seed),
        torch_threads="1",
        batch_size=str(BATCH_SIZE),
        **({"publish_every_s": PACED_PUBLISH_S} if paced else {}),
        **EXTRA_SETTINGS.get(spec.method, {}),
    )
    if code is not None:  # the snapshot comes before the editable install's finder on the import path
        env["PYTHONPATH"] = str(code)
    t0 = time.monotonic()
    api, url = start_api_process(env, log=run_dir / "api.log", cwd=run_dir, timeout=120)
    procs.append(api)
    result.phases["api_ready"] = time.monotonic() - t0
    stream = training_stream(scn, spec.method, spec.seed, spec.n_stream, spec.keep_fraction, paced)
    posted = Posted()
    with Client(url, timeout=60) as client:
        client.set_validation(scn.validation)
        trainer = spawn([sys.executable, "-m", "trainer"], log=run_dir / "trainer.log", env=env, cwd=run_dir)
        procs.append(trainer)
        pacer: Pacer | None = None
        rest: list[dict[str, Any]] = []
        if isinstance(stream, tuple):
            first, rest = stream
            client.post_samples(first, batch_size=2000)  # while the trainer imports torch
            posted.add(first, scn)
        else:
            assert spec.rate is not None
            share = paced_share(scn, spec.method, spec.keep_fraction)
            per_step = spec.rate * BATCH_SIZE * share
            pacer = Pacer(client, stream, per_step, math.ceil(spec.n_stream * share), trainer, scn, posted)
            pacer.fill()  # while the trainer imports torch
        result.phases["posted"] = time.monotonic() - t0
        try:
            _follow(client, trainer, scn, spec, pacer, rest, posted, result)
        finally:
            if pacer is not None:
                pacer.resume()  # never leave the trainer stopped
        if trainer.returncode != 0:
            raise RuntimeError(f"the trainer exited with {trainer.returncode}")
        result.phases["trained"] = time.monotonic() - t0
        _measure(client, scn, spec, posted, run_dir, result)
        result.phases["measured"] = time.monotonic() - t0


def _follow(
    client: Client,
    trainer: subprocess.Popen[bytes],
    scn: Scenario,
    spec: RunSpec,
    pacer: Pacer | None,
    rest: list[dict[str, Any]],
    posted: Posted,
    result: RunResult,
) -> None:
    """Until the trainer exits: its step and unscored backlog (``/v1/stats``), the source weights
    (``/v1/weights``, every POLL_S), the paced stream, the drift switch."""
    switched = not rest
    deadline = time.monotonic() + RUN_TIMEOUT_S
    next_weights = 0.0
    last_step = -1
    while trainer.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the trainer did not finish {spec.steps} steps in {RUN_TIMEOUT_S:.0f}s")
        t = client.stats()["trainer"]
        step = int(t.get("step") or 0)
        if step != last_step:
            last_step = step
            if isinstance(t.get("unscored"), int):  # published by trainers that bound their backlog
                result.backlog.append((step, t["unscored"]))
            if pacer is not None:
                result.arrivals.append((step, len(posted)))
                short = len(posted) < pacer.per_step * spec.steps  # ran out before the budget's worth
                if pacer.exhausted and short and result.exhausted_at is None:
                    result.exhausted_at = step
        busy = pacer.keep_up(step) if pacer is not None else False
        if time.monotonic() >= next_weights:
            next_weights = time.monotonic() + POLL_S
            doc = client.weights()
            if doc.get("updated_at") and doc["sources"]:
                if not result.source_history or result.source_history[-1][0] != doc["step"]:
                    result.source_history.append((int(doc["step"]), dict(doc["sources"])))
                if not switched and spec.switch_step is not None and doc["step"] >= spec.switch_step:
                    client.set_validation(scn.validation_v2)  # the task changes ...
                    client.post_samples(rest, batch_size=2000)  # ... and so does the stream
                    posted.add(rest, scn)
                    switched = True
        if not busy:
            time.sleep(0.05 if pacer is not None else POLL_S)
    if pacer is not None:
        result.min_lead, result.pauses, result.paused_s = pacer.min_lead, pacer.pauses, pacer.paused_s
        result.status_gap = pacer.status_gap
    if trainer.returncode == 0 and not switched:
        raise RuntimeError("the trainer finished before the drift switch")


def _measure(
    client: Client,
    scn: Scenario,
    spec: RunSpec,
    posted: Posted,
    run_dir: Path,
    result: RunResult,
) -> None:
    checkpoints = sorted(client.checkpoints(), key=lambda c: c["step"])
    result.curve = [
        (c["step"], c["metrics"]["val_loss"]) for c in checkpoints if c["metrics"].get("val_loss")
    ]
    final = checkpoints[-1]
    assert final["step"] == spec.steps, final
    path = client.pull_checkpoint(run_dir / "final.safetensors", version=final["version"])
    model = load_checkpoint(path, sha256=final["sha256"])
    test = scn.test_v2 if scn.switch_at is not None else scn.test
    result.test_acc = exact_match(model.predict([s["input"] for s in test]), test)

    doc = client.weights()
    result.effective_fraction = float(doc["summary"]["effective_fraction"])
    result.sources = dict(doc["sources"])
    result.n_posted = len(posted)
    _flood(scn, posted, result)
    if result.backlog:
        result.backlog_max = max(n for _, n in result.backlog)
    result.backlog_bound = _unscored_bound()
    idx = np.arange(len(posted))
    if len(idx) > MAX_WEIGHED:  # a uniform subset estimates the same AUCs and rank correlation
        idx = np.sort(np.random.default_rng([spec.seed, 11]).choice(len(idx), MAX_WEIGHED, replace=False))
    got = client.sample_weights([posted.ids[i] for i in idx])
    idx = np.array([i for i in idx if posted.ids[i] in got], dtype=np.int64)
    w = np.array([got[posted.ids[i]] for i in idx], dtype=np.float64)
    positive = np.array(posted.positive, dtype=bool)[idx]
    groups = [posted.groups[i] for i in idx]
    sources = [posted.sources[i] for i in idx]
    result.weights, result.positive = w, positive
    if np.ptp(w) > 1e-6:  # else the rule keeps no per-sample weights: nothing to rank
        result.auc_sample = roc_auc(positive, w)
        result.auc_content = content_auc(groups, w, positive)
        unique = ~np.array(posted.flood, dtype=bool)[idx]
        if not unique.all():
            result.auc_unique = roc_auc(positive[unique], w[unique])
        result.spearman = source_spearman(sources, groups, w, scn.true_quality)
    if scn.switch_at is not None:
        _drift(client, scn, checkpoints, run_dir, result)


def _flood(scn: Scenario, posted: Posted, result: RunResult) -> None:
    """The flood's share of training (its final source weight: its share of the weight mass the trainer
    draws by), of the samples posted, and of the distinct items posted: each flood problem counts once,
    however its copies vary (a flood of ``pool`` problems in bursts of ``copies`` has posted
    min(pool, ceil(n / copies)) of them), every other distinct content group once."""
    floods = [s for s, _ in scn.sources if s.kind == "flood"]
    flood = np.array(posted.flood, dtype=bool)
    if not floods or not flood.any():
        return
    names = {s.name for s in floods}
    n_flood = int(flood.sum())
    items = sum(min(s.pool, math.ceil(n_flood / len(floods) / s.copies)) for s in floods)
    others = {g for g, f in zip(posted.groups, posted.flood, strict=True) if not f}
    copies = {g for g, f in zip(posted.groups, posted.flood, strict=True) if f}
    result.flood_share = sum(result.sources.get(n, 0.0) for n in names)
    result.flood_sample_share = n_flood / len(posted)
    result.flood_distinct_share = items / (items + len(others))
    result.flood_groups_per_item = len(copies) / items


def _unscored_bound() -> float:
    """The trainer's bound on its unscored queue (``DATADIET_MAX_UNSCORED``'s default), nan where the
    trainer has none."""
    from trainer.settings import TrainerSettings

    f = TrainerSettings.model_fields.get("max_unscored")
    return float(f.default) if f is not None and isinstance(f.default, int) else math.nan


def _drift(
    client: Client, scn: Scenario, checkpoints: list[dict[str, Any]], run_dir: Path, result: RunResult
) -> None:
    """Every checkpoint's loss on the new validation set; the switch; the steps to recover."""
    old = [
        c
        for c in checkpoints
        if c["metrics"].get("validation_version") == checkpoints[0]["metrics"].get("validation_version")
    ]
    result.switched_at = old[-1]["step"]
    result.pre_switch_loss = float(old[-1]["metrics"]["val_loss"])
    for c in checkpoints:
        if c["step"] < result.switched_at:
            continue
        path = client.pull_checkpoint(run_dir / "ckpt.safetensors", version=c["version"])
        loss = float(np.mean(load_checkpoint(path, sha256=c["sha256"]).loss(scn.validation_v2)))
        result.curve_v2.append((c["step"], loss))
    result.recovery_steps = recovery(result.curve_v2, result.switched_at, result.pre_switch_loss)


RECOVERY_TOLERANCE = 1.10


def recovery(curve_v2: list[tuple[int, float]], switch_step: int, pre_switch_loss: float) -> float:
    """Steps from the last checkpoint on the old validation set until the new task's validation loss is
    back within 10% of the old task's validation loss at that checkpoint (L_v2 <= 1.1 L_v1(pre-switch));
    inf when it never is within the run."""
    for step, loss in curve_v2:
        if step > switch_step and loss <= RECOVERY_TOLERANCE * pre_switch_loss:
            return float(step - switch_step)
    return math.inf


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties half; nan without both classes or
    when every score is the same (a rule with no per-sample weights)."""
    if positive.all() or not positive.any() or np.ptp(scores) <= 1e-9 * max(1.0, float(np.abs(scores).max())):
        return math.nan
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, scores))


def content_auc(groups: list[str], w: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC over distinct content: copies (the service's content group: same input up to case and
    whitespace, or vectors with the same SimHash, and the same target) count once, with the sum of
    their weights, which is the share of training the content gets."""
    index: dict[str, int] = {}
    idx = np.array([index.setdefault(g, len(index)) for g in groups], dtype=np.int64)
    mass = np.bincount(idx, weights=w, minlength=len(index))
    label = np.zeros(len(index), dtype=bool)
    label[idx] = positive  # copies share the label: the target is part of the content
    return roc_auc(label, mass)


def source_spearman(sources: list[str], groups: list[str], w: np.ndarray, quality: dict[str, float]) -> float:
    """Spearman's rho between each source's weight per distinct content item (its weight mass over its
    number of content groups: a flood of copies is one item per problem) and its true quality; nan when
    either is constant."""
    mass: dict[str, float] = defaultdict(float)
    items: dict[str, set[str]] = defaultdict(set)
    for src, g, wi in zip(sources, groups, w, strict=True):
        mass[src] += float(wi)
        items[src].add(g)
    names = [n for n in quality if n in mass]
    per_item = [mass[n] / len(items[n]) for n in names]
    q = [quality[n] for n in names]
    if len(names) < 3 or np.ptp(q) == 0 or np.ptp(per_item) <= 1e-9:
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr(per_item, q).statistic)
