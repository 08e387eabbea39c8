"""Dynamic sampling (batch.filter_groups): the selection rules by hand, and in training every
trained group has signal while the batch keeps its size, a resume draws the prompts an
uninterrupted run does, and (slow) learner ranks with a rollout worker equal one process."""

import json
from pathlib import Path

import pytest
import torch

from stablerl import checkpoint
from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.filtering import chosen, final_groups, needs_another_round, step_metrics
from stablerl.learner import Learner
from stablerl.loop import Trainer
from stablerl.runlog import read_metrics

REWARD = str(Path(__file__).parent / "data" / "reward_fns.py") + ":graded_on_half"
BASE = [
    "batch.prompts_per_step=4",
    "batch.group_size=4",
    "rollout.max_new_tokens=12",
    "task.levels=[1]",
    "task.eval_size=4",
    "eval.every=100",
    "log.progress=false",
    "log.tensorboard=false",
    "log.rollouts=true",
    f"task.reward_fns=[{REWARD}]",
    "optim.lr=1e-3",
    "batch.filter_groups=true",
]


def config(ckpt, run_dir, *extra) -> RunConfig:
    return build_config(RunConfig, None, [f"model.path={ckpt}", f"run_dir={run_dir}", *BASE, *extra])


def run(ckpt, run_dir, *extra, resume=False):
    trainer = Trainer(config(ckpt, run_dir, *extra), run_dir, resume=resume, log=lambda *_: None)
    return trainer.run(), read_metrics(run_dir)


def test_selection_rules_by_hand():
    flags = [torch.tensor([True, False, False, True]), torch.tensor([False, True, True, False])]
    assert chosen(flags, 4) == [(0, 0), (0, 3), (1, 1), (1, 2)]
    assert chosen(flags, 3) == [(0, 0), (0, 3), (1, 1)]
    assert not needs_another_round(flags, 4, max_rounds=5)
    assert needs_another_round(flags[:1], 4, max_rounds=1) and not needs_another_round(flags[:1], 4, max_rounds=0)
    # the rounds ran out: the places left are filled with groups without signal, earliest first
    assert final_groups(flags[:1], 4) == [(0, 0), (0, 3), (0, 1), (0, 2)]
    none = [torch.zeros(4, dtype=torch.bool)]
    assert final_groups(none, 4) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert step_metrics(flags, 4) == {
        "filter/groups_dropped": 4.0,
        "filter/extra_rounds": 1.0,
        "filter/groups_short": 0,
    }
    assert step_metrics(flags[:1], 4)["filter/groups_short"] == 2


def test_every_trained_group_has_signal_and_the_batch_keeps_its_size(sft_ckpt, tmp_path, monkeypatch):
    trained = []
    update = Learner.update

    def spy(self, step, batch, first_row):
        trained.append(batch.rewards.clone())
        return update(self, step, batch, first_row)

    monkeypatch.setattr(Learner, "update", spy)
    state, rows = run(sft_ckpt, tmp_path / "f", "train.steps=4")
    assert len(trained) == 4 and all(len(r) == 16 for r in trained)
    assert all(bool((r.view(4, 4).std(1) > 0).all()) for r in trained)
    steps = rows[1:]
    extra = [r["filter/extra_rounds"] for r in steps]
    assert sum(extra) > 0  # about half the prompts have no signal: it had to sample more
    assert all(r["filter/groups_short"] == 0 for r in steps)
    assert state.extra_prompts == 4 * sum(extra)
    # without the filter the same run trains groups without signal
    trained.clear()
    run(sft_ckpt, tmp_path / "plain", "train.steps=4", "batch.filter_groups=false")
    assert any(not bool((r.view(4, 4).std(1) > 0).all()) for r in trained)


def test_a_filtered_run_resumes_exactly(sft_ckpt, tmp_path):
    _, full = run(sft_ckpt, tmp_path / "full", "train.steps=4", "checkpoint.every=1")
    run(sft_ckpt, tmp_path / "part", "train.steps=2", "checkpoint.every=1")
    _, resumed = run(sft_ckpt, tmp_path / "part", "train.steps=4", "checkpoint.every=1", resume=True)
    assert sum(r["filter/extra_rounds"] for r in full[1:3]) > 0  # the resumed state carries a cursor
    skip = ("time", "per_s", "eval/")  # the part run also evaluates at its last step, 2
    for a, b in zip(full, resumed):
        a, b = ({k: v for k, v in r.items() if not any(t in k for t in skip)} for r in (a, b))
        assert a == b
    logged = [(tmp_path / d / "rollouts.jsonl").read_text() for d in ("full", "part")]
    assert logged[0] == logged[1]
    wa = checkpoint.load_model_weights(checkpoint.latest(tmp_path / "full"))
    wb = checkpoint.load_model_weights(checkpoint.latest(tmp_path / "part"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
@pytest.mark.parametrize("eta,learners", [(1, 2), (0, 1)], ids=["eta1-L2-R1", "eta0-L1-R1"])
def test_learners_and_a_worker_filter_as_one_process(sft_ckpt, tmp_path, eta, learners):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from launch import torchrun_train

    extra = ["train.steps=3", "rollout.precision=fp32", f"rollout.max_staleness={eta}", "checkpoint.every=3"]
    _, ref = run(sft_ckpt, tmp_path / "ref", *extra)
    args = [f"model.path={sft_ckpt}", f"run_dir={tmp_path / 'w'}", *BASE, *extra, "rollout.workers=1"]
    rc, out = torchrun_train(args, nproc=learners + 1, timeout=300)
    assert rc == 0, out[-3000:]
    got = read_metrics(tmp_path / "w")
    keys = ("filter/extra_rounds", "filter/groups_dropped", "reward_mean", "groups_without_signal")
    assert [[r.get(k) for k in keys] for r in ref] == [[r.get(k) for k in keys] for r in got]
    assert sum(r.get("filter/extra_rounds", 0) for r in got) > 0
    for a, b in zip(ref[1:], got[1:]):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    a, b = (
        json.loads(x) for x in ((tmp_path / d / "rollouts.jsonl").read_text().splitlines()[-1] for d in ("ref", "w"))
    )
    assert a["completions"] == b["completions"]
