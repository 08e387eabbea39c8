"""The learner: optimizer and learning-rate schedule."""

import math

import pytest


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_schedules_by_hand(schedule):
    from stablerl.config import OptimConfig
    from stablerl.optimizer import learning_rate

    optim = OptimConfig(lr=1.0, warmup_steps=2, schedule=schedule, min_lr_ratio=0.1)
    lrs = [learning_rate(s, optim, total_steps=12) for s in range(12)]
    assert lrs[:2] == [0.5, 1.0]  # warm-up: (s + 1) / 2
    expected = {
        "constant": [1.0] * 10,
        "linear": [0.1 + 0.9 * (1 - k / 9) for k in range(10)],
        "cosine": [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 9)) for k in range(10)],
    }[schedule]
    assert lrs[2:] == pytest.approx(expected)
    assert lrs[-1] == pytest.approx(1.0 if schedule == "constant" else 0.1)
