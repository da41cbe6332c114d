import numpy as np
import pytest

from trainer.sumtree import SumTree


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson statistic over the cells with positive probability, and its degrees of freedom."""
    live = probs > 0
    expected = counts.sum() * probs[live]
    return float(((counts[live] - expected) ** 2 / expected).sum()), int(live.sum()) - 1


@pytest.mark.parametrize("stratified", [True, False])
@pytest.mark.parametrize("branching", [2, 16])
def test_sampling_distribution_matches_values_over_total(stratified: bool, branching: int) -> None:
    rng = np.random.default_rng(1)
    values = rng.random(200) ** 3  # uneven weights
    values[rng.choice(200, 40, replace=False)] = 0.0
    tree = SumTree(capacity=8, branching=branching)
    tree.append(values)
    counts = np.zeros(200)
    for _ in range(100):
        np.add.at(counts, tree.sample(2_000, rng, stratified=stratified), 1)
    stat, dof = _chi_square(counts, values / values.sum())
    # mean dof, sd sqrt(2 dof): 6 sd is a bound a correct sampler essentially never crosses
    assert stat < dof + 6 * np.sqrt(2 * dof)
    assert counts[values == 0].sum() == 0


def test_zero_valued_leaves_are_never_drawn() -> None:
    rng = np.random.default_rng(2)
    tree = SumTree(capacity=4, branching=4)
    values = np.zeros(1_000)
    values[[0, 3, 499, 500, 998]] = [1e-300, 1.0, 1e12, 2.5, 1e-3]  # tiny, huge and boundary slots
    tree.append(values)
    drawn = np.concatenate([tree.sample(4_096, rng, stratified=s) for s in (True, False) for _ in range(20)])
    assert set(np.unique(drawn)) <= {0, 3, 499, 500, 998}


def test_update_recomputes_total_and_slot_values() -> None:
    rng = np.random.default_rng(3)
    tree = SumTree(capacity=16)
    tree.append(rng.random(5_000))
    for _ in range(50):
        idx = rng.integers(0, 5_000, 300)
        tree.update(idx, rng.random(300))
    leaves = tree.values()
    assert tree.total == pytest.approx(leaves.sum(), rel=1e-12)
    tree.update(np.arange(5_000), np.zeros(5_000))
    assert tree.total == 0.0
    with pytest.raises(ValueError):
        tree.sample(1, rng)


def test_capacity_doubles_and_keeps_values_when_slots_are_added() -> None:
    tree = SumTree(capacity=4, branching=2)
    first = tree.append([1.0, 2.0, 3.0])
    assert tree.capacity == 4
    tree.update(np.array([9]), np.array([4.0]))  # past the end: slots 3..9 appear, zero-valued
    assert len(tree) == 10 and tree.capacity == 16
    np.testing.assert_array_equal(tree.values(first), [1.0, 2.0, 3.0])
    assert tree.total == 10.0
    assert list(tree.append([5.0])) == [10]


def test_memory_is_at_most_16_bytes_per_leaf() -> None:
    tree = SumTree()
    tree.append(np.ones(100_000))
    assert tree.nbytes <= 16 * tree.capacity
    assert tree.nbytes <= 16 * len(tree)


def test_negative_or_nan_values_are_rejected() -> None:
    tree = SumTree()
    with pytest.raises(ValueError):
        tree.update(np.array([0]), np.array([-1.0]))
    with pytest.raises(ValueError):
        tree.update(np.array([0]), np.array([np.nan]))
