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

summed over the scored layers. GPT-2's ``Conv1D`` is a Linear whose weight is stored transposed,
(d_in, d_out): its G_W is transposed to match. PEFT's LoRA adapters (Hu et al. 2021) are two Linear layers,
lora_A (d -> r) and lora_B (r -> d), scored like any other. Where d_in d_out < T (d_in + d_out), as for a
rank-r adapter on sequences longer than about r, the per-sample gradients themselves, (B, d_out, d_in),
are cheaper than the (B, T, T) Grams, and ``layer_scores`` forms them directly (``method="auto"``). An
output head tied to the input embedding is one matrix with two uses (``TiedEmbedding``). Ghost norms: Li et
al. 2022 (arXiv:2110.05679); scores from the same backward: GREATS (Wang et al. 2024).

The trainer backprops sum_i c_i loss_i (c_i = w_i / sum_j w_j > 0), so
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

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from trainer.models.base import TrainModel


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2): y = x W + b with W (d_in, d_out). Checked
    without importing transformers (a model that has one has imported it)."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


class TiedEmbedding:
    """An output head (nn.Linear, W (V, d)) whose weight is the input embedding's (nn.Embedding (V, d)),
    scored as the one matrix it is. With token ids x_is of sample i, embedding output-gradients e_is (S, d),
    head inputs a_it (T, d) and output-gradients h_it (T, V):

        grad W_i = sum_t h_it a_it^T + sum_s onehot(x_is) e_is^T                              (V, d)
        <grad W_i, G> = sum_t h_it . (G a_it) + sum_s e_is . G[x_is]
        ||grad W_i||^2 = sum_{t,t'} (a_it . a_it')(h_it . h_it') + sum_{s,s'} [x_is = x_is'] (e_is . e_is')
                         + 2 sum_{t,s} h_it[x_is] (a_it . e_is)

    The head's bias, if any, is scored as a Linear bias; other embeddings (positions) are not scored."""

    def __init__(self, embedding: nn.Embedding, head: nn.Linear) -> None:
        if embedding.weight is not head.weight:
            raise ValueError("TiedEmbedding: the head's weight is not the embedding's")
        self.embedding, self.head = embedding, head
        self.weight, self.bias = head.weight, head.bias


def scored_parameters(modules: Sequence[Any]) -> list[Tensor]:
    """The parameters the scores cover, in the order every gradient list here uses:
    for each module, its weight, then its bias if it has one."""
    params: list[Tensor] = []
    for m in modules:
        params.append(m.weight)
        if m.bias is not None:
            params.append(m.bias)
    return params


def _sites(m: Any) -> list[nn.Module]:
    """The modules whose calls a scored entry's hooks record: a TiedEmbedding's embedding and head."""
    return [m.embedding, m.head] if isinstance(m, TiedEmbedding) else [m]


