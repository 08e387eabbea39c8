"""stablerl used as a hostile user would: every example of the hardening issue is a test here.

Each CLI error must be one line that names the input, what is wrong and what is allowed, with no
traceback; a run never loses or falsifies completed work.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stablerl import checkpoint
from stablerl.cli import main
from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.loop import Trainer, TrainingAborted
from stablerl.rundir import RunLock, RunLocked, RunState
from stablerl.runlog import CollapseDetector, RunLogger, read_metrics, write_summary

FNS = str(Path(__file__).parent / "data" / "reward_fns.py")
SAMPLE = str(Path(__file__).parents[1] / "src" / "stablerl" / "tasks" / "data" / "sample_math.jsonl")
TINY = [
    "batch.prompts_per_step=2",
    "batch.group_size=4",
    "rollout.max_new_tokens=12",
    "task.levels=[1]",
    "task.eval_size=8",
    "eval.every=2",
    "log.progress=false",
    "log.tensorboard=false",
]


def args(ckpt, run_dir, *extra):
    return [f"model.path={ckpt}", f"run_dir={run_dir}", *TINY, *extra]


def train(ckpt, run_dir, *extra, resume=False):
    cfg = build_config(RunConfig, None, args(ckpt, run_dir, *extra))
    return Trainer(cfg, run_dir, resume=resume, log=lambda *_: None).run()


def cli_error(capsys, argv) -> str:
    """Run the CLI, expect a user error: exit code 2 and exactly one line on stderr."""
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------------------------------------
# 1. reward functions cannot zero, stall or kill a run
# ---------------------------------------------------------------------------------------------
def test_a_hanging_verifier_costs_its_timeout_not_the_run(sft_ckpt, tmp_path):
    t0 = time.monotonic()
    # every response has digits, so every call of step 1 times out: going on with 0 is the opt-out
    # now (task.reward_fail_fast=false; by default such a function stops the run at step 1)
    state = train(
        sft_ckpt,
        tmp_path / "r",
        "train.steps=2",
        f"task.reward_fns=[{FNS}:hang_on_digits]",
        "task.reward_fail_fast=false",
        "task.reward_timeout_s=0.5",
        "task.reward_workers=2",
        "eval.every=10",
        "task.eval_size=2",
    )
    rows = read_metrics(tmp_path / "r")
    assert rows[-1]["step"] == 2 and state.reward_timeouts > 0
    assert rows[1]["reward_timeouts"] > 0
    # every hung call cost at most its 0.5 s timeout on 2 workers (plus a worker restart)
    assert time.monotonic() - t0 < 60


def test_eval_counts_verifier_failures(sft_ckpt, tmp_path, capsys):
    rc = main(
        [
            "eval",
            str(sft_ckpt),
            "task.levels=[1]",
            "task.eval_size=4",
            "eval.samples=1",
            f"task.reward_fns=[{FNS}:boom_always]",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["eval/reward_failures"] == 8  # 4 greedy + 4 sampled calls, each raised
    assert "boom_always x8" in out["eval/reward_failures_detail"]


# ---------------------------------------------------------------------------------------------
# 2. the last good checkpoint is good
# ---------------------------------------------------------------------------------------------
def test_absurd_learning_rate_never_leaves_a_non_finite_checkpoint(sft_ckpt, tmp_path):
    run_dir = tmp_path / "lr"
    with pytest.raises(TrainingAborted, match="no longer finite") as e:
        train(sft_ckpt, run_dir, "train.steps=3", "optim.lr=3e38")
    for ckpt in checkpoint.complete_checkpoints(run_dir):
        weights = checkpoint.load_model_weights(ckpt)
        assert all(bool(torch.isfinite(t).all()) for t in weights.values()), ckpt
    # the advice works: lower the learning rate and resume
    assert "optim.lr" in str(e.value) and "--resume" in str(e.value)
    train(sft_ckpt, run_dir, "train.steps=3", "optim.lr=1e-5", resume=True)
    assert read_metrics(run_dir)[-1]["step"] == 3
    weights = checkpoint.load_model_weights(checkpoint.latest(run_dir))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())


def test_saving_refuses_a_non_finite_state(sft_ckpt, tmp_path):
    from stablerl.models import load_policy

    model, tok = load_policy(sft_ckpt)
    opt = torch.optim.AdamW(model.parameters())
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(checkpoint.NonFiniteState, match="parameter"):
        checkpoint.save(tmp_path, 1, model, tok, opt, {}, keep_last=2)
    assert checkpoint.latest(tmp_path) is None


def test_the_batched_finiteness_check_agrees_with_a_check_per_element():
    """checkpoint.all_finite (one 2-norm per tensor, batched) against torch.isfinite on every
    element: NaN, +-inf at every position of tensors of three dtypes, finite values near the fp32
    maximum (their squares overflow: the exact test must decide), empty tensors."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for n in (1, 5, 16, 17, 300):
            for pos in range(n):
                for value in (float("nan"), float("inf"), -float("inf"), 3e38):
                    t = torch.randn(n, generator=g).to(dtype)
                    t[pos] = value
                    group = [torch.zeros(0), torch.randn(3, 2, generator=g), t]
                    assert checkpoint.all_finite(group) == all(bool(torch.isfinite(x).all()) for x in group)
    assert checkpoint.all_finite([]) and checkpoint.all_finite([torch.zeros(0)])


