"""How outer-step scores become weights: ``bilevel`` (the default) or ``uniform`` (the baseline), and the
baselines the quality benchmark compares against: ``loss`` (prefer high-loss samples), ``l2rw`` (Learning
to Reweight Examples) and ``rholoss`` (RHO-LOSS-style selection).

All sit behind one small interface so the training loop is the same pipeline for every method.
"""

from __future__ import annotations

from trainer.settings import TrainerSettings
from trainer.weighting.base import Weighting
from trainer.weighting.bilevel import Bilevel
from trainer.weighting.l2rw import L2RW
from trainer.weighting.loss import LossWeighting
from trainer.weighting.rholoss import RhoLoss
from trainer.weighting.uniform import Uniform

METHODS: dict[str, type[Weighting]] = {
    "bilevel": Bilevel,
    "uniform": Uniform,
    "loss": LossWeighting,
    "l2rw": L2RW,
    "rholoss": RhoLoss,
}


def make_weighting(settings: TrainerSettings) -> Weighting:
    try:
        cls = METHODS[settings.reweight]
    except KeyError:
        raise ValueError(f"DATADIET_REWEIGHT={settings.reweight!r} is not one of {sorted(METHODS)}") from None
    return cls(settings)


__all__ = ["METHODS", "Weighting", "make_weighting"]