class GhostScorer:
    """Hooks on Linear-like layers (nn.Linear, Conv1D, TiedEmbedding) that turn one batched backward into
    per-sample dots and norms."""

    def __init__(self, modules: Sequence[Any]) -> None:
        if not modules:
            raise ValueError("GhostScorer needs at least one nn.Linear")
        for m in modules:
            if not (isinstance(m, nn.Linear | TiedEmbedding) or is_conv1d(m)):
                raise TypeError(
                    "GhostScorer scores nn.Linear, Conv1D and TiedEmbedding layers only, "
                    f"got {type(m).__name__}"
                )
        self.modules = list(modules)
        self.params = scored_parameters(self.modules)
        self._site_modules = [site for m in self.modules for site in _sites(m)]
        # per hooked module, per call: its input (B, T, d_in) (token ids (B, T) for an embedding) ...
        self._inputs: list[list[Tensor]] = [[] for _ in self._site_modules]
        # ... and call -> its output-gradient g (B, T, d_out)
        self._grads: list[dict[int, Tensor]] = [{} for _ in self._site_modules]
        self._active = False

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record each scored layer's input (forward) and output-gradient (backward) inside the block.
        Run exactly one forward and one backward of one batch in it; forwards without grad are ignored."""
        if self._active:
            raise RuntimeError("GhostScorer.capture() is not re-entrant")
        self.clear()
        handles: list[RemovableHandle] = [
            m.register_forward_hook(self._forward_hook(j)) for j, m in enumerate(self._site_modules)
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
            if a.is_floating_point() and torch.is_autocast_enabled(
                device
            ):  # keep what the matmul really used (and half the memory)
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

    def _recorded(self, j: int) -> tuple[Tensor, Tensor] | None:
        """Hooked module j's (inputs, output-gradients) over its calls, or None when it got no gradient.
        Several calls of one layer (weight sharing) are more time steps of the same sample."""
        pairs = [
            (_as_btd(a) if a.is_floating_point() else a.reshape(a.shape[0], -1), _as_btd(self._grads[j][k]))
            for k, a in enumerate(self._inputs[j])
            if k in self._grads[j]
        ]
        if not pairs:
            return None
        if len(pairs) == 1:
            return pairs[0]
        return torch.cat([x for x, _ in pairs], dim=1), torch.cat([y for _, y in pairs], dim=1)

    def _accumulate(self, g_val: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        dots: list[Tensor] = []  # per layer (B,)
        sqs: list[Tensor] = []
        p = j = 0
        for m in self.modules:
            G_W = g_val[p]
            G_b = g_val[p + 1] if m.bias is not None else None
            p += 1 if m.bias is None else 2
            if isinstance(m, TiedEmbedding):
                scores = tied_scores(self._recorded(j), self._recorded(j + 1), G_W, G_b)
                j += 2
            else:
                recorded = self._recorded(j)
                j += 1
                if is_conv1d(m):
                    G_W = G_W.t()  # Conv1D's (d_in, d_out) -> a Linear's (d_out, d_in)
                scores = None if recorded is None else layer_scores(*recorded, G_W, G_b)
            if scores is None:
                continue  # layer unused by the loss: its per-sample gradients are zero
            dots.append(scores[0])
            sqs.append(scores[1])
        if not dots:
            raise RuntimeError("no scored layer received a gradient")
        return torch.stack(dots).sum(dim=0), torch.stack(sqs).sum(dim=0)  # (L, B) -> (B,)

    def flat_grads(self) -> list[Tensor]:
        """The scored parameters' current ``.grad`` (zeros where None), ordered like ``self.params``."""
        return [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.params]


