"""Content groups: the key under which the trainer shares one weight among copies of the same content."""

from __future__ import annotations

import numpy as np

from app.schema import content_group


def test_text_copies_agree_up_to_case_and_whitespace_and_the_target_keeps_them_apart() -> None:
    assert content_group("What is  2+2?", "4") == content_group("what is 2+2? ", "4")
    assert content_group("What is 2+2?", "4") != content_group("What is 2+2?", "5")
    assert content_group("What is 2+2?", "4") != content_group("What is 2+3?", "4")


def test_vectors_with_faint_noise_share_a_group_and_distinct_vectors_do_not() -> None:
    rng = np.random.default_rng(0)
    images = rng.random((200, 64))  # distinct vectors, ~0.6 rad apart
    grouped = 0
    for x in images:
        key = content_group(x.tolist(), 3)
        assert content_group((x * 2.5).tolist(), 3) == key  # the direction is what counts, not the scale
        assert content_group(x.tolist(), 4) != key
        noisy = x + rng.normal(0.0, 0.002, size=64)  # ~0.004 rad: a near-duplicate
        grouped += content_group(noisy.tolist(), 3) == key
    assert grouped >= 0.7 * len(images)  # P(all 128 bits agree) ~ 0.85 at this angle
    keys = {content_group(x.tolist(), 3) for x in images}
    assert len(keys) == len(images)  # no two distinct vectors collide


def test_vector_groups_are_pinned_across_processes_and_releases() -> None:
    # groups live in the buffer across API restarts and upgrades: the projections must never change
    assert content_group([0.25] * 8, 0) == "6e33ab20f8d86ec4"
    assert content_group([0.1, 0.9, 0.3], 2) == "05ad1ac82e22497d"
