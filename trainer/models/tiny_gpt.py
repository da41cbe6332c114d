"""Kind ``tiny-gpt``: a byte-level causal transformer (nanoGPT-like) that learns ``target`` given ``input``.

Tokens: bytes 0..255, SEP=256, EOS=257, PAD=258 (padding only; never a label, never predicted).
Sequence: input bytes + SEP + target bytes + EOS, at most block_size + 1 tokens. The model reads the
first block_size tokens and predicts the next one at every position; the loss counts only positions
whose next token is a target byte or the EOS.

Truncation: the input keeps its last ``max_input`` bytes. That rule depends on the input alone, so
training and ``predict`` condition on the same prompt. The target keeps what fits after the prompt; a
target cut short gets no EOS (it did not end there), and ``predict`` stops when the block is full.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.base import (
    Batch,
    TrainModel,
    check_dropout,
    check_int,
    resolve_config,
    sample_values,
)

SEP, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259
IGNORE = -100  # label of positions outside the target (F.cross_entropy's ignore_index)

DEFAULTS: dict[str, Any] = {
    "n_layer": 2,
    "n_head": 4,
    "n_embd": 128,
    "block_size": 64,
    "dropout": 0.0,
    "max_input": None,  # None -> 3/4 of block_size: the target always has >= block_size/4 tokens
}


def encode_prompt(text: str, max_input: int) -> list[int]:
    """The last ``max_input`` bytes of ``text`` (UTF-8), then SEP."""
    data = text.encode("utf-8")
    return [*data[max(0, len(data) - max_input) :], SEP]


def encode_example(text: str, target: str, block_size: int, max_input: int) -> tuple[list[int], int]:
    """(tokens, prompt length): prompt + target bytes + EOS, at most block_size + 1 tokens."""
    prompt = encode_prompt(text, max_input)
    room = block_size + 1 - len(prompt)  # >= 2 since len(prompt) <= max_input + 1 <= block_size - 1
    body = list(target.encode("utf-8"))
    tail = [*body, EOS] if len(body) < room else body[:room]
    return prompt + tail, len(prompt)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # q, k, v in one Linear
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        # softmax(q k^T / sqrt(hs) + causal mask) v: (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.c_proj(y))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.drop(self.c_proj(F.gelu(self.c_fc(self.ln_2(x)))))


class TinyGPT(TrainModel):
    kind = "tiny-gpt"
    input_kind = "text"

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        cfg = resolve_config(self.kind, config, DEFAULTS)
        block_size = check_int(self.kind, cfg, "block_size", 3)
        if cfg["max_input"] is None:
            cfg["max_input"] = (3 * block_size) // 4
        self.max_input = check_int(self.kind, cfg, "max_input", 0, block_size - 2)
        n_layer = check_int(self.kind, cfg, "n_layer", 1)
        n_head = check_int(self.kind, cfg, "n_head", 1)
        n_embd = check_int(self.kind, cfg, "n_embd", 1)
        if n_embd % n_head:
            raise ValueError(f"{self.kind}: n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        dropout = check_dropout(self.kind, cfg)
        self.config = cfg
        self.block_size = block_size

        self.wte = nn.Embedding(VOCAB_SIZE, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, VOCAB_SIZE)  # not tied to wte: every matmul is an nn.Linear
        self._init_weights(n_layer)

    def _init_weights(self, n_layer: int) -> None:
        # nanoGPT: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2 n_layer)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx: Tensor) -> Tensor:
        """Token ids (B, T) -> next-token logits (B, T, VOCAB_SIZE)."""
        n_tokens = idx.shape[1]
        if n_tokens > self.block_size:
            raise ValueError(f"sequence of {n_tokens} tokens exceeds block_size {self.block_size}")
        pos = torch.arange(n_tokens, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    def collate(self, samples: Sequence[Mapping[str, Any]]) -> Batch:
        """-> idx (B, T) token ids, PAD-padded on the right; labels (B, T) next token or IGNORE."""
        texts = _strings(sample_values(self.kind, samples, "input"), "input")
        targets = _strings(sample_values(self.kind, samples, "target"), "target")
        encoded = [
            encode_example(x, y, self.block_size, self.max_input) for x, y in zip(texts, targets, strict=True)
        ]
        T = max(len(seq) for seq, _ in encoded) - 1
        idx = torch.full((len(encoded), T), PAD, dtype=torch.long)
        labels = torch.full((len(encoded), T), IGNORE, dtype=torch.long)
        for i, (seq, n_prompt) in enumerate(encoded):
            n = len(seq) - 1
            idx[i, :n] = torch.tensor(seq[:-1])
            # position t predicts seq[t + 1]; the first target token follows SEP at index n_prompt - 1
            labels[i, n_prompt - 1 : n] = torch.tensor(seq[n_prompt:])
        return {"idx": idx, "labels": labels}

    def per_sample_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """loss_i = mean over target positions t of -log p(labels_it | idx_i,<=t): (B,)."""
        logits = self(batch["idx"])  # (B, T, V)
        labels = batch["labels"]  # (B, T)
        nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none")
        nll = nll.view_as(labels)  # (B, T), 0 where IGNORE: padding gets no gradient
        count = (labels != IGNORE).sum(dim=1).clamp(min=1)  # (B,)
        return nll.sum(dim=1) / count

    @torch.no_grad()
    def predict(self, inputs: Sequence[Any]) -> list[str]:
        """Greedy completion of each input, without the input, up to EOS or a full block."""
        prompts = [encode_prompt(x, self.max_input) for x in _strings(list(inputs), "input")]
        if not prompts:
            return []
        was_training = self.training
        self.eval()
        try:
            return self._greedy(prompts)
        finally:
            self.train(was_training)

    def _greedy(self, prompts: list[list[int]]) -> list[str]:
        B, L = len(prompts), self.block_size + 1
        buf = torch.full((B, L), PAD, dtype=torch.long, device=self.device)  # (B, L), right-padded
        for i, p in enumerate(prompts):
            buf[i, : len(p)] = torch.tensor(p)
        start = torch.tensor([len(p) for p in prompts], device=self.device)  # (B,)
        length = start.clone()
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        while not bool(done.all()):
            rows = (~done).nonzero().squeeze(1)  # (A,) unfinished rows
            n = length[rows]  # (A,)
            # causal attention: right padding cannot change logits at position n - 1
            logits = self(buf[rows, : int(n.max())])  # (A, T, V)
            last = logits[torch.arange(len(rows), device=self.device), n - 1]  # (A, V)
            last[:, SEP] = last[:, PAD] = float("-inf")
            token = last.argmax(dim=-1)  # (A,)
            buf[rows, n] = token
            length[rows] = n + 1
            done[rows] = (token == EOS) | (n + 1 == L)
        out = []
        for seq, s, e in zip(buf.tolist(), start.tolist(), length.tolist(), strict=True):
            completion = [t for t in seq[s:e] if t < 256]  # drop the final EOS
            out.append(bytes(completion).decode("utf-8", errors="replace"))
        return out


def _strings(values: list[Any], name: str) -> list[str]:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise TypeError(f"tiny-gpt: sample {i} {name} must be a string, got {type(v).__name__}")
    return values