def test_the_check_names_a_non_finite_optimizer_state(sft_ckpt):
    from stablerl.models import load_policy

    model, _ = load_policy(sft_ckpt)
    opt = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    checkpoint.check_finite(model, opt)  # finite: nothing raised
    second = list(opt.state.values())[1]
    second["exp_avg_sq"].view(-1)[-1] = float("inf")
    with pytest.raises(checkpoint.NonFiniteState, match="optimizer state exp_avg_sq of parameter #1"):
        checkpoint.check_finite(model, opt)


@pytest.mark.parametrize(
    "bad",
    ["optim.lr=.inf", "optim.lr=nan", "task.reward_timeout_s=inf", "distributed.timeout_s=.nan", "loss.is_cap=inf"],
)
def test_non_finite_config_values_are_rejected_at_start(bad, capsys, tmp_path):
    err = cli_error(capsys, ["train", f"run_dir={tmp_path / 'x'}", bad])
    assert bad.split("=")[0] in err and "finite" in err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# 3. one writer per run directory; a record that stays true
# ---------------------------------------------------------------------------------------------
def test_a_second_writer_fails_at_once(sft_ckpt, tmp_path, capsys):
    run_dir = tmp_path / "busy"
    with RunLock(run_dir):  # another process training here
        t0 = time.monotonic()
        err = cli_error(capsys, ["train", *args(sft_ckpt, run_dir, "train.steps=1")])
        assert "in use by pid" in err and str(run_dir) in err and time.monotonic() - t0 < 30
    assert main(["train", *args(sft_ckpt, run_dir, "train.steps=1")]) == 0  # released: it works
    capsys.readouterr()
    with RunLock(run_dir):
        err = cli_error(capsys, ["train", "--resume", str(run_dir), "train.steps=2"])
        assert "in use" in err
    assert read_metrics(run_dir)[-1]["step"] == 1  # the refused resume wrote nothing


def test_a_lock_left_by_a_killed_process_is_not_stale(tmp_path):
    code = (
        f"from stablerl.rundir import RunLock; RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
        "import time; time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"pid {proc.pid}"):
            RunLock(tmp_path).acquire()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        RunLock(tmp_path).acquire().release()  # the kernel dropped the dead holder's lock
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


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


# ---------------------------------------------------------------------------------------------
# 4. clear errors instead of tracebacks
# ---------------------------------------------------------------------------------------------
def test_yaml_errors_in_files_and_overrides(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    err = cli_error(capsys, ["train", "--config", str(bad)])
    assert str(bad) in err and "not valid YAML" in err and "line" in err
    err = cli_error(capsys, ["train", "loss.eps_high=[0.2"])
    assert "loss.eps_high" in err and "not valid YAML" in err and "quote it" in err
    cfg = build_config(RunConfig, None, ["task.prompt_template=Question: {question}"])
    assert cfg.task.prompt_template == "Question: {question}"


@pytest.mark.parametrize(
    "content, expect",
    [
        (b"", "empty"),
        (b"  \n\n \t\n", "empty"),
        (b'{"question": "1+1?", "answer": "2"}\n{"question": "caf\xe9", "answer": "1"}\n', "line 2 is not valid UTF-8"),
    ],
)
def test_bad_data_files(tmp_path, capsys, content, expect):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    err = cli_error(capsys, ["train", f"run_dir={tmp_path / 'r'}", "task.name=dataset", f"task.dataset={data}"])
    assert str(data) in err and expect in err


def test_data_too_small_for_a_held_out_split_fails_before_sft(tmp_path, capsys):
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(3)))
    t0 = time.monotonic()
    err = cli_error(capsys, ["train", f"run_dir={tmp_path / 'r'}", "task.name=dataset", f"task.dataset={data}"])
    assert "too few" in err and "task.eval_dataset" in err and time.monotonic() - t0 < 20
    assert not (tmp_path / "r").exists()


