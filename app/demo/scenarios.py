"""Scenarios: a task, a trusted validation set, a held-out test set and a stream of agents' samples.

Each builder returns a :class:`Scenario`; ``build_scenario(name, seed)`` picks one by name:

| name | stream | what it tests |
|---|---|---|
| ``noisy`` | clean-a 25%, clean-b 15%, noisy-50 35%, noisy-90 25% | 40% of samples answer wrongly |
| ``noisy-carry`` | the same, every wrong answer one consistent carry slip | a competing rule |
| ``redundancy`` | clean-a, clean-b, and a flood of 20 problems at 10x each one's volume | copies |
| ``misaligned`` | clean-a 40%, clean-b 30%, offtask 30% (``ABSDIFF`` on the same prompts) | a conflict |
| ``drift`` | agent-a 60%, agent-b 40%; ``ADD`` then ``ADD_REVERSED`` from ``switch_at`` on | a task change |
| ``digits`` | clean 20%, noisy-60 30%, offtask 30% (digit + 1), flood 20% (``mlp`` kind) | all, on images |
| ``demo`` | agent-good, agent-sloppy, agent-spammy, agent-offtask | ``datadiet demo`` |
| ``redundancy@L`` | ``redundancy``, the flood's copies varied at level L (``vary_text``) | near-copies |
| ``digits-flood@L`` | ``redundancy``'s mix on digits, pixel noise of std L on every copy | near-copies |

The ``@L`` scenarios are the flood-noise sweep (``FLOOD_SWEEP``): L = 0 posts exact copies, and the
largest level makes copies about as far apart as distinct items (digits) or almost every copy a distinct
string (text). Their sample ids write ``@`` as ``-at-`` (ids allow no ``@``).

Problems are split once per scenario seed into 100 validation, 500 test and a pool for the stream, with
no overlap. Validation and test samples are clean. Every sample's ``meta`` carries the ground truth
(``corrupted``, ``kind``, ``task``) for the benchmark; the service never reads it.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.demo.tasks import (
    ABSDIFF,
    ADD,
    ADD_CARELESS,
    ADD_REVERSED,
    ArithmeticTask,
    Source,
    Task,
    load_digits_tasks,
    make_sample,
)

N_VALIDATION = 100
N_TEST = 500
_CHUNK = 4096  # stream draws sources this many at a time
TINY_GPT: dict[str, Any] = {"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 64}
MLP_DIGITS: dict[str, Any] = {"n_features": 64, "n_classes": 10}


@dataclass(frozen=True, eq=False)
class Scenario:
    """A task for the service to learn, and the agents that stream samples of it.

    ``sources`` pairs each source with its share of the stream's volume (shares sum to 1). ``pool``
    holds the problems the stream draws from, disjoint from the validation and test problems. For
    drift, the stream switches to ``task_v2`` at sample index ``switch_at``; ``validation_v2`` is what
    the benchmark PUTs at the switch, and ``test_v2`` measures the new task.
    """

    name: str
    model: str
    model_config: dict[str, Any]
    sources: list[tuple[Source, float]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    task: Task
    pool: np.ndarray
    offtask: Task | None = None
    seed: int = 0
    switch_at: int | None = None
    task_v2: Task | None = None
    validation_v2: list[dict[str, Any]] = field(default_factory=list)
    test_v2: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [s.name for s, _ in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"scenario {self.name}: source names repeat: {names}")
        shares = [share for _, share in self.sources]
        if min(shares) <= 0 or not math.isclose(sum(shares), 1.0, abs_tol=1e-9):
            raise ValueError(f"scenario {self.name}: shares must be positive and sum to 1, got {shares}")
        if self.offtask is None and any(s.kind == "offtask" for s, _ in self.sources):
            raise ValueError(f"scenario {self.name}: an offtask source needs an offtask task")
        if (self.switch_at is None) != (self.task_v2 is None):
            raise ValueError(f"scenario {self.name}: switch_at and task_v2 go together")

    @property
    def true_quality(self) -> dict[str, float]:
        """Each source's expected fraction of samples that are correct for the main task."""
        return {s.name: s.true_quality for s, _ in self.sources}

    @property
    def corrupted_fraction(self) -> float:
        """The expected fraction of stream samples that are wrong for the main task."""
        return sum(share * s.corrupted_fraction for s, share in self.sources)

    def stream(self, n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
        """``n`` samples, each from a source drawn by share; deterministic for (scenario seed, seed).

        ``stream(n, seed)`` is a prefix of ``stream(m, seed)`` for ``m > n``. Ids are
        ``<scenario>:<source>:<seed>:<k>`` for the source's k-th sample, unique within a stream.
        """
        rng = np.random.default_rng([self.seed, seed])
        shares = np.array([share for _, share in self.sources])
        cdf = np.cumsum(shares / shares.sum())
        feeds = [
            _Feed(
                self, source, seed, np.random.default_rng([self.seed, seed, zlib.crc32(source.name.encode())])
            )
            for source, _ in self.sources
        ]
        t = 0
        while t < n:
            # sources by share, drawn in chunks: a long stream costs no memory up front, and chunking
            # does not change the draws, so shorter streams are prefixes of longer ones
            picks = np.minimum(cdf.searchsorted(rng.random(min(_CHUNK, n - t)), side="right"), len(cdf) - 1)
            for j in picks.tolist():
                switched = self.switch_at is not None and t >= self.switch_at
                yield feeds[j].next(self.task_v2 if switched and self.task_v2 is not None else self.task)
                t += 1


class _Feed:
    """One source's samples in one stream: its counter, its random state and, for a flood, its pool."""

    def __init__(self, scenario: Scenario, source: Source, seed: int, rng: np.random.Generator) -> None:
        self.scenario, self.source, self.rng, self.k = scenario, source, rng, 0
        self.prefix = f"{_id_name(scenario.name)}:{source.name}:{seed}"
        self.flood_pool = rng.choice(scenario.pool, size=source.pool, replace=False) if source.pool else None

    def next(self, task: Task) -> dict[str, Any]:
        src, rng, pool = self.source, self.rng, self.scenario.pool
        sample_id = f"{self.prefix}:{self.k}"
        if self.flood_pool is not None:
            problem = int(self.flood_pool[(self.k // src.copies) % len(self.flood_pool)])
            out = make_sample(
                sample_id,
                src.name,
                task.near_duplicate(problem, rng, src.copy_noise),
                task.target_of(problem),
                "flood",
                False,
                task.name,
            )
        elif src.kind == "offtask":
            off = self.scenario.offtask
            assert off is not None  # checked by Scenario.__post_init__
            problem = int(pool[rng.integers(len(pool))])
            while off.target_of(problem) == task.target_of(problem):  # keep only conflicting answers
                problem = int(pool[rng.integers(len(pool))])
            out = make_sample(
                sample_id, src.name, off.input_of(problem), off.target_of(problem), "offtask", True, off.name
            )
        else:
            problem = int(pool[rng.integers(len(pool))])
            wrong = src.kind == "noisy" and rng.random() < src.noise
            target = task.wrong_target(problem, rng) if wrong else task.target_of(problem)
            out = make_sample(sample_id, src.name, task.input_of(problem), target, src.kind, wrong, task.name)
        self.k += 1
        return out


def _split(n_problems: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(validation, test, stream pool) problems: a seeded permutation cut in three, no overlap."""
    perm = np.random.default_rng([seed, 0]).permutation(n_problems)
    return perm[:N_VALIDATION], perm[N_VALIDATION : N_VALIDATION + N_TEST], perm[N_VALIDATION + N_TEST :]


def _id_name(scenario: str) -> str:
    """The scenario's name as sample ids write it (ids allow letters, digits and ``._:-``)."""
    return scenario.replace("@", "-at-")


def _held_out(scenario: str, part: str, seed: int, task: Task, problems: np.ndarray) -> list[dict[str, Any]]:
    """Clean samples of ``problems`` with ids ``<scenario>:<part>:<seed>:<i>``."""
    return [
        make_sample(
            f"{_id_name(scenario)}:{part}:{seed}:{i}",
            part,
            task.input_of(int(p)),
            task.target_of(int(p)),
            "clean",
            False,
            task.name,
        )
        for i, p in enumerate(problems)
    ]


def _text_scenario(
    name: str,
    seed: int,
    sources: list[tuple[Source, float]],
    *,
    offtask: Task | None = None,
    switch_at: int | None = None,
    task_v2: Task | None = None,
    task: ArithmeticTask = ADD,
) -> Scenario:
    val, test, pool = _split(task.n_problems, seed)
    v2 = (
        {}
        if task_v2 is None
        else {
            "validation_v2": _held_out(name, "validation-v2", seed, task_v2, val),
            "test_v2": _held_out(name, "test-v2", seed, task_v2, test),
        }
    )
    return Scenario(
        name=name,
        model="tiny-gpt",
        model_config=dict(TINY_GPT),
        sources=sources,
        validation=_held_out(name, "validation", seed, task, val),
        test=_held_out(name, "test", seed, task, test),
        task=task,
        pool=pool,
        offtask=offtask,
        seed=seed,
        switch_at=switch_at,
        task_v2=task_v2,
        **v2,
    )


NOISY_SOURCES = [
    (Source.clean("clean-a"), 0.25),
    (Source.clean("clean-b"), 0.15),
    (Source.noisy("noisy-50", 0.5), 0.35),
    (Source.noisy("noisy-90", 0.9), 0.25),
]


def noisy_scenario(seed: int = 0) -> Scenario:
    """Four sources, two of them sloppy: 0.35 * 0.5 + 0.25 * 0.9 = 0.40 of all samples are wrong, each
    wrong answer a careless slip (off by one or ten at random, ``ADD_CARELESS``)."""
    return _text_scenario("noisy", seed, NOISY_SOURCES, task=ADD_CARELESS)


def noisy_carry_scenario(seed: int = 0) -> Scenario:
    """The same sources, but every wrong answer is the same consistent carry slip (``ADD``): a competing
    rule rather than noise. No score can tell it from the right rule before the model has begun to learn
    the carry, so it needs a longer budget, and even then it is a hard case (README, Quality)."""
    return _text_scenario("noisy-carry", seed, NOISY_SOURCES)


def redundancy_scenario(seed: int = 0, copy_noise: float | None = None) -> Scenario:
    """Two clean sources, and a third re-posting 20 problems at ten times each one's volume; ``copy_noise``
    (``redundancy@L``): its copies varied at that level (``vary_text``), else the default copies."""
    return _text_scenario(
        "redundancy" if copy_noise is None else f"redundancy@{copy_noise:g}",
        seed,
        _flood_sources(copy_noise),
    )


def _flood_sources(copy_noise: float | None) -> list[tuple[Source, float]]:
    return [
        (Source.clean("clean-a"), 1 / 12),
        (Source.clean("clean-b"), 1 / 12),
        (Source.flood("flood", pool=20, copies=50, copy_noise=copy_noise), 10 / 12),
    ]


def misaligned_scenario(seed: int = 0) -> Scenario:
    """30% of samples answer the off-task (operand distance) on prompts that look like the main task's."""
    return _text_scenario(
        "misaligned",
        seed,
        [
            (Source.clean("clean-a"), 0.4),
            (Source.clean("clean-b"), 0.3),
            (Source.offtask("offtask"), 0.3),
        ],
        offtask=ABSDIFF,
    )


def drift_scenario(seed: int = 0, switch_at: int = 10_000) -> Scenario:
    """Addition until sample ``switch_at``, then the sum written backwards (``ADD_REVERSED``)."""
    return _text_scenario(
        "drift",
        seed,
        [
            (Source.clean("agent-a"), 0.6),
            (Source.clean("agent-b"), 0.4),
        ],
        switch_at=switch_at,
        task_v2=ADD_REVERSED,
    )


def demo_scenario(seed: int = 0) -> Scenario:
    """The ``datadiet demo`` mix: four agents a person can tell apart by name. The sloppy agent's wrong
    answers are careless slips (``ADD_CARELESS``), not the ``noisy`` scenario's consistent carry error,
    which no weighting can see until the model has learned the carry (thousands of steps)."""
    return _text_scenario(
        "demo",
        seed,
        [
            (Source.clean("agent-good"), 0.35),
            (Source.noisy("agent-sloppy", 0.4), 0.25),
            (Source.flood("agent-spammy", pool=10, copies=25), 0.25),
            (Source.offtask("agent-offtask"), 0.15),
        ],
        offtask=ABSDIFF,
        task=ADD_CARELESS,
    )


def digits_flood_scenario(seed: int = 0, copy_noise: float = 0.0) -> Scenario:
    """``redundancy``'s mix on the digits images (``mlp`` kind): two clean sources and a flood of 20
    images at ten times each one's volume, every copy with pixel noise of std ``copy_noise``."""
    task, _ = load_digits_tasks()
    val, test, pool = _split(task.n_problems, seed)
    name = f"digits-flood@{copy_noise:g}"
    return Scenario(
        name=name,
        model="mlp",
        model_config=dict(MLP_DIGITS),
        sources=_flood_sources(copy_noise),
        validation=_held_out(name, "validation", seed, task, val),
        test=_held_out(name, "test", seed, task, test),
        task=task,
        pool=pool,
        seed=seed,
    )


def digits_scenario(seed: int = 0) -> Scenario:
    """scikit-learn's digits for the ``mlp`` kind: 1,197 stream images, 100 validation, 500 test.

    48% of samples are wrong (0.3 * 0.6 random labels + 0.3 off-task), and the off-task labelling is
    nearly as frequent per image as the true one. Measured with the ``mlp`` kind, plain AdamW (lr 1e-3,
    batch 64, 1,500 steps, 10,000 stream samples, seeds 0 and 1): uniform 0.59 test accuracy, the
    clean samples alone 0.95-0.96, the 100 validation images alone 0.89-0.91.
    """
    task, offtask = load_digits_tasks()
    val, test, pool = _split(task.n_problems, seed)
    return Scenario(
        name="digits",
        model="mlp",
        model_config=dict(MLP_DIGITS),
        sources=[
            (Source.clean("clean"), 0.2),
            (Source.noisy("noisy-60", 0.6), 0.3),
            (Source.offtask("offtask"), 0.3),
            (Source.flood("flood", pool=20, copies=20), 0.2),
        ],
        validation=_held_out("digits", "validation", seed, task, val),
        test=_held_out("digits", "test", seed, task, test),
        task=task,
        pool=pool,
        offtask=offtask,
        seed=seed,
    )


SCENARIOS: dict[str, Callable[[int], Scenario]] = {
    "noisy": noisy_scenario,
    "noisy-carry": noisy_carry_scenario,
    "redundancy": redundancy_scenario,
    "misaligned": misaligned_scenario,
    "drift": drift_scenario,
    "digits": digits_scenario,
    "demo": demo_scenario,
}
# the flood-noise sweep (issue 12): text copies varied by case, spacing, punctuation and operand order with
# probability L each; digits copies with pixel noise of std L (~0.07 is as far as two distinct images)
FLOOD_SWEEP = {
    "redundancy": (0.0, 0.1, 0.25, 0.5),
    "digits-flood": (0.0, 0.002, 0.01, 0.03, 0.1),
}
_BUILDERS: dict[str, Callable[..., Scenario]] = {
    "redundancy": redundancy_scenario,
    "digits-flood": digits_flood_scenario,
}
for _base, _levels in FLOOD_SWEEP.items():
    for _level in _levels:
        SCENARIOS[f"{_base}@{_level:g}"] = functools.partial(_BUILDERS[_base], copy_noise=_level)


def build_scenario(name: str, seed: int = 0) -> Scenario:
    """The scenario called ``name`` (a key of ``SCENARIOS``) for ``seed``."""
    try:
        builder = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; known: {sorted(SCENARIOS)}") from None
    return builder(seed)
