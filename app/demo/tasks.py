"""Tasks and sources for the simulated agents (``datadiet demo``, the quality benchmark).

The text tasks are sized for the ``tiny-gpt`` kind (2 layers, 4 heads, 128 wide, block 64, byte-level).
They all read the same kind of prompt, two operands in [0, 100) written ``"47+38="``, which is what
makes them useful for data selection: the samples look alike, and only the answers tell them apart.

- ``ADD`` (the main task): ``"47+38="`` -> ``"85"``. 10,000 distinct problems; 100 validation and 500
  test problems are held out of the stream, so memorising the trusted set cannot solve the test set
  (trained on the 100 alone, the model scores 0.02). On the clean samples of a 20,000-sample stream
  (~6,800 distinct problems) a plain run (AdamW lr 2e-3, batch 64, ~0.016 s/step on 2 idle CPU cores)
  reaches 0.59-0.78 exact match at 500 steps, 0.85-0.92 at 1,000 and ~0.9 at 2,000 (seeds 0, 1);
  3-digit addition is far slower (~0.68 after 3,000 steps, RESEARCH.md). With only ~2,600 distinct
  problems it is slower too: 0.43 at 1,000 steps, 0.65 at 2,000.
- Sloppy answers (``Source.noisy``) of ``ADD`` get the units carry wrong: ``"47+38="`` -> ``"75"``,
  ``"12+13="`` -> ``"35"``. One consistent mistake on the hardest part of the task competes with the
  right rule instead of averaging out: uniform training on the ``noisy`` stream (40% such answers) scores
  0.05-0.50 at 500 steps and 0.45-0.5 at 2,000, where answers off by one or ten at random still
  reached 0.82. ``ADD_CARELESS`` (the demo's task) makes those scattered mistakes instead.
- ``ABSDIFF`` (the off-task): ``"47+38="`` -> ``"9"``, an agent doing a different job (the distance
  between the operands) on look-alike prompts. The same input maps to a different answer, so each
  off-task sample pulls the model away from the main task: it conflicts, it is not merely useless
  (30% of the stream holds uniform training under 0.1 exact match for 2,000 steps). Off-task samples
  are drawn only where the two answers differ (neither operand is 0).
- ``ADD_REVERSED`` (the drift task, v2): ``"47+38="`` -> ``"58"``, the sum written least-significant
  digit first: the consumer of the model changed its output format. Learnable from scratch (0.62 at
  1,000 steps, 0.79 at 2,000), it contradicts ``ADD`` on almost every input, so after the switch the
  v1 samples still in the buffer are actively harmful (uniform training on 10,000 v1 then 10,000 v2
  samples scores 0.04 on the v2 test set after 2,000 steps): the hard case for a service that must
  follow the new validation set.

The vector task is scikit-learn's bundled ``load_digits`` (1,797 8x8 images, no download) for the
``mlp`` kind: input the 64 pixels scaled to [0, 1], target the digit. Its off-task labels every image
``(digit + 1) % 10``: a consistent, learnable labelling that contradicts the real one everywhere.

A problem is an ``int`` index into a task's problem space (``a * 100 + b`` for arithmetic, the image
index for digits), so every task renders the same problem the same way and sources can share pools.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import numpy as np

Input = str | list[float]
Target = str | int
Kind = Literal["clean", "noisy", "flood", "offtask"]

_OPERANDS_RE = re.compile(r"\s*(\d+)\+(\d+)=\s*")


class Task(Protocol):
    """A mapping from problems to (input, target), plus the ways a source gets it wrong or repeats it."""

    @property
    def name(self) -> str:
        """The task's name, as samples carry it in ``meta["task"]``."""
        ...

    def input_of(self, problem: int) -> Input:
        """The canonical input for ``problem``."""
        ...

    def target_of(self, problem: int) -> Target:
        """The correct target for ``problem``."""
        ...

    def wrong_target(self, problem: int, rng: np.random.Generator) -> Target:
        """A plausible target that is not the correct one."""
        ...

    def near_duplicate(self, problem: int, rng: np.random.Generator, level: float | None = None) -> Input:
        """``input_of(problem)`` or a copy of it with the same meaning and target: ``None``, the task's
        default copies; a level, copies that differ more as it grows (0: exact copies)."""
        ...


