"""How outer-step scores become weights: ``bilevel`` (the default) or ``uniform`` (the baseline).

Both sit behind one small interface so the training loop is the same pipeline for every method.
"""

from __future__ import annotations

from trainer.settings import TrainerSettings
from trainer.weighting.base import Weighting
from trainer.weighting.bilevel import Bilevel
from trainer.weighting.uniform import Uniform

METHODS: dict[str, type[Weighting]] = {"bilevel": Bilevel, "uniform": Uniform}


def make_weighting(settings: TrainerSettings) -> Weighting:
    try:
        cls = METHODS[settings.reweight]
    except KeyError:
        raise ValueError(f"DATADIET_REWEIGHT={settings.reweight!r} is not one of {sorted(METHODS)}") from None
    return cls(settings)


__all__ = ["METHODS", "Weighting", "make_weighting"]
