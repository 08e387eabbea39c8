"""The RL trainer end to end on very small configurations."""

import json

import pytest
import torch
from tinyrun import config as shared_config

from stablerl import checkpoint
from stablerl.checkpoint import save_model_dir
from stablerl.cli import main
from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.loop import Trainer, TrainingAborted
from stablerl.models import build_model, build_tokenizer, tiny_config
from stablerl.repro.runner import is_done
from stablerl.rundir import RunDir
from stablerl.runlog import CollapseDetector, read_metrics

TIMING = {"step_time", "rollout_time", "train_time", "rollout_tokens_per_s", "train_tokens_per_s"}


def config(ckpt, run_dir, *extra):
    base = [
        f"model.path={ckpt}",
        f"run_dir={run_dir}",
        "batch.prompts_per_step=2",
        "batch.group_size=4",
        "rollout.max_new_tokens=12",
        "task.levels=[1]",
        "task.eval_size=8",
        "eval.every=2",
        "log.progress=false",
        "log.tensorboard=false",
        "train.steps=4",
    ]
    return build_config(RunConfig, None, base + list(extra))


def run(ckpt, run_dir, *extra, resume=False):
    cfg = config(ckpt, run_dir, *extra)
    Trainer(cfg, run_dir, resume=resume, log=lambda *_: None).run()
    return read_metrics(run_dir)


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_smoke_run_logs_every_diagnostic(sft_ckpt, tmp_path):
    rows = run(sft_ckpt, tmp_path / "r", "log.tensorboard=true")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert "eval/greedy_acc" in rows[0] and "eval/sampled_acc" in rows[2] and "eval/greedy_acc" in rows[4]
    step = rows[1]
    for key in (
        "reward_mean",
        "groups_all_wrong",
        "entropy",
        "response_len_mean",
        "train_infer_kl",
        "staleness_kl",
        "is_weight_mean",
        "is_frac_truncated",
        "clip_frac_low",
        "clip_frac_high",
        "grad_norm",
        "first_order_gap",
        "route_agreement/train_infer",
        "route_agreement/train_infer/layer_1",
        "step_time",
        "rollout_tokens_per_s",
        "train_tokens_per_s",
        "n_tokens_contrib",
        "policy_version",
    ):
        assert key in step, key
    assert 0 <= step["route_agreement/train_infer"] <= 1 and step["entropy"] > 0
    assert step["staleness_kl"] == pytest.approx(0.0, abs=1e-12)  # on-policy: pi_theta == pi_old
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "r")] == ["step_000003", "step_000004"]
    assert any((tmp_path / "r" / "tb").iterdir())