@dataclass(frozen=True)
class ArithmeticTask:
    """``"a+b="`` -> ``render(value(a, b))``, with operands ``a, b`` in ``[0, 10**digits)``."""

    name: str
    value: Callable[[int, int], int]
    render: Callable[[int], str] = str
    digits: int = 2
    slip: Callable[[int, int], int] | None = None  # a sloppy agent's value; None: off by one or ten

    @property
    def n_problems(self) -> int:
        return 10 ** (2 * self.digits)

    def operands(self, problem: int) -> tuple[int, int]:
        a, b = divmod(problem, 10**self.digits)
        return a, b

    def problem_of(self, text: str) -> int:
        """The problem an input (canonical or near-duplicate) writes; ValueError when it is not one."""
        m = _OPERANDS_RE.fullmatch(text)
        a, b = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
        limit = 10**self.digits
        if not (0 <= a < limit and 0 <= b < limit):
            raise ValueError(f"{self.name}: {text!r} is not a problem of this task")
        return a * limit + b

    def solve(self, text: str) -> str:
        """The correct target for an input text."""
        return self.target_of(self.problem_of(text))

    def input_of(self, problem: int) -> str:
        a, b = self.operands(problem)
        return f"{a}+{b}="

    def target_of(self, problem: int) -> str:
        return self.render(self.value(*self.operands(problem)))

    def wrong_target(self, problem: int, rng: np.random.Generator) -> str:
        """``slip``'s answer when the task has one, else off by one or ten at random; never correct."""
        a, b = self.operands(problem)
        right = self.value(a, b)
        if self.slip is not None:
            return self.render(self.slip(a, b))
        deltas = [
            d for d in (-10, -1, 1, 10) if right + d >= 0 and self.render(right + d) != self.render(right)
        ]
        return self.render(right + int(rng.choice(deltas)))

    def near_duplicate(self, problem: int, rng: np.random.Generator, level: float | None = None) -> str:
        """``level`` None: half the copies verbatim, the rest with a space or tab before or after. A level
        in [0, 1]: each of four variations applies with that probability, each in a form drawn at random
        (``vary_text``); 0 gives exact copies. The problem, and so the target, stays the same."""
        text = self.input_of(problem)
        if level is not None:
            return vary_text(*self.operands(problem), level, rng)
        if rng.random() < 0.5:
            return text
        pad = str(rng.choice([" ", "  ", "\t"]))
        return pad + text if rng.random() < 0.5 else text + pad


_GAPS = ("", " ", "  ")
_PADS = ("", " ", "\t")
_MARKS = ("?", " ?", ".", "!", " ...", ";")


def vary_text(a: int, b: int, level: float, rng: np.random.Generator) -> str:
    """A copy of ``"a+b="`` varied in up to four ways, each with probability ``level``, as people and
    agents rewrite a prompt: operand order (``"b+a="``, the same sum), spacing (gaps around ``+`` and
    ``=``, a leading or trailing space or tab), punctuation (``"?"``, ``"."``, ``"..."`` after ``=``) and
    case (a ``"sum:"`` label, each letter's case at random: the prompts hold no other letters). The
    service's content group ignores case and whitespace alone; order and punctuation escape it."""
    if rng.random() < level:
        a, b = b, a
    gaps = [str(rng.choice(_GAPS)) if rng.random() < level else "" for _ in range(2)]
    text = f"{a}{gaps[0]}+{gaps[1]}{b}="
    if rng.random() < level:
        text = str(rng.choice(_PADS[1:])) + text if rng.random() < 0.5 else text + str(rng.choice(_PADS[1:]))
    if rng.random() < level:
        text += str(rng.choice(_MARKS))
    if rng.random() < level:
        label = "".join(c.upper() if rng.random() < 0.5 else c for c in "sum")
        text = f"{label}: {text}"
    return text


def _reversed_digits(value: int) -> str:
    return str(value)[::-1]


def _carry_slip(a: int, b: int) -> int:
    """``a + b`` with the units carry got wrong: dropped where there is one, added where there is none.

    47+38 -> 75, 12+13 -> 35. One consistent mistake on the hardest part of the task (the carry), so
    sloppy samples teach a competing rule instead of averaging out as scattered noise would.
    """
    return a + b - 10 if a % 10 + b % 10 >= 10 else a + b + 10


ADD = ArithmeticTask("add", lambda a, b: a + b, slip=_carry_slip)
# the same task, where a wrong answer is a careless slip (off by one or ten at random): the demo's
# sloppy agent, whose mistakes a weighting can see within a demo's minutes
ADD_CARELESS = replace(ADD, slip=None)
ABSDIFF = ArithmeticTask("absdiff", lambda a, b: abs(a - b))
ADD_REVERSED = ArithmeticTask("add-reversed", lambda a, b: a + b, render=_reversed_digits, slip=_carry_slip)


