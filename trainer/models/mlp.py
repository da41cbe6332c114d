"""Kind ``mlp``: a fixed-length numeric vector -> one of ``n_classes`` classes."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.base import Batch, TrainModel, check_dropout, check_int, resolve_config, sample_values

DEFAULTS: dict[str, Any] = {"n_features": 64, "n_classes": 10, "hidden": [128, 128], "dropout": 0.0}


class MLP(TrainModel):
    kind = "mlp"
    input_kind = "vector"

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        cfg = resolve_config(self.kind, config, DEFAULTS)
        self.n_features = check_int(self.kind, cfg, "n_features", 1)
        self.n_classes = check_int(self.kind, cfg, "n_classes", 2)
        hidden = cfg["hidden"]
        if not isinstance(hidden, list) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden
        ):
            raise ValueError(
                f"{self.kind}: config 'hidden' must be a list of positive integers, got {hidden!r}"
            )
        dropout = check_dropout(self.kind, cfg)
        self.config = cfg

        widths = [self.n_features, *hidden, self.n_classes]
        linears = [nn.Linear(i, o) for i, o in itertools.pairwise(widths)]
        for layer in linears:
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
            nn.init.zeros_(layer.bias)
        self.layers = nn.ModuleList(linears)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Features (B, n_features) -> logits (B, n_classes)."""
        for layer in self.layers[:-1]:
            x = self.drop(F.gelu(layer(x)))  # (B, h)
        return self.layers[-1](x)

    def collate(self, samples: Sequence[Mapping[str, Any]]) -> Batch:
        """-> x (B, n_features) in the model's dtype, y (B,) int64 class labels."""
        x = self._features(sample_values(self.kind, samples, "input"))
        labels = sample_values(self.kind, samples, "target")
        for i, y in enumerate(labels):
            if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < self.n_classes:
                raise ValueError(
                    f"{self.kind}: sample {i} target must be an int in [0, {self.n_classes}), got {y!r}"
                )
        return {"x": x, "y": torch.tensor(labels, dtype=torch.long)}

    def per_sample_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """loss_i = -log softmax(f(x_i))[y_i]: (B,)."""
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

    @torch.no_grad()
    def predict(self, inputs: Sequence[Any]) -> list[int]:
        """argmax class of each input vector."""
        if not inputs:
            return []
        was_training = self.training
        self.eval()
        try:
            logits = self(self._features(inputs).to(self.device))  # (B, n_classes)
        finally:
            self.train(was_training)
        return [int(c) for c in logits.argmax(dim=-1).tolist()]

    def _features(self, inputs: Sequence[Any]) -> Tensor:
        rows = []
        for i, v in enumerate(inputs):
            try:
                if isinstance(v, str | bytes) or len(v) != self.n_features:
                    raise ValueError
                rows.append([float(a) for a in v])
            except (TypeError, ValueError):
                raise ValueError(f"{self.kind}: sample {i} input must be {self.n_features} numbers") from None
        x = torch.tensor(rows, dtype=self.dtype)  # (B, n_features)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{self.kind}: inputs must be finite numbers")
        return x
