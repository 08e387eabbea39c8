"""Resuming a run: what a resume may change, damaged records, state that must survive."""

import json

import pytest
from tinyrun import FNS, args, cli_error, config, train

from stablerl import checkpoint
from stablerl.cli import main
from stablerl.loop import Trainer
from stablerl.rundir import RunDir
from stablerl.runlog import read_metrics


def test_killed_before_the_first_checkpoint_resumes_cleanly(sft_ckpt, tmp_path, capsys):
    run_dir = tmp_path / "early"
    train(sft_ckpt, run_dir, "train.steps=1")
    # a kill after the step-0 evaluation, before the first checkpoint: the log has step 0 only
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text(lines[0] + "\n")
    for ckpt in checkpoint.complete_checkpoints(run_dir):
        import shutil

        shutil.rmtree(ckpt)
    (run_dir / "summary.json").unlink()
    assert "already holds a run" in cli_error(capsys, ["train", *args(sft_ckpt, run_dir, "train.steps=2")])
    assert main(["train", "--resume", str(run_dir), "train.steps=2"]) == 0
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == [0, 1, 2]  # step 0 once, nothing dropped


def test_resume_overrides_are_checked_and_recorded(sft_ckpt, tmp_path, capsys):
    run_dir = tmp_path / "rec"
    train(sft_ckpt, run_dir, "train.steps=1")
    for bad, key in (
        ("model.hidden_size=64", "model.hidden_size"),
        ("batch.group_size=8", "batch.group_size"),
        ("loss.algorithm=grpo", "loss.algorithm"),
        ("rollout.precision=fp8", "rollout.precision"),
    ):
        err = cli_error(capsys, ["train", "--resume", str(run_dir), bad])
        assert key in err and "Allowed on resume" in err
    cfg_file = tmp_path / "more.yaml"
    cfg_file.write_text("train:\n  steps: 2\noptim:\n  lr: 2.0e-5\n")
    assert main(["train", "--resume", str(run_dir), "--config", str(cfg_file), "eval.every=1"]) == 0
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["steps"] == 2 and saved["optim"]["lr"] == 2e-5 and saved["eval"]["every"] == 1
    changes = [json.loads(line) for line in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert changes[-1]["step"] == 1
    assert changes[-1]["changes"]["train.steps"] == {"from": 1, "to": 2}
    assert changes[-1]["changes"]["optim.lr"]["to"] == 2e-5 and "eval.every" in changes[-1]["changes"]
    assert read_metrics(run_dir)[-1]["step"] == 2


@pytest.mark.parametrize("content, expect", [("", "is empty"), ('{"model": {"pa', "not valid JSON")])
def test_damaged_config_on_resume(sft_ckpt, tmp_path, capsys, content, expect):
    run_dir = tmp_path / "dmg"
    train(sft_ckpt, run_dir, "train.steps=1")
    (run_dir / "config.json").write_text(content)
    err = cli_error(capsys, ["train", "--resume", str(run_dir), "train.steps=2"])
    assert "config.json" in err and expect in err


def test_kl_penalty_in_training_starts_at_zero_and_survives_a_resume(sft_ckpt, tmp_path):
    from stablerl.runlog import read_metrics

    run = tmp_path / "kl"
    graded = f"task.reward_fns=[{FNS}:digit_fraction]"  # non-zero advantages at every step: the policy moves
    Trainer(
        config(sft_ckpt, run, "train.steps=2", "loss.kl_beta=0.1", "optim.lr=1e-3", graded), run, log=lambda *_: None
    ).run()
    rows = read_metrics(run)
    assert rows[1]["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
    assert rows[2]["kl_ref"] > 1e-6  # it moved
    Trainer(
        config(sft_ckpt, run, "train.steps=3", "loss.kl_beta=0.1", "optim.lr=1e-3", graded),
        run,
        resume=True,
        log=lambda *_: None,
    ).run()
    assert read_metrics(run)[3]["kl_ref"] > 0


def test_what_a_reward_function_writes_into_the_run_dir_does_not_make_it_unresumable(sft_ckpt, tmp_path, capsys):
    from stablerl.cli import main

    run = tmp_path / "r"
    Trainer(config(sft_ckpt, run, "train.steps=2"), run, log=lambda *_: None).run()
    files = RunDir(run)
    lines = files.metrics.read_text().splitlines()
    files.metrics.write_text("\n".join(["garbage"] + lines[1:]) + "\n")  # an early line damaged
    Trainer(config(sft_ckpt, run, "train.steps=3"), run, resume=True, log=lambda *_: None).run()  # trains on
    files.config.write_text("{not json")
    rc = main(["train", "--resume", str(run), "train.steps=4"])
    err = capsys.readouterr().err
    copy = checkpoint.latest(run) / "run_config.json"
    assert rc == 2 and str(copy) in err and "copy the intact copy" in err
    files.config.write_text(copy.read_text())  # what the message says to do
    Trainer(config(sft_ckpt, run, "train.steps=4"), run, resume=True, log=lambda *_: None).run()
    assert json.loads(files.summary.read_text())["steps"] == 4
