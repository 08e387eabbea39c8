"""Derived seeds: named purposes, the same numbers as the formula every earlier run used."""

import hashlib

from stablerl.seeds import Purpose, derive_seed, eval_seed, rollout_seeds, shuffle_seed


def _formula(*key) -> int:
    # the derivation every checkpointed run was made with (sha256 of the repr of the int tuple)
    return int(hashlib.sha256(repr(tuple(key)).encode()).hexdigest()[:15], 16) % 2**62


def test_purposes_keep_their_numbers():
    assert (Purpose.ROLLOUT, Purpose.SHUFFLE, Purpose.EVAL) == (0, 1, 2)


def test_derived_seeds_equal_the_formula():
    assert derive_seed(7, 3, Purpose.SHUFFLE) == _formula(7, 3, 1)
    assert shuffle_seed(7, 3) == _formula(7, 3, 1)
    assert eval_seed(0, 50, 12) == _formula(0, 50, 2, 12)
    base = _formula(5, 9, 0)
    assert rollout_seeds(5, 9, [0, 1, 17]) == [base % 2**62, (base + 1) % 2**62, (base + 17) % 2**62]


def test_seeds_differ_by_purpose_and_step():
    seeds = {shuffle_seed(0, 1), eval_seed(0, 1), rollout_seeds(0, 1, [0])[0], shuffle_seed(0, 2)}
    assert len(seeds) == 4