def test_resume_matches_an_uninterrupted_run(sft_ckpt, tmp_path):
    full = run(sft_ckpt, tmp_path / "full")
    run(sft_ckpt, tmp_path / "cut", "train.steps=2")
    # a kill during step 3: a half-written metrics line and a half-written checkpoint directory
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "reward_me')
    (tmp_path / "cut" / "checkpoints" / "step_000003.tmp").mkdir()
    resumed = run(sft_ckpt, tmp_path / "cut", "train.steps=4", resume=True)
    assert strip(resumed) == strip(full)
    # the weights end up identical too: in the DCP checkpoints and in the HF exports
    wa = checkpoint.load_model_weights(checkpoint.latest(tmp_path / "full"))
    wb = checkpoint.load_model_weights(checkpoint.latest(tmp_path / "cut"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    from transformers import AutoModelForCausalLM

    for run_dir in ("full", "cut"):
        exported = AutoModelForCausalLM.from_pretrained(RunDir(tmp_path / run_dir).export(4)).state_dict()
        assert all(torch.equal(exported[k], wa[k]) for k in wa)


def test_off_policy_minibatches_with_routing_replay(sft_ckpt, tmp_path):
    for mode in ("none", "R2", "R3"):
        rows = run(
            sft_ckpt,
            tmp_path / mode,
            "batch.minibatches_per_step=2",
            f"train.routing_replay={mode}",
            "train.steps=2",
            "batch.micro_batch_size=3",
        )
        step = rows[1]
        assert step["staleness_kl/mb0"] == pytest.approx(0.0, abs=1e-10)  # first mini-batch: pi_theta == pi_old
        assert "staleness_kl/mb1" in step and "route_agreement/train_infer" in step
        if mode == "none":
            assert "route_agreement/stale" in step  # current vs old training routes on the 2nd mini-batch


def test_dense_model_trains_too(tmp_path):
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
    rows = run(path, tmp_path / "r", "train.steps=1")
    assert "route_agreement/train_infer" not in rows[1] and rows[1]["policy_version"] == 1


def test_non_finite_steps_are_skipped_then_stop_the_run(sft_ckpt, tmp_path, monkeypatch):
    import stablerl.learner as trainer_mod

    real = trainer_mod.response_logp
    bad_steps = set()

    def flaky(model, batch, **kw):
        out = real(model, batch, **kw)
        if current["step"] in bad_steps:
            out["logp"] = out["logp"] * float("nan")
        return out

    current = {"step": 0}
    real_update = trainer_mod.Learner.update

    def update(self, step, batch, first_row):
        current["step"] = step
        return real_update(self, step, batch, first_row)

    monkeypatch.setattr(trainer_mod, "response_logp", flaky)
    monkeypatch.setattr(trainer_mod.Learner, "update", update)
    bad_steps.update({2})  # one bad step: skipped, counted, training goes on
    rows = run(sft_ckpt, tmp_path / "one", "train.steps=3")
    assert rows[-1]["nonfinite_total"] == 1 and rows[-1]["step"] == 3

    bad_steps.update({3, 4, 5})  # three in a row: the run stops, last good checkpoint intact
    cfg = config(sft_ckpt, tmp_path / "stop", "train.steps=6")
    with pytest.raises(TrainingAborted, match="3 non-finite steps in a row.*step_000001"):
        Trainer(cfg, tmp_path / "stop", log=lambda *_: None).run()
    assert checkpoint.latest(tmp_path / "stop").name == "step_000001"


def test_collapse_detector():
    base = [0.01, 0.012, 0.011, 0.013, 0.01]
    # a one-step spike of a heavy-tailed estimate is not a collapse
    det = CollapseDetector(window=5, factor=3.0, sustain=3)
    assert not any(det.update("train_infer_kl", v) for v in base + [0.012, 0.5, 0.012, 0.011, 0.4, 0.01])
    # a jump that lasts `sustain` steps is, flagged once when it becomes sustained
    det = CollapseDetector(window=5, factor=3.0, sustain=3)
    flags = [bool(det.update("train_infer_kl", v)) for v in base + [0.011, 0.012, 0.011, 0.3, 0.5, 0.6, 0.7, 0.8]]
    assert flags == [False] * 10 + [True, False, False]


def test_cli_train_config_errors_fail_before_any_work(tmp_path, capsys):
    rc = main(["train", f"run_dir={tmp_path / 'x'}", "train.routing_replay=R4"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train.routing_replay" in err and "'none', 'R2' or 'R3'" in err
    rc = main(["train", f"run_dir={tmp_path / 'x'}", "loss.eps_hihg=0.3"])
    assert rc == 2 and "eps_high" in capsys.readouterr().err  # the allowed keys are listed
    assert not (tmp_path / "x").exists()


def test_cli_train_resume_and_plot(sft_ckpt, tmp_path, capsys):
    run_dir = tmp_path / "cli"
    args = [
        f"model.path={sft_ckpt}",
        "batch.prompts_per_step=2",
        "batch.group_size=4",
        "rollout.max_new_tokens=12",
        "task.levels=[1]",
        "task.eval_size=8",
        "log.progress=false",
        "log.tensorboard=false",
    ]
    assert main(["train", f"run_dir={run_dir}", "train.steps=1", *args]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy (greedy)" in out and "plots" in out
    assert main(["train", f"run_dir={run_dir}", "train.steps=1", *args]) == 2  # will not overwrite a run
    assert main(["train", "--resume", str(run_dir), "train.steps=2"]) == 0
    assert read_metrics(run_dir)[-1]["step"] == 2
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_per_sequence_log_w_tail(sft_ckpt, tmp_path):
    """seq_log_w/*: sum_t (log pi_old - log mu) per response. Its mean is the k1 KL times the
    mean response length, negated (the same tokens, summed per response instead of per token)."""
    rows = run(sft_ckpt, tmp_path / "r", "rollout.precision=fp8_w8a8", "train.steps=2")
    for r in rows[1:]:
        assert r["seq_log_w/mean"] == pytest.approx(
            -r["train_infer_kl_k1"] * r["response_len_mean"], rel=1e-4, abs=1e-7
        )
        assert r["seq_log_w/min"] <= r["seq_log_w/p01"] <= r["seq_log_w/p05"]
        assert (
            r["seq_log_w/min"] < 0 < r["train_infer_kl"]
        )  # an fp8 engine: some responses are far less likely under pi


def test_the_first_error_survives_a_failing_summary_and_the_run_can_be_rerun(sft_ckpt, tmp_path, monkeypatch):
    import stablerl.loop as loop

    def boom(*_a, **_k):
        raise RuntimeError("the real error")

    monkeypatch.setattr(loop.Learner, "update", boom)
    monkeypatch.setattr(loop, "write_summary", lambda *_: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(RuntimeError, match="the real error"):
        Trainer(shared_config(sft_ckpt, tmp_path / "r", "train.steps=2"), tmp_path / "r", log=lambda *_: None).run()
    assert not RunDir(tmp_path / "r").is_run()  # nothing completed: nothing left that refuses a re-run
    monkeypatch.undo()
    Trainer(shared_config(sft_ckpt, tmp_path / "r", "train.steps=1"), tmp_path / "r", log=lambda *_: None).run()
    assert read_metrics(tmp_path / "r")[-1]["step"] == 1


def test_ctrl_c_writes_an_interrupted_summary_that_repro_does_not_count_as_done(sft_ckpt, tmp_path, monkeypatch):
    import stablerl.loop as loop

    real = loop.Learner.update

    def interrupt_at_2(self, step, batch, first_row):
        if step == 2:
            raise KeyboardInterrupt
        return real(self, step, batch, first_row)

    monkeypatch.setattr(loop.Learner, "update", interrupt_at_2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(shared_config(sft_ckpt, tmp_path / "r", "train.steps=3"), tmp_path / "r", log=lambda *_: None).run()
    summary = json.loads(RunDir(tmp_path / "r").summary.read_text())
    assert summary["interrupted"] is True and summary["steps"] == 1
    assert not is_done(tmp_path / "r")


@pytest.mark.parametrize("sig, code, said", [("SIGTERM", 143, "terminated (SIGTERM)"), ("SIGINT", 130, "interrupted")])
def test_sigterm_writes_the_same_interrupted_summary_as_ctrl_c(sft_ckpt, tmp_path, sig, code, said):
    """What `timeout`, Slurm and Kubernetes send ends a run as Ctrl-C does: a summary marked
    interrupted at the last completed step, one line on stderr, and a resume continues it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tinyrun import args

    from stablerl import checkpoint

    run = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stablerl", "train", *args(sft_ckpt, run, "train.steps=500", "checkpoint.every=1")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
        # a shell's background job inherits SIGINT ignored, and Python then never raises
        # KeyboardInterrupt: the run under test gets the default, as in a terminal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while checkpoint.latest(run) is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == code, err[-2000:]
    lines = [x for x in err.strip().splitlines() if x.startswith("stablerl")]
    assert lines == [f"stablerl train: {said}"], err[-2000:]
    summary = json.loads(RunDir(run).summary.read_text())
    assert summary["interrupted"] is True and 1 <= summary["steps"] < 500
    assert not is_done(run)
