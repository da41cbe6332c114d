"""Per-sample hypergradient scores from the training step's own backward pass ("ghost" products).

The outer loop moves sample i's weight along the one-step look-ahead hypergradient

    s_i = -lr * <grad loss_i(theta), G_val>,   G_val = grad L_val(theta) (or a running average),

and also wants ||grad loss_i||. Both come from the inner step's single backward, without per-sample
gradients. For a Linear y = a W^T + b with input a_i (T, d_in) and output-gradient g_i (T, d_out) of
sample i (T = 1 for a vector model), the per-sample gradients are

    grad W_i = sum_t g_it a_it^T  (d_out, d_in),      grad b_i = sum_t g_it  (d_out,)

so, with G_W (d_out, d_in) and G_b (d_out,) the validation gradient and the bias as a weight on a
constant input 1,

    <grad W_i, G_W> + <grad b_i, G_b> = sum_t g_it . (G_W a_it + G_b)             one F.linear, like a forward
    ||grad W_i||^2 + ||grad b_i||^2   = sum_{t,s} (a_it . a_is + 1)(g_it . g_is)   (B, T, T) Gram matrices

summed over the scored layers. The trainer backprops sum_i c_i loss_i (c_i = w_i / sum_j w_j > 0), so
the hooks see c_i g_it: dots and norms are divided by c_i. Padding positions have g_it = 0 (their loss
is masked and attention is causal), so whatever a_it holds there contributes nothing.

On an accelerator everything runs on the padded (B, T) shapes: a fixed handful of kernels per layer and
no host sync until the last check, when the work is queued. On the CPU, where a sync is free and FLOPs
are not, each layer first drops the positions without gradient (``layer_scores(pack=...)``).

Usage (one forward + backward for the inner step and the scores)::

    scorer = GhostScorer(model.scored_modules())
    val_loss, g_val = val_grad(model, val_batch)        # outside capture()
    with scorer.capture():
        losses = model.per_sample_loss(batch)           # (B,)
        (coef * losses).sum().backward()
    dots, norms = scorer.scores(coef, g_val)            # (B,), (B,); hook memory freed
    optimizer.step()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from trainer.models.base import TrainModel


def scored_parameters(modules: Sequence[nn.Linear]) -> list[Tensor]:
    """The parameters the scores cover, in the order every gradient list here uses:
    for each module, its weight, then its bias if it has one."""
    params: list[Tensor] = []
    for m in modules:
        params.append(m.weight)
        if m.bias is not None:
            params.append(m.bias)
    return params


class GhostScorer:
    """Hooks on Linear layers that turn one batched backward into per-sample dots and norms."""

    def __init__(self, modules: Sequence[nn.Linear]) -> None:
        if not modules:
            raise ValueError("GhostScorer needs at least one nn.Linear")
        for m in modules:
            if not isinstance(m, nn.Linear):
                raise TypeError(f"GhostScorer scores nn.Linear layers only, got {type(m).__name__}")
        self.modules = list(modules)
        self.params = scored_parameters(self.modules)
        self._inputs: list[list[Tensor]] = [[] for _ in self.modules]  # per module, per call: a (B, T, d_in)
        self._grads: list[dict[int, Tensor]] = [
            {} for _ in self.modules
        ]  # per module: call -> g (B, T, d_out)
        self._active = False

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record each scored layer's input (forward) and output-gradient (backward) inside the block.
        Run exactly one forward and one backward of one batch in it; forwards without grad are ignored."""
        if self._active:
            raise RuntimeError("GhostScorer.capture() is not re-entrant")
        self.clear()
        handles: list[RemovableHandle] = [
            m.register_forward_hook(self._forward_hook(j)) for j, m in enumerate(self.modules)
        ]
        self._active = True
        try:
            yield
        finally:
            self._active = False
            for h in handles:
                h.remove()

    def _forward_hook(self, j: int) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            a = args[0].detach()
            device = a.device.type
            if torch.is_autocast_enabled(device):  # keep what the matmul really used (and half the memory)
                a = a.to(torch.get_autocast_dtype(device))
            call = len(self._inputs[j])
            self._inputs[j].append(a)
            grads = self._grads[j]

            def grad_hook(g: Tensor) -> None:
                grads[call] = g.detach()

            output.register_hook(grad_hook)

        return hook

    def clear(self) -> None:
        """Drop recorded activations and gradients."""
        for inputs, grads in zip(self._inputs, self._grads, strict=True):
            inputs.clear()
            grads.clear()

    def scores(self, coef: Tensor, g_val: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """(dots (B,), norms (B,)): <grad loss_i, g_val> and ||grad loss_i|| over the scored parameters,
        for the backward of sum_i coef_i loss_i recorded by capture(). ``g_val`` is ordered like
        ``self.params``. Frees the recorded tensors. The results stay on the model's device."""
        if len(g_val) != len(self.params):
            raise ValueError(f"g_val has {len(g_val)} tensors, expected {len(self.params)} (see .params)")
        if not any(self._grads):
            raise RuntimeError("no gradients recorded: run forward and backward inside capture() first")
        try:
            dot_sum, sq_sum = self._accumulate(g_val)
        finally:
            self.clear()
        c = coef.detach().to(device=dot_sum.device, dtype=dot_sum.dtype).reshape(-1)  # (B,)
        if c.shape != dot_sum.shape:
            raise ValueError(f"coef has shape {tuple(coef.shape)}, batch has {dot_sum.shape[0]} samples")
        # hooks saw c_i * g_i: <c_i grad_i, G> / c_i and ||c_i grad_i|| / c_i
        dots, norms = dot_sum / c, sq_sum.clamp(min=0).sqrt() / c
        # the one host sync, once everything is queued: the caller waits for the results anyway
        if not bool((c > 0).all()):
            raise ValueError("coef must be > 0 for every sample (give zero-weight samples a small floor)")
        return dots, norms

    def _accumulate(self, g_val: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        dots: list[Tensor] = []  # per layer (B,)
        sqs: list[Tensor] = []
        p = 0
        for j, m in enumerate(self.modules):
            G_W = g_val[p]
            G_b = g_val[p + 1] if m.bias is not None else None
            p += 1 if m.bias is None else 2
            pairs = [
                (_as_btd(a), _as_btd(self._grads[j][k]))
                for k, a in enumerate(self._inputs[j])
                if k in self._grads[j]
            ]
            if not pairs:
                continue  # layer unused by the loss: its per-sample gradients are zero
            # several calls of one layer (weight sharing) are more time steps of the same sample
            a = pairs[0][0] if len(pairs) == 1 else torch.cat([x for x, _ in pairs], dim=1)  # (B, T, d_in)
            g = pairs[0][1] if len(pairs) == 1 else torch.cat([y for _, y in pairs], dim=1)  # (B, T, d_out)
            dot, sq = layer_scores(a, g, G_W, G_b)
            dots.append(dot)
            sqs.append(sq)
        if not dots:
            raise RuntimeError("no scored layer received a gradient")
        return torch.stack(dots).sum(dim=0), torch.stack(sqs).sum(dim=0)  # (L, B) -> (B,)

    def flat_grads(self) -> list[Tensor]:
        """The scored parameters' current ``.grad`` (zeros where None), ordered like ``self.params``."""
        return [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.params]


def _as_btd(x: Tensor) -> Tensor:
    """(B, d) -> (B, 1, d); (B, ..., d) -> (B, T, d) with T the product of the middle dims."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def layer_scores(
    a: Tensor, g: Tensor, G_W: Tensor, G_b: Tensor | None, pack: bool | None = None
) -> tuple[Tensor, Tensor]:
    """One Linear's (dots (B,), squared norms (B,)) from inputs a (B, T, d_in), output-gradients
    g (B, T, d_out) and the validation gradient G_W (d_out, d_in), G_b (d_out,) or None; float32 or wider.

    ``pack`` (default: on the CPU) first drops positions with g_it = 0, which add nothing to any term:
    padding, and in the layers after the last attention every position that is not a target (often most
    of them). It syncs with the host; without it the shapes, and so the kernels, do not depend on the data.
    Inside autocast too, the products run in float32 or wider."""
    with torch.autocast(a.device.type, enabled=False):
        return _layer_scores(a, g, G_W, G_b, a.device.type == "cpu" if pack is None else pack)


def _layer_scores(a: Tensor, g: Tensor, G_W: Tensor, G_b: Tensor | None, pack: bool) -> tuple[Tensor, Tensor]:
    dt = torch.promote_types(torch.promote_types(a.dtype, g.dtype), torch.float32)
    a, g = a.to(dt), g.to(dt)
    G_W = G_W.to(device=a.device, dtype=dt)
    G_b = None if G_b is None else G_b.to(device=a.device, dtype=dt)
    B, T = g.shape[:2]
    if T == 1:  # a vector model: grad W_i = g_i a_i^T, squared norm (|a_i|^2 + 1) |g_i|^2 with the bias
        a, g = a[:, 0], g[:, 0]  # (B, d_in), (B, d_out)
        aa = torch.linalg.vecdot(a, a)  # (B,)
        if G_b is not None:
            aa = aa + 1  # the bias's constant input
        return torch.linalg.vecdot(F.linear(a, G_W, G_b), g), aa * torch.linalg.vecdot(g, g)

    dot = None
    if pack:
        live = g.abs().amax(dim=-1).ne(0)  # (B, T) positions that carry gradient (NaN counts as live)
        n_live = live.sum(dim=1)  # (B,)
        t_live = int(n_live.max())
        if t_live < 0.75 * T:  # pack each sample's live positions to the front: T' = t_live < T
            order = torch.argsort((~live).to(torch.uint8), dim=1, stable=True)[:, :t_live, None]  # (B, T', 1)
            a = a.gather(1, order.expand(-1, -1, a.shape[-1]))  # (B, T', d_in)
            g = g.gather(1, order.expand(-1, -1, g.shape[-1]))  # (B, T', d_out), 0 past a sample's count
        elif int(n_live.sum()) < 0.9 * B * T:  # the dot over live rows only: (N, d_out) -> (N,) -> (B,)
            rows = live.nonzero()[:, 0]  # (N,) sample of each live row
            per_row = torch.linalg.vecdot(F.linear(a[live], G_W, G_b), g[live])  # (N,)
            dot = torch.zeros(B, dtype=dt, device=a.device).index_add_(0, rows, per_row)
    if dot is None:  # sum_t g_it . (G_W a_it + G_b): (B, T, d_out) -> (B,)
        dot = torch.linalg.vecdot(F.linear(a, G_W, G_b).flatten(1), g.flatten(1))
    # sum_{t,s} (a_it . a_is + 1)(g_it . g_is): (B, T, T) -> (B,)
    aa = a @ a.transpose(1, 2)  # (B, T, T)
    if G_b is not None:
        aa = aa + 1  # the bias's constant input
    return dot, torch.linalg.vecdot(aa.flatten(1), (g @ g.transpose(1, 2)).flatten(1))


def val_grad(model: TrainModel, batch: Mapping[str, Tensor]) -> tuple[float, list[Tensor]]:
    """(mean validation loss, its gradient over the scored parameters), ordered like
    ``scored_parameters(model.scored_modules())``. Uses torch.autograd.grad, so the model's ``.grad``
    is untouched. Call it outside ``GhostScorer.capture()``; put the model in eval mode if it has dropout.

    G_val = grad_theta (1/B_val) sum_j loss_j(theta)
    """
    params = scored_parameters(model.scored_modules())
    loss = model.per_sample_loss(batch).mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    out = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)]
    return float(loss.detach()), out


def reference_scores(
    model: TrainModel, batch: Mapping[str, Tensor], g_val: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """Brute force for tests: per-sample torch.autograd.grad of loss_i -> (dots (B,), norms (B,))."""
    params = scored_parameters(model.scored_modules())
    losses = model.per_sample_loss(batch)  # (B,)
    dots, norms = [], []
    for i in range(losses.shape[0]):
        raw = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, raw, strict=True)]
        dots.append(torch.stack([(g * G.to(g.dtype)).sum() for g, G in zip(grads, g_val, strict=True)]).sum())
        norms.append(torch.stack([g.square().sum() for g in grads]).sum().sqrt())
    return torch.stack(dots).detach(), torch.stack(norms).detach()
