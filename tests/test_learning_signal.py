"""Steps without learning signal: no optimizer step on a zero-gradient mini-batch
(optim.skip_empty_steps), the count of such steps, and the warning when almost no group has signal."""

import json
from pathlib import Path

import pytest
import torch

from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.learning_signal import groups_without_signal, has_signal, no_signal_warning
from stablerl.loop import Trainer
from stablerl.runlog import read_metrics
from stablerl.tasks import build_task

FNS = str(Path(__file__).parent / "data" / "reward_fns.py")
TINY = [
    "batch.prompts_per_step=2",
    "batch.group_size=4",
    "rollout.max_new_tokens=12",
    "task.levels=[1]",
    "task.eval_size=8",
    "eval.every=10",
    "log.progress=false",
    "log.tensorboard=false",
    "optim.lr=1e-3",
    f"task.reward_fns=[{FNS}:graded_if_listed]",
]


def _train(ckpt, run_dir, steps, *extra) -> tuple[dict, dict]:
    cfg = build_config(
        RunConfig, None, [f"model.path={ckpt}", f"run_dir={run_dir}", f"train.steps={steps}", *TINY, *extra]
    )
    trainer = Trainer(cfg, run_dir, log=lambda *_: None)
    state = trainer.run()
    weights = {k: v.detach().clone() for k, v in trainer.learner.model.state_dict().items()}
    moments = [dict(s) for s in trainer.learner.optimizer.state.values()]
    return weights, {"state": state, "moments": moments}


@pytest.fixture
def step1_signal_only(tmp_path, monkeypatch):
    """The reward has signal at step 1 only: its prompts (indices P .. 2P-1 of the stream) are graded."""
    cfg = build_config(RunConfig, None, TINY)
    task = build_task(cfg.task)
    P = cfg.batch.prompts_per_step
    listed = tmp_path / "listed.txt"
    listed.write_text("\n\x00\n".join(task.train_problem(P + i).prompt for i in range(P)))
    monkeypatch.setenv("STABLERL_TEST_SIGNAL_PROMPTS", str(listed))
    return tmp_path


def test_steps_without_signal_leave_weights_and_adam_moments_bit_identical(sft_ckpt, step1_signal_only):
    tmp = step1_signal_only
    after1, _ = _train(sft_ckpt, tmp / "one", 1)
    after3, info = _train(sft_ckpt, tmp / "three", 3)
    assert all(torch.equal(after1[k], after3[k]) for k in after1)
    rows = read_metrics(tmp / "three")
    assert [r["steps_skipped"] for r in rows if r["step"] >= 1] == [0, 1, 1]
    assert [r["groups_without_signal"] for r in rows if r["step"] >= 1][1:] == [1.0, 1.0]
    assert rows[1]["grad_norm"] > 0 and rows[2]["grad_norm"] == 0 and rows[3]["grad_norm"] == 0
    assert info["state"].steps_skipped == 2
    assert all(int(m["step"]) == 1 for m in info["moments"])  # Adam took one step: bias correction counts it
    summary = json.loads((tmp / "three" / "summary.json").read_text())
    shares = [r["groups_without_signal"] for r in rows if "groups_without_signal" in r]
    assert summary["steps_skipped"] == 2 and summary["groups_without_signal"] == pytest.approx(sum(shares) / 3)
    assert ("no_signal_warning" in summary) == (sum(shares) / 3 >= 0.8)


def test_without_skipping_adams_momentum_moves_the_weights_after_the_signal_is_gone(sft_ckpt, step1_signal_only):
    tmp = step1_signal_only
    after1, _ = _train(sft_ckpt, tmp / "one", 1, "optim.skip_empty_steps=false")
    after3, info = _train(sft_ckpt, tmp / "three", 3, "optim.skip_empty_steps=false")
    moved = [k for k in after1 if not torch.equal(after1[k], after3[k])]
    assert len(moved) > len(after1) // 2
    assert info["state"].steps_skipped == 0


def test_signal_flags_by_group_and_by_response():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert groups_without_signal(rewards, 2).tolist() == [True, False, True]
    mask = torch.tensor([[True, True], [False, False], [True, False]])
    assert has_signal(torch.tensor([0.0, 0.0, 0.5]), mask)
    assert not has_signal(torch.tensor([0.0, 0.7, 0.0]), mask)  # the non-zero one has no trained token
    assert not has_signal(torch.zeros(3), mask)


def test_the_warning_names_the_share_and_what_to_do():
    assert no_signal_warning([0.5, 0.6]) is None
    assert no_signal_warning([]) is None
    text = no_signal_warning([0.9, 1.0, 0.95])
    assert "95%" in text and "3 steps" in text and "batch.group_size" in text and "cold start" in text


def test_the_skip_count_and_the_prompt_cursor_survive_a_checkpoint():
    from stablerl.rundir import RunState

    state = RunState(step=3, metrics_lines=4, steps_skipped=2, extra_prompts=8)
    back = RunState.from_checkpoint(state.to_checkpoint())
    assert back.steps_skipped == 2 and back.extra_prompts == 8
    with pytest.raises(ValueError, match="extra_prompts"):
        RunState.from_checkpoint({**state.to_checkpoint(), "extra_prompts": -1})
