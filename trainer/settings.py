"""The trainer's settings: the shared ``DATADIET_*`` settings plus the learning loop's knobs.

Every default here is the one the benchmarks (bench/trainer_cost.py, bench/quality.py) use.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field

from store.config import Settings


class TrainerSettings(Settings):
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the model trains: auto is CUDA when a GPU is visible, else the CPU"
    )
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch; 0: one less than the cores, 1-8")
    batch_size: int = Field(
        64, ge=1, description="samples per training step (the global batch, over all ranks)"
    )
    lr: float = Field(2e-3, gt=0, description="AdamW's learning rate (the score's -lr <grad loss_i, G_val>)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW's decoupled weight decay")
    grad_clip: float = Field(1.0, gt=0, description="the step's gradient is clipped to this global L2 norm")
    warmup_lr_steps: int = Field(50, ge=0, description="linear learning-rate warm-up")
    reset_optimizer_on_validation_change: bool = Field(
        True, description="clear the optimizer's moments when a new validation set (a new task) arrives"
    )

    # outer loop (see trainer/weighting/bilevel.py for the rule and its knobs)
    outer_every: int = Field(1, ge=1, description="score the batch every k-th step")
    val_batch_size: int = Field(
        64, ge=1, description="validation samples per refresh of the validation gradient G_val"
    )
    val_grad_every: int = Field(
        4, ge=1, description="refresh the running validation gradient every k scorings"
    )
    val_grad_beta: float = Field(0.5, ge=0, lt=1, description="running average of the validation gradient")
    unscored_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of a batch reserved for the unscored queue (samples scored < min_visits times)",
        validation_alias=AliasChoices(
            "DATADIET_UNSCORED_FRACTION", "DATADIET_FRESH_FRACTION", "unscored_fraction"
        ),
    )
    max_unscored: int = Field(
        1_000_000,
        ge=1,
        description="bound on the unscored queue: past it, a random subsample of well-estimated sources' "
        "queued samples stays queued, the rest are drawn by their source's weight. Off in effect by "
        "default: 4,096 cost exact match on the noisy stream posted up front (0.61 vs 0.77, 3 seeds)",
    )
    source_scoring_target: int = Field(
        200, ge=0, description="a source (cohort) with fewer scored samples keeps all its samples queued"
    )
    weighted_scoring: bool = Field(
        True,
        description="queued samples of a source with source_scoring_target samples scored are scored in "
        "proportion to their weight (the rest are drawn by weight, unqueued): trainer/sampler.py",
    )
    split_importance: bool = Field(
        False,
        description="normalise the importance weights of a batch's queued and drawn halves separately, each "
        "to its share: on the redundancy stream at 4x, 0.136 -> 0.550 exact match, but on the noisy stream "
        "seed 0 fell from 0.74-0.86 to 0.600 in two runs, so it is off by default (trainer/sampler.py)",
    )
    min_visits: int = Field(
        3, ge=1, description="a sample stays in the priority queue until scored this often"
    )
    explore: float = Field(0.05, ge=0, le=1, description="uniform floor mixed into the sampling distribution")
    reweight_every: int = Field(10, ge=1, description="recompute every sample's weight every k steps")

    # bilevel weighting rule
    warmup_steps: int = Field(150, ge=0, description="steps before the learned weights take full effect")
    scale_beta: float = Field(0.05, gt=0, le=1, description="running average of the score's spread")
    source_horizon: float = Field(
        1000.0, gt=1, description="a source's score averages over about its last this-many scored samples"
    )
    source_prior_samples: float = Field(
        100.0, gt=0, description="a source's score is shrunk toward 0 until it has about this many samples"
    )
    source_scale: float = Field(
        24.0, ge=0, description="logit per unit of a source's mean score, in units of the per-sample spread"
    )
    sample_scale: float = Field(
        1.0, ge=0, description="weight of a sample's own mean score against its source's (docs/weighting.md)"
    )
    sample_prior_visits: float = Field(
        2.0, gt=0, description="the least prior weight (in visits) on a sample's own mean score"
    )
    max_logit: float = Field(
        4.0,
        gt=0,
        description="the source and the sample parts of a weight's logit are each clipped to +-this",
    )
    teacher: bool = Field(
        True,
        description="weight each sample by the probability that its target is right, from models trained "
        "on the validation set (trainer/weighting/teacher.py)",
    )
    teacher_calibrate_every: int = Field(
        50,
        ge=1,
        description="steps between the teacher's calibrations against the current model (each one is a "
        "forward pass over ~3x the validation set: trainer/weighting/teacher.py)",
    )
    teacher_scale: float = Field(
        1.0, ge=0, description="the teacher's log-probability's factor in a sample's logit (1: weight x P)"
    )
    familiar_quantile: float = Field(
        0.0,
        ge=0,
        le=1,
        description="a source whose samples' first losses lie below this quantile of unseen validation "
        "items' losses more often than the mix's is penalised as redundant (trainer/weighting/teacher.py "
        "familiarity); 0 (the default): off. At 0.05 the demo's good agent, whose right answers recur, "
        "once fell below its sloppy one",
    )
    share_copies: Literal["excess", "all", "none"] = Field(
        "excess",
        description="excess: the copies a source posts beyond the other sources' rate of that content "
        "share one weight (trainer/weighting/base.py shared_weights); all: every copy shares; none: off",
    )

    # I/O
    publish_every_s: float = Field(
        2.0, gt=0, description="seconds between publications of the weights (GET /v1/weights) and the status"
    )
    publish_tolerance: float = Field(
        0.01,
        ge=0,
        description="a sample's published weight is rewritten in Redis when its weight moved by more than "
        "this fraction (relative): what GET /v1/weights/samples serves is within it of the trainer's; "
        "0 rewrites every change",
    )
    publish_max_rows: int = Field(
        100_000,
        ge=1,
        description="per-sample weights written to Redis a publish at most, the largest relative moves "
        "first (the rest follow in later publishes): bounds a publish's time (Redis rewrites a weight "
        "in ~2-10 us), e.g. a restarted trainer's first publish of a million samples",
    )
    progress_every_s: float = Field(5.0, gt=0, description="seconds between the trainer's progress log lines")
    validation_check_every: int = Field(10, ge=1, description="steps between checks for a new validation set")
    payload_cache: int = Field(50_000, ge=0)
    read_count: int = Field(5_000, ge=1, description="stream entries read per poll")
    claim_idle_ms: int = Field(
        60_000, ge=1, description="stream entries pending this long on another consumer are taken over (ms)"
    )
    consumer: str = "trainer-0"

    # idling: a buffer that no longer changes is not trained on forever (trainer/idle.py)
    idle_patience: int = Field(
        300,
        ge=0,
        description="steps without a validation-loss improvement (of idle_min_delta) after which a trainer "
        "with no new samples for idle_after_s idles until samples or a new validation set arrive; 0: "
        "never idle. A run with DATADIET_MAX_STEPS never idles",
    )
    idle_after_s: float = Field(
        30.0, ge=0, description="seconds without a new sample before the trainer watches for a plateau"
    )
    idle_min_delta: float = Field(
        1e-3, ge=0, description="the least fall of the validation loss that counts as an improvement"
    )

    # the trainer's own Prometheus metrics (trainer/metrics.py)
    trainer_metrics_port: int = Field(
        0, ge=0, le=65535, description="port of the trainer's /metrics (prometheus_client); 0: off"
    )
    trainer_metrics_host: str = Field(
        "127.0.0.1", description="address the trainer's metrics port binds to (0.0.0.0: every interface)"
    )

    # retention
    keep_checkpoints: int = Field(
        5,
        ge=1,
        description="published checkpoints kept (the newest; an older one is deleted once no download "
        "has streamed it for 10 minutes, the time a Range request may still resume one)",
    )
    keep_weight_snapshots: int = Field(10_000, ge=1, description="weight-history rows kept in SQL")

    # faults
    lease_ttl_s: float = Field(
        30.0,
        gt=0,
        description="seconds the trainer lease lasts unrenewed: how soon a second trainer "
        "takes over from one that hung (one that died on this host is taken over at once)",
    )
    lease_wait: bool = Field(
        True, description="a second trainer waits for the lease; false: it exits with status 75 at once"
    )
    max_backoff_s: float = Field(
        30.0, gt=0, description="the longest wait between retries of an unavailable Redis or database"
    )