@dataclass(frozen=True, eq=False)
class DigitsTask:
    """8x8 digit images -> class ``(digit + shift) % 10``; ``shift=1`` is the conflicting off-task."""

    name: str
    images: np.ndarray  # (N, 64) float in [0, 1]
    labels: np.ndarray  # (N,) int in [0, 10)
    shift: int = 0
    jitter: float = 0.002  # near-duplicate pixel noise (std), small next to a pixel step of 1/16

    @property
    def n_problems(self) -> int:
        return len(self.labels)

    def input_of(self, problem: int) -> list[float]:
        return [round(float(x), 4) for x in self.images[problem]]

    def target_of(self, problem: int) -> int:
        return (int(self.labels[problem]) + self.shift) % 10

    def wrong_target(self, problem: int, rng: np.random.Generator) -> int:
        """A label drawn uniformly from the nine wrong ones."""
        return (self.target_of(problem) + int(rng.integers(1, 10))) % 10

    def near_duplicate(
        self, problem: int, rng: np.random.Generator, level: float | None = None
    ) -> list[float]:
        """``level`` None: half the copies verbatim, the rest with faint pixel noise (``jitter``). A level:
        every copy with pixel noise of that standard deviation (0: exact copies); both clipped to [0, 1].
        Two distinct digits images are >= 0.16 rad apart (app/schema.py ``content_group``); noise of std
        ~0.07 moves a typical image (norm ~3.5) about that far."""
        if level is None and rng.random() < 0.5:
            return self.input_of(problem)
        std = self.jitter if level is None else level
        if std == 0:
            return self.input_of(problem)
        noisy = np.clip(self.images[problem] + rng.normal(0.0, std, size=64), 0.0, 1.0)
        return [round(float(x), 4) for x in noisy]


def load_digits_tasks() -> tuple[DigitsTask, DigitsTask]:
    """(the digits task, its conflicting off-task) on scikit-learn's bundled images (no download)."""
    from sklearn.datasets import load_digits  # only the digits scenario needs scikit-learn

    data = load_digits()
    images = np.asarray(data.data, dtype=np.float64) / 16.0  # pixel intensities 0..16 -> [0, 1]
    labels = np.asarray(data.target, dtype=np.int64)
    return DigitsTask("digits", images, labels), DigitsTask("digits-plus-one", images, labels, shift=1)


@dataclass(frozen=True)
class Source:
    """One simulated agent: its name and how it produces samples of a scenario's task.

    - ``clean``: correct answers;
    - ``noisy(p)``: a fraction ``p`` of answers replaced by a wrong plausible one;
    - ``flood(pool, copies, copy_noise)``: re-posts a fixed pool of ``pool`` problems in bursts of
      ``copies`` near-identical samples (new ids, some with trivial input variations), cycling forever;
      ``copy_noise`` sets how far the copies differ (the task's ``near_duplicate`` level; None: its
      default copies);
    - ``offtask``: correct answers to the scenario's other task, which are wrong for the main one.
    """

    name: str
    kind: Kind
    noise: float = 0.0
    pool: int = 0
    copies: int = 1
    copy_noise: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"source {self.name}: noise must be in [0, 1], got {self.noise}")
        if self.kind == "flood" and (self.pool < 1 or self.copies < 1):
            raise ValueError(f"source {self.name}: a flood needs pool >= 1 and copies >= 1")
        if self.copy_noise is not None and not self.copy_noise >= 0:
            raise ValueError(f"source {self.name}: copy_noise must be >= 0, got {self.copy_noise}")

    @classmethod
    def clean(cls, name: str) -> Source:
        return cls(name, "clean")

    @classmethod
    def noisy(cls, name: str, p: float) -> Source:
        return cls(name, "noisy", noise=p)

    @classmethod
    def flood(cls, name: str, pool: int, copies: int, copy_noise: float | None = None) -> Source:
        return cls(name, "flood", pool=pool, copies=copies, copy_noise=copy_noise)

    @classmethod
    def offtask(cls, name: str) -> Source:
        return cls(name, "offtask")

    @property
    def corrupted_fraction(self) -> float:
        """The expected fraction of this source's samples that are wrong for the main task."""
        return {"noisy": self.noise, "offtask": 1.0}.get(self.kind, 0.0)

    @property
    def true_quality(self) -> float:
        """The expected fraction of this source's samples that are correct for the main task."""
        return 1.0 - self.corrupted_fraction


def make_sample(
    sample_id: str, source: str, input: Input, target: Target, kind: Kind, corrupted: bool, task: str
) -> dict[str, Any]:
    """A contract Sample; ``meta`` holds the ground truth, which the service never interprets."""
    return {
        "id": sample_id,
        "source": source,
        "input": input,
        "target": target,
        "meta": {"corrupted": corrupted, "kind": kind, "task": task},
    }


def exact_match(preds: Sequence[Any], samples: Sequence[Mapping[str, Any]]) -> float:
    """The fraction of predictions equal to their sample's ``target`` (0.0 for no samples)."""
    if len(preds) != len(samples):
        raise ValueError(f"{len(preds)} predictions for {len(samples)} samples")
    if not samples:
        return 0.0
    return sum(p == s["target"] for p, s in zip(preds, samples, strict=True)) / len(samples)
