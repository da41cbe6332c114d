"""Every live sample weighs 1: the ablation baseline, through the same pipeline."""

from __future__ import annotations

from typing import ClassVar

from trainer.weighting.base import Weighting


class Uniform(Weighting):
    name: ClassVar[str] = "uniform"
    needs_scores: ClassVar[bool] = False
