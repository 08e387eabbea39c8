"""Every derived seed of a run, by named purpose.

A seed is a function of (run seed, step, purpose, ...) only — never of the rank, the process or
the wall clock — so a resumed run repeats an uninterrupted one and a K-rank run the 1-rank run.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum

# every seed handed to a torch.Generator stays below this (derived seeds are 60-bit already;
# the sums of a base seed and an index are taken modulo it)
SEED_MODULUS = 2**62


class Purpose(IntEnum):
    """What a derived seed is for; the value is part of the hash, so it never changes."""

    ROLLOUT = 0  # the sampling noise of a step's rollouts (one stream per global response index)
    SHUFFLE = 1  # the order in which a step's rollout batch is split into mini-batches
    EVAL = 2  # the sampling noise of held-out evaluation
    WEIGHT_NOISE = 3  # the engine's weight-noise pattern of one policy version (rollout.weight_noise_redraw)


def derive_seed(seed: int, *parts: int) -> int:
    """A seed for (run seed, step, purpose, ...): the same on every rank and on every resume."""
    # int(): an IntEnum's repr is not its number, and the hash must stay what it always was
    key = repr((int(seed), *(int(p) for p in parts)))
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16) % SEED_MODULUS


def rollout_seeds(seed: int, step: int, indices) -> list[int]:
    """One seed per response, by its global index in the step's rollout batch."""
    base = derive_seed(seed, step, Purpose.ROLLOUT)
    return [(base + i) % SEED_MODULUS for i in indices]


def shuffle_seed(seed: int, step: int) -> int:
    return derive_seed(seed, step, Purpose.SHUFFLE)


def eval_seed(seed: int, step: int, *parts: int) -> int:
    return derive_seed(seed, step, Purpose.EVAL, *parts)


def weight_noise_seed(seed: int, version: int) -> int:
    """The engine's weight-noise pattern for policy version ``version``: the same on every rank,
    worker and resume, different for every version."""
    return derive_seed(seed, version, Purpose.WEIGHT_NOISE)
