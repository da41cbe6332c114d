"""How outer-step scores become weights: ``bilevel`` (the default) or ``uniform`` (the baseline), and the
baselines the quality benchmark compares against: ``loss`` (prefer high-loss samples), ``l2rw`` (Learning
to Reweight Examples) and ``rholoss`` (RHO-LOSS-style selection).

All sit behind one small interface (trainer/weighting/base.py) so the training loop is the same pipeline
for every method: a rule gets each step's ``BatchRecord`` and the weight table, never the trainer.

Adding a rule is one file plus one line in ``METHODS``. For example, weights that follow a reward the
agents posted (``reward`` in the sample), averaged per row::

    class RewardWeighting(Weighting):               # trainer/weighting/reward.py
        name = "reward"
        columns = {"reward": np.float32}            # a per-row column, compacted and saved with the rows

        def observe(self, table, batch):            # every step: the batch's rows, losses, payloads
            r = np.array([p.get("reward", 0.0) for p in batch.payloads], dtype=np.float32)
            self.col(table, "reward")[batch.rows] = r

        def weights(self, table, step):             # every reweight: one weight per row, dead rows 0
            return normalise(np.exp(self.col(table, "reward")[: table.n]), table.alive)

then ``"reward": RewardWeighting`` in ``METHODS``, and ``DATADIET_REWEIGHT=reward`` selects it.
"""

from __future__ import annotations

import torch

from trainer.settings import TrainerSettings
from trainer.weighting.base import BatchRecord, Weighting
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


def make_weighting(settings: TrainerSettings, device: torch.device | None = None) -> Weighting:
    try:
        cls = METHODS[settings.reweight]
    except KeyError:
        raise ValueError(f"DATADIET_REWEIGHT={settings.reweight!r} is not one of {sorted(METHODS)}") from None
    return cls(settings, device)


__all__ = ["METHODS", "BatchRecord", "Weighting", "make_weighting"]