def test_model_paths(tmp_path, capsys, sft_ckpt):
    err = cli_error(capsys, ["train", f"run_dir={tmp_path / 'r'}", f"model.path={tmp_path / 'nope'}"])
    assert "model.path" in err and "does not exist" in err and "hub" not in err
    (tmp_path / "notamodel").mkdir()
    err = cli_error(capsys, ["train", f"run_dir={tmp_path / 'r'}", f"model.path={tmp_path / 'notamodel'}"])
    assert "not an HF model directory" in err
    # `stablerl eval` given a run directory says which directory to give instead
    run_dir = tmp_path / "run"
    train(sft_ckpt, run_dir, "train.steps=1")
    err = cli_error(capsys, ["eval", str(run_dir)])
    assert "run directory" in err and "export" in err


@pytest.mark.parametrize("content, expect", [("", "is empty"), ('{"model": {"pa', "not valid JSON")])
def test_damaged_config_on_resume(sft_ckpt, tmp_path, capsys, content, expect):
    run_dir = tmp_path / "dmg"
    train(sft_ckpt, run_dir, "train.steps=1")
    (run_dir / "config.json").write_text(content)
    err = cli_error(capsys, ["train", "--resume", str(run_dir), "train.steps=2"])
    assert "config.json" in err and expect in err


def test_plot_of_a_run_with_a_half_written_line(sft_ckpt, tmp_path, capsys):
    run_dir = tmp_path / "half"
    train(sft_ckpt, run_dir, "train.steps=1")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "rew')
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 10_000
    # a damaged line in the middle is named, not a traceback
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    capsys.readouterr()
    err = cli_error(capsys, ["plot", str(run_dir)])
    assert "line 2 is not valid JSON" in err


def test_full_disk_during_a_checkpoint(sft_ckpt, tmp_path, monkeypatch):
    import errno

    import torch.distributed.checkpoint as dcp

    real_save, calls = dcp.save, {"n": 0}

    def save(state, checkpoint_id):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(dcp, "save", save)
    run_dir = tmp_path / "full"
    with pytest.raises(TrainingAborted, match="ENOSPC") as e:
        train(sft_ckpt, run_dir, "train.steps=3")
    assert str(run_dir / "checkpoints" / "step_000002") in str(e.value) and "intact" in str(e.value)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000001"]  # no partial one left
    weights = checkpoint.load_model_weights(checkpoint.latest(run_dir))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    monkeypatch.setattr(dcp, "save", real_save)
    train(sft_ckpt, run_dir, "train.steps=3", resume=True)  # space freed: resume goes on
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2, 3]


