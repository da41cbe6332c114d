"""A vectorised K-ary sum tree: weighted sampling of slots with P(i) = value_i / total.

Level 0 holds the leaf values; each node of level l + 1 is the sum of K consecutive nodes of level l;
the top level is the root, ``total``. Every level is padded with zeros to a whole number of K-groups.
Memory: 8 bytes * (cap + cap/K + cap/K^2 + ...) ~= 8 K/(K-1) bytes per slot (8.5 for K = 16).

update: writes leaves, then recomputes only the touched ancestors, level by level, from their children
(not by adding deltas, so the sums never drift). sample: k descents in lockstep, one gather + cumsum per
level. Neither loops in Python over elements, only over the ~log_K(cap) levels.
"""

from __future__ import annotations

import itertools

import numpy as np


class SumTree:
    """Non-negative float64 values in slots 0..len-1; capacity doubles as slots are added."""

    def __init__(self, capacity: int = 1024, branching: int = 16) -> None:
        if branching < 2:
            raise ValueError(f"branching must be >= 2, got {branching}")
        self.K = branching
        self._size = 0
        self._levels: list[np.ndarray] = []  # [leaves, ..., root (1,)]
        self._build(np.zeros(max(1, capacity), dtype=np.float64))

    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return len(self._levels[0])

    @property
    def total(self) -> float:
        return float(self._levels[-1][0])

    @property
    def nbytes(self) -> int:
        return sum(level.nbytes for level in self._levels)

    def values(self, idx: np.ndarray | None = None) -> np.ndarray:
        """A copy of the values at ``idx`` (all live slots when None)."""
        leaves = self._levels[0]
        return leaves[: self._size].copy() if idx is None else leaves[np.asarray(idx, dtype=np.int64)]

    def append(self, values: np.ndarray) -> np.ndarray:
        """Add slots holding ``values``; returns their indices."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        idx = np.arange(self._size, self._size + len(values), dtype=np.int64)
        self.update(idx, values)
        return idx

    def update(self, idx: np.ndarray, values: np.ndarray) -> None:
        """Set ``values[j]`` at slot ``idx[j]`` (slots past the end are added; with repeated indices the
        last write wins)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        values = np.broadcast_to(np.asarray(values, dtype=np.float64).reshape(-1), idx.shape)
        if idx.size == 0:
            return
        if idx.min() < 0:
            raise IndexError("sum tree slots are >= 0")
        if not np.isfinite(values).all() or (values < 0).any():
            raise ValueError("sum tree values must be finite and >= 0")
        end = int(idx.max()) + 1
        if end > self.capacity:
            self._grow(end)
        self._size = max(self._size, end)
        self._levels[0][idx] = values
        if idx.size * 4 >= self.capacity:  # a bulk write: rebuilding every level is cheaper
            self._build(self._levels[0])
            return
        nodes = np.unique(idx // self.K)  # touched parents, sorted
        for lower, upper in itertools.pairwise(self._levels):
            if nodes.size * 4 >= len(upper):  # most of the level: one reshape-sum is cheaper
                upper[: len(lower) // self.K] = lower.reshape(-1, self.K).sum(axis=1)
            else:
                # upper[n] = sum_j lower[n K + j]: (P, K) gather -> (P,)
                upper[nodes] = lower[nodes[:, None] * self.K + np.arange(self.K)].sum(axis=1)
            parents = nodes // self.K  # sorted, so dedupe by neighbours
            nodes = parents[np.concatenate(([True], parents[1:] != parents[:-1]))]

    def sample(self, k: int, rng: np.random.Generator, stratified: bool = True) -> np.ndarray:
        """``k`` slot indices drawn with P(i) = value_i / total (int64, shape (k,)).

        stratified: draw u_j uniformly in [j, j+1) * total / k (lower variance, sorted output);
        otherwise k iid draws. Zero-valued slots are never returned."""
        total = self.total
        if not total > 0:
            raise ValueError("cannot sample from a sum tree whose total is 0")
        # stratified: u_j in [j, j+1) * total / k; iid: u_j in [0, total): (k,)
        u = (np.arange(k) + rng.random(k)) * (total / k) if stratified else rng.random(k) * total
        node = np.zeros(k, dtype=np.int64)
        offsets = np.arange(self.K)
        rows = np.arange(k)
        for level in reversed(self._levels[:-1]):
            child = node[:, None] * self.K + offsets  # (k, K) child indices
            vals = level[child]  # (k, K)
            cum = np.cumsum(vals, axis=1)  # (k, K)
            # first child whose cumulative sum exceeds u; zero children never do (cum does not grow)
            j = (cum <= u[:, None]).sum(axis=1)  # (k,)
            # u can reach the children's sum by rounding: fall back to the last non-zero child
            last = self.K - 1 - np.argmax(vals[:, ::-1] > 0, axis=1)
            j = np.minimum(j, last)
            u = u - (cum[rows, j] - vals[rows, j])  # u minus the mass left of child j
            node = child[rows, j]
        return node

    def _grow(self, needed: int) -> None:
        cap = self.capacity
        while cap < needed:
            cap *= 2
        leaves = np.zeros(cap, dtype=np.float64)
        leaves[: self.capacity] = self._levels[0][: self.capacity]
        self._build(leaves)

    def _build(self, leaves: np.ndarray) -> None:
        """All levels from the leaves: level sizes are padded up to multiples of K."""
        n = -(-len(leaves) // self.K) * self.K
        levels = [np.zeros(n, dtype=np.float64)]
        levels[0][: len(leaves)] = leaves
        while len(levels[-1]) > self.K:
            groups = len(levels[-1]) // self.K
            upper = np.zeros(-(-groups // self.K) * self.K, dtype=np.float64)
            upper[:groups] = levels[-1].reshape(-1, self.K).sum(axis=1)
            levels.append(upper)
        levels.append(levels[-1].sum(keepdims=True))  # root: sum of the top K-group
        self._levels = levels
