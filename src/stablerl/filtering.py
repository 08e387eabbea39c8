"""Dynamic sampling (DAPO; ``batch.filter_groups``): a step trains only groups with learning
signal, sampling more prompts until the batch is full (docs/training.md "Dynamic sampling").

A step samples its P prompts (round 0), as without filtering. Every group whose rewards are all
equal is dropped (its advantages are zero: it adds nothing but dilution); while fewer than P groups
with signal are in hand and fewer than ``batch.filter_max_rounds`` extra rounds have run, another P
prompts are sampled from the stream (round r: prompt indices ``base + r*P + i``, response seeds
by ``r*P*G + ...`` of the step). The batch is then the first P groups with signal in (round,
prompt) order; when the rounds run out it is filled up with groups without signal (they add
nothing to the gradient; counted), so its shape and the ranks' shares never change.

The decisions depend only on every rank's rewards (gathered), so every rank and rollout worker
takes the same ones; the prompts an extra round consumed are counted in the run state, so a
resumed run draws the prompts an uninterrupted one would. The functions here are rank-blind;
the loop moves the chosen groups between ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from stablerl import distributed as D
from stablerl.learning_signal import groups_without_signal
from stablerl.rollout import RolloutBatch, concat

# metric names (per step)
GROUPS_DROPPED = "filter/groups_dropped"  # groups without signal seen over every round of the step
EXTRA_ROUNDS = "filter/extra_rounds"  # rounds sampled beyond the first
GROUPS_SHORT = "filter/groups_short"  # places filled with groups without signal when the rounds ran out


def with_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group of one round (``rewards`` of every rank, in global order): True when it has signal."""
    return ~groups_without_signal(rewards, group_size)


def chosen(flags: list[torch.Tensor], wanted: int) -> list[tuple[int, int]]:
    """The first ``wanted`` groups with signal, as (round, group index in the round), in order."""
    found = [(r, int(g)) for r, f in enumerate(flags) for g in torch.nonzero(f).flatten().tolist()]
    return found[:wanted]


def needs_another_round(flags: list[torch.Tensor], wanted: int, max_rounds: int) -> bool:
    """Whether to sample another round: fewer than ``wanted`` groups with signal so far, and fewer
    than ``max_rounds`` extra rounds run."""
    return len(chosen(flags, wanted)) < wanted and len(flags) - 1 < max_rounds


def final_groups(flags: list[torch.Tensor], wanted: int) -> list[tuple[int, int]]:
    """The step's ``wanted`` groups: those with signal first (``chosen``), then, when they are too
    few, groups without signal in (round, index) order to fill the batch."""
    picked = chosen(flags, wanted)
    taken = set(picked)
    rest = [(r, g) for r, f in enumerate(flags) for g in range(len(f)) if (r, g) not in taken]
    return picked + rest[: wanted - len(picked)]


def step_metrics(flags: list[torch.Tensor], wanted: int) -> dict[str, float]:
    """What the filter did at one step."""
    return {
        GROUPS_DROPPED: float(sum(int((~f).sum()) for f in flags)),
        EXTRA_ROUNDS: float(len(flags) - 1),
        GROUPS_SHORT: float(wanted - len(chosen(flags, wanted))),
    }


def _global_rewards(batch: RolloutBatch) -> torch.Tensor:
    """Every rank's rewards of one round, in global order (each rank holds a contiguous share)."""
    return torch.cat([torch.as_tensor(r) for r in D.all_gather_objects(batch.rewards)])


def _gather_groups(
    rounds: list[RolloutBatch], picks: list[tuple[int, int]], mine: range, group_size: int, pad_token_id: int
) -> RolloutBatch:
    """This rank's share ``mine`` of the ``picks`` (positions 0..P-1), wherever each was sampled:
    every rank offers the picked groups it holds, and takes those at its own positions."""
    held = {}
    for rd, g in picks:
        if g in mine:
            first = (g - mine.start) * group_size
            held[(rd, g)] = replace(rounds[rd].select(list(range(first, first + group_size))), group_ids=None)
    everything: dict = {}
    for part in D.all_gather_objects(held):
        everything.update(part)
    return concat([everything[picks[p]] for p in mine], pad_token_id)


def fill_batch(
    first: RolloutBatch,
    sample_round: Callable[[int], RolloutBatch],
    wanted: int,
    group_size: int,
    max_rounds: int,
    mine: range,
    pad_token_id: int,
    announce: Callable[[bool], None] | None = None,
) -> tuple[RolloutBatch, int, dict[str, float]]:
    """This rank's groups of the filtered batch, the extra rounds sampled, and the step's metrics.

    ``first`` is this rank's round 0 (its share ``mine`` of the ``wanted`` groups);
    ``sample_round(r)`` samples this rank's share of round r; ``announce(more)`` tells the rollout
    workers, before each round and once at the end, whether another round follows."""
    rounds, flags = [first], [with_signal(_global_rewards(first), group_size)]
    while needs_another_round(flags, wanted, max_rounds):
        if announce is not None:
            announce(True)
        rounds.append(sample_round(len(rounds)))
        flags.append(with_signal(_global_rewards(rounds[-1]), group_size))
    if announce is not None:
        announce(False)
    picks = final_groups(flags, wanted)
    if picks == [(0, g) for g in range(wanted)]:  # round 0 as drawn: every group had signal
        batch = first
    else:
        batch = _gather_groups(rounds, picks, mine, group_size, pad_token_id)
    return batch, len(rounds) - 1, step_metrics(flags, wanted)
