"""Resuming a run: what a resume may change, damaged records, state that must survive."""

import json

import pytest
import torch
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
    capsys.readouterr()  # the in-process run's own output is not the CLI's
    assert "already holds a run" in cli_error(capsys, ["train", *args(sft_ckpt, run_dir, "train.steps=2")])
    assert main(["train", "--resume", str(run_dir), "train.steps=2"]) == 0
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == [0, 1, 2]  # step 0 once, nothing dropped


def test_resume_overrides_are_checked_and_recorded(sft_ckpt, tmp_path, capsys):
    run_dir = tmp_path / "rec"
    train(sft_ckpt, run_dir, "train.steps=1")
    capsys.readouterr()  # the in-process run's own output is not the CLI's
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


# ---------------------------------------------------------------------------------------------
# Nothing in a run directory changes what a resume trains on, or runs code (stablerl.resume)
# ---------------------------------------------------------------------------------------------
def test_a_planted_config_json_changes_nothing_a_resume_trains_on(sft_ckpt, tmp_path, capsys):
    """RUN/config.json rewritten (another task seed, a reward module elsewhere): the resume
    continues the checkpoint's checksummed record, names the keys where config.json differs, never
    imports the planted module, and a typed change of the seed is still refused."""
    from stablerl.cli import main

    run = tmp_path / "run"
    train(sft_ckpt, run, "train.steps=1")
    marker = tmp_path / "evil_ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('x')\ndef f(prompt, completion):\n    return 1.0\n")
    saved = json.loads((run / "config.json").read_text())
    saved["task"]["seed"], saved["task"]["reward_fns"] = 7, [f"{evil}:f"]
    (run / "config.json").write_text(json.dumps(saved))
    assert main(["train", "--resume", str(run), "train.steps=2"]) == 0
    out = capsys.readouterr()
    warning = next(line for line in (out.out + out.err).splitlines() if "differs from the checksummed record" in line)
    assert "task.seed" in warning and "task.reward_fns" in warning
    assert not marker.exists()
    now = json.loads((run / "config.json").read_text())
    assert now["task"]["seed"] == 0 and now["task"]["reward_fns"] != [f"{evil}:f"] and now["train"]["steps"] == 2
    changes = [json.loads(x) for x in (run / "config_changes.jsonl").read_text().splitlines()]
    assert list(changes[-1]["changes"]) == ["train.steps"]
    assert main(["train", "--resume", str(run), "task.seed=7", "train.steps=3"]) == 2
    assert "task.seed" in capsys.readouterr().err


def _two_checkpoints(sft_ckpt, tmp_path):
    run = tmp_path / "run"
    train(sft_ckpt, run, "train.steps=2", "checkpoint.every=1", "checkpoint.keep_last=2")
    return run


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda s: s.update(step=-3), "step"),
        (lambda s: s.update(step=999), "records step 999"),
        (lambda s: s.update(step=1), "records step 1"),
        (lambda s: s.update(metrics_lines=-1), "metrics_lines"),
        (lambda s: s.update(collapse="x"), "collapse"),
        (lambda s: s.update(reward_errors="3"), "reward_errors"),
        (lambda s: s.pop("files"), "no checksum table"),
        (lambda s: s.update(files={}), "not in the checkpoint's checksum table"),
    ],
    ids=[
        "negative-step",
        "step-beyond",
        "step-not-its-folder",
        "negative-lines",
        "str-collapse",
        "str-count",
        "no-table",
        "empty-table",
    ],
)
def test_a_state_json_out_of_its_bounds_is_damage_and_the_resume_falls_back(sft_ckpt, tmp_path, edit, named):
    from stablerl import checkpoint
    from stablerl.runlog import read_metrics

    run = _two_checkpoints(sft_ckpt, tmp_path)
    newest = checkpoint.latest(run)
    state = json.loads((newest / "state.json").read_text())
    edit(state)
    (newest / "state.json").write_text(json.dumps(state))
    why = checkpoint.damage(newest)
    assert why is not None and named in why and str(newest / "state.json") in why
    good, skipped = checkpoint.latest_good(run)
    assert good.name == "step_000001" and newest.name in skipped[0]
    train(sft_ckpt, run, "train.steps=3", "checkpoint.every=1", "checkpoint.keep_last=2", resume=True)
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3]


def test_a_replaced_kl_reference_is_refused_naming_both_digests(sft_ckpt, tmp_path):
    import shutil

    from stablerl.checkpoint import save_model_dir
    from stablerl.models import load_policy
    from stablerl.resume import weights_digest

    start = tmp_path / "start"
    shutil.copytree(sft_ckpt, start)
    run = tmp_path / "run"
    train(start, run, "train.steps=1", "loss.kl_beta=0.1")
    before = weights_digest(start)
    model, tok = load_policy(start)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_model_dir(start, model, tok)  # the same folder, other weights
    after = weights_digest(start)
    with pytest.raises(ValueError, match="reference policy") as e:
        train(start, run, "train.steps=2", "loss.kl_beta=0.1", resume=True)
    assert before in str(e.value) and after in str(e.value) and before != after