def _as_btd(x: Tensor) -> Tensor:
    """(B, d) -> (B, 1, d); (B, ..., d) -> (B, T, d) with T the product of the middle dims."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


Method = Literal["auto", "gram", "direct"]
DIRECT_MAX_ELEMENTS = 1 << 26  # B d_out d_in: the most per-sample gradient elements formed at once


def score_method(B: int, T: int, d_in: int, d_out: int) -> Literal["gram", "direct"]:
    """The cheaper way to a Linear's per-sample norms: "direct" (per-sample gradients, about
    B d_in d_out (T + 2) products) when it beats "gram" (B T^2 (d_in + d_out + 1)) and the gradients,
    B d_out d_in elements, stay within DIRECT_MAX_ELEMENTS."""
    fits = B * d_in * d_out <= DIRECT_MAX_ELEMENTS
    return "direct" if fits and d_in * d_out * (T + 2) < T * T * (d_in + d_out + 1) else "gram"


def layer_scores(
    a: Tensor,
    g: Tensor,
    G_W: Tensor,
    G_b: Tensor | None,
    pack: bool | None = None,
    method: Method = "auto",
) -> tuple[Tensor, Tensor]:
    """One Linear's (dots (B,), squared norms (B,)) from inputs a (B, T, d_in), output-gradients
    g (B, T, d_out) and the validation gradient G_W (d_out, d_in), G_b (d_out,) or None; float32 or wider.

    ``pack`` (default: on the CPU) first drops positions with g_it = 0, which add nothing to any term:
    padding, and in the layers after the last attention every position that is not a target (often most
    of them). It syncs with the host; without it the shapes, and so the kernels, do not depend on the data.

    ``method``: "gram" takes the norms from the (B, T, T) Gram matrices, B T^2 (d_in + d_out) products;
    "direct" forms each sample's gradient g_i^T a_i (B, d_out, d_in), B T d_in d_out products, which is
    cheaper for narrow layers (a LoRA adapter: d_in or d_out = r) on long sequences; "auto" takes the
    cheaper one (after packing), and "gram" when the direct gradients would pass DIRECT_MAX_ELEMENTS.
    Inside autocast too, the products run in float32 or wider."""
    if method not in ("auto", "gram", "direct"):
        raise ValueError(f"method must be 'auto', 'gram' or 'direct', got {method!r}")
    with torch.autocast(a.device.type, enabled=False):
        return _layer_scores(a, g, G_W, G_b, a.device.type == "cpu" if pack is None else pack, method)


def _layer_scores(
    a: Tensor, g: Tensor, G_W: Tensor, G_b: Tensor | None, pack: bool, method: Method
) -> tuple[Tensor, Tensor]:
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
    if method == "auto":
        method = score_method(B, a.shape[1], a.shape[2], g.shape[2])
    if method == "direct":
        per_W = g.transpose(1, 2) @ a  # grad W_i = sum_t g_it a_it^T: (B, d_out, d_in)
        dot = torch.linalg.vecdot(per_W.flatten(1), G_W.flatten())  # <grad W_i, G_W>: (B,)
        sq = per_W.square().sum(dim=(1, 2))  # (B,)
        if G_b is not None:
            per_b = g.sum(dim=1)  # grad b_i = sum_t g_it: (B, d_out)
            dot, sq = dot + per_b @ G_b, sq + per_b.square().sum(dim=1)
        return dot, sq
    if dot is None:  # sum_t g_it . (G_W a_it + G_b): (B, T, d_out) -> (B,)
        dot = torch.linalg.vecdot(F.linear(a, G_W, G_b).flatten(1), g.flatten(1))
    # sum_{t,s} (a_it . a_is + 1)(g_it . g_is): (B, T, T) -> (B,)
    aa = a @ a.transpose(1, 2)  # (B, T, T)
    if G_b is not None:
        aa = aa + 1  # the bias's constant input
    return dot, torch.linalg.vecdot(aa.flatten(1), (g @ g.transpose(1, 2)).flatten(1))


def tied_scores(
    embedding: tuple[Tensor, Tensor] | None,
    head: tuple[Tensor, Tensor] | None,
    G_W: Tensor,
    G_b: Tensor | None,
) -> tuple[Tensor, Tensor] | None:
    """A TiedEmbedding's (dots (B,), squared norms (B,)) from the embedding's (token ids x (B, S),
    output-gradients e (B, S, d)) and the head's (inputs a (B, T, d), output-gradients h (B, T, V)), either
    None when that use got no gradient; G_W (V, d), G_b (V,) or None. Formulas: ``TiedEmbedding``."""
    if embedding is None and head is None:
        return None
    ref = (head or embedding)[1]  # type: ignore[index]
    with torch.autocast(ref.device.type, enabled=False):
        dt = torch.promote_types(ref.dtype, torch.float32)
        G = G_W.to(device=ref.device, dtype=dt)
        dot = sq = None
        if head is not None:
            dot, sq = layer_scores(head[0], head[1], G, G_b, pack=False)
        if embedding is not None:
            x, e = embedding[0], embedding[1].to(dt)  # (B, S), (B, S, d)
            e_dot = torch.linalg.vecdot(e, G[x]).sum(dim=1)  # sum_s e_is . G[x_is]: (B,)
            same = (x[:, :, None] == x[:, None, :]).to(dt)  # [x_is = x_is']: (B, S, S)
            e_sq = torch.linalg.vecdot(same.flatten(1), (e @ e.transpose(1, 2)).flatten(1))  # (B,)
            dot = e_dot if dot is None else dot + e_dot
            sq = e_sq if sq is None else sq + e_sq
            if head is not None:
                a, h = head[0].to(dt), head[1].to(dt)  # (B, T, d), (B, T, V)
                h_at_x = h.gather(2, x[:, None, :].expand(-1, h.shape[1], -1))  # h_it[x_is]: (B, T, S)
                cross = torch.linalg.vecdot(h_at_x.flatten(1), (a @ e.transpose(1, 2)).flatten(1))  # (B,)
                sq = sq + 2 * cross
    assert dot is not None and sq is not None
    return dot, sq


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