def test_overrides_after_config(sft_ckpt, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  steps: 5\n")
    run_dir = tmp_path / "after"
    assert main(["train", "train.steps=1", "--config", str(cfg_file), *args(sft_ckpt, run_dir)]) == 0
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 1
    assert read_metrics(run_dir)[-1]["step"] == 1


# ---------------------------------------------------------------------------------------------
# 5. no silent no-ops
# ---------------------------------------------------------------------------------------------
def test_routing_replay_that_cannot_or_does_nothing(tmp_path, capsys):
    from stablerl.checkpoint import save_model_dir
    from stablerl.models import build_model, build_tokenizer, tiny_config

    tok = build_tokenizer()
    dense = build_model(
        tiny_config(
            "qwen3",
            len(tok),
            hidden_size=32,
            num_layers=2,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    path = save_model_dir(tmp_path / "dense", dense, tok)
    err = cli_error(capsys, ["train", *args(path, tmp_path / "r3"), "train.routing_replay=R3"])
    assert "needs a Mixture-of-Experts model" in err and "train.routing_replay=none" in err


def test_r2_on_policy_warns(sft_ckpt, tmp_path):
    logs = []
    cfg = build_config(RunConfig, None, args(sft_ckpt, tmp_path / "r2", "train.steps=1", "train.routing_replay=R2"))
    Trainer(cfg, tmp_path / "r2", log=logs.append).run()
    assert any("R2 does nothing on-policy" in line for line in logs)


def test_data_file_warnings(tmp_path):
    from stablerl.tasks import DatasetTask

    task = DatasetTask(SAMPLE, eval_size=500)
    assert any("capped to 4" in w for w in task.warnings)
    task = DatasetTask(SAMPLE, eval_dataset=SAMPLE, eval_size=50, eval_size_set=True)
    assert any("task.eval_size=50 is ignored" in w for w in task.warnings)


def test_sft_cache_is_keyed_on_data_content(tmp_path):
    from stablerl.sft import sft_output_dir

    data = tmp_path / "d.jsonl"
    data.write_text(Path(SAMPLE).read_text())
    cfg = build_config(RunConfig, None, ["task.name=dataset", f"task.dataset={data}", "task.columns.solution=solution"])
    before = sft_output_dir(cfg)
    assert sft_output_dir(cfg) == before
    data.write_text(Path(SAMPLE).read_text().replace("12", "13"))
    assert sft_output_dir(cfg) != before
    # the reward functions, the held-out size and the pool do not change the SFT data: same cache
    data.write_text(Path(SAMPLE).read_text())
    other = build_config(
        RunConfig,
        None,
        [
            "task.name=dataset",
            f"task.dataset={data}",
            "task.columns.solution=solution",
            "task.eval_size=3",
            "task.reward_workers=4",
        ],
    )
    assert sft_output_dir(other) == before


def test_sft_cache_is_keyed_on_the_arithmetic_operands():
    # the teacher solutions of 9-digit operands are not those of 2-digit ones: a cold start on
    # one must never be reused for the other
    from stablerl.sft import sft_output_dir

    base = ["task.style=noisy_columns", "task.levels=[2]", "rollout.max_new_tokens=112"]
    small = sft_output_dir(build_config(RunConfig, None, base))
    large = sft_output_dir(build_config(RunConfig, None, [*base, "task.max_operand=999999999"]))
    assert small != large
    assert sft_output_dir(build_config(RunConfig, None, [*base, "rollout.max_new_tokens=100"])) == small


# ---------------------------------------------------------------------------------------------
# 6. the collapse warning sees every collapse, from the first steps on
# ---------------------------------------------------------------------------------------------
def test_collapse_warning_from_the_first_steps_in_both_directions():
    # lr = 1e20: entropy 0.09 -> 4.6 at step 2 and stays (the old detector needed ~35 steps of history)
    det = CollapseDetector(window=30, factor=3.0, sustain=3)
    flags = [det.update("entropy", v) for v in [0.09, 4.6, 4.6, 4.6, 4.6]]
    assert [bool(f) for f in flags] == [False, False, False, True, False] and "rose" in flags[3]
    # lr = 10: entropy falls to 0 (the old detector watched rises only)
    det = CollapseDetector(window=30, factor=3.0, sustain=3)
    flags = [det.update("entropy", v) for v in [0.09, 0.08, 0.0, 0.0, 0.0]]
    assert sum(bool(f) for f in flags) == 1 and "fell" in flags[4]
    # the reward collapsing and the train-infer KL rising are flagged too; their good-news
    # directions are not
    det = CollapseDetector(window=30, factor=3.0, sustain=3)
    assert any(det.update("reward_mean", v) for v in [0.6, 0.6, 0.05, 0.04, 0.05])
    det = CollapseDetector(window=30, factor=3.0, sustain=3)
    assert not any(det.update("reward_mean", v) for v in [0.1, 0.1, 0.9, 0.9, 0.9])
    det = CollapseDetector(window=30, factor=3.0, sustain=3)
    assert any(det.update("train_infer_kl", v) for v in [1e-3, 1e-3, 5e-2, 6e-2, 5e-2])


def test_run_summary_says_the_run_collapsed(tmp_path, capsys):
    from stablerl.config import LogConfig

    logger = RunLogger(tmp_path, LogConfig(tensorboard=False, progress=False), total_steps=6, start_step=0)
    state = RunState()
    for step, h in enumerate([0.09, 4.6, 4.6, 4.6, 4.6]):
        state.collapse += logger.log_step(step, {"entropy": h, "reward_mean": 0.5})
    logger.close()
    summary = write_summary(tmp_path, state)
    assert summary["collapsed"] and "entropy rose" in summary["collapse_warnings"][0]
    assert "possible collapse" in capsys.readouterr().out
    # the CLI's closing line says what the detector knows: a flag, not a verdict
    from stablerl.cli import collapse_line

    line = collapse_line(summary)
    assert "possible collapse" in line and "entropy rose" in line and "this run collapsed" not in line
