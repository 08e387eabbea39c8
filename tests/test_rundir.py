"""The run directory's owner: paths, atomic writes, the typed run state and its checkpoint form."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tinyrun import args, cli_error, config

from stablerl.cli import main
from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.loop import Trainer
from stablerl.models import build_tokenizer, default_model_config
from stablerl.rundir import RunDir, RunLock, RunLocked, RunState, atomic_write_text, truncate_lines
from stablerl.runlog import read_metrics
from stablerl.tasks import build_task


def test_run_state_round_trips_through_a_checkpoint_and_ignores_unknown_keys():
    state = RunState(step=4, nonfinite_total=1, metrics_lines=5, reward_errors=2, collapse=["step 3: x"], aborted="no")
    data = state.to_checkpoint()
    assert "aborted" not in data  # why a run stopped is never checkpointed
    back = RunState.from_checkpoint({**data, "world_size": 2, "future_key": 1})
    assert back == RunState(step=4, nonfinite_total=1, metrics_lines=5, reward_errors=2, collapse=["step 3: x"])


def test_fresh_start_and_cut_back(tmp_path):
    run = RunDir(tmp_path)
    run.metrics.write_text("".join(json.dumps({"step": i}) + "\n" for i in range(5)))
    run.rollouts.write_text("a\nb\nc\n")
    run.cut_logs_to(RunState(step=2, metrics_lines=3))
    assert len(run.metrics.read_text().splitlines()) == 3 and run.rollouts.read_text() == "a\nb\n"
    run.tensorboard.mkdir()
    run.summary.write_text("{}")
    run.start_fresh()
    assert not any(p.exists() for p in (run.metrics, run.rollouts, run.summary, run.tensorboard))


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    atomic_write_text(tmp_path / "f.json", "1")
    atomic_write_text(tmp_path / "f.json", "2")
    truncate_lines(tmp_path / "missing.jsonl", 3)  # a log that does not exist yet: nothing to do
    assert (tmp_path / "f.json").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def _cold_start_in_child(overrides, messages):
    from stablerl.sft import cold_start

    cfg = build_config(RunConfig, None, overrides)
    messages.put(("returned", str(cold_start(cfg, build_task(cfg.task), log=lambda m: messages.put(("log", m))))))


def test_a_cold_start_two_processes_need_is_trained_once(tmp_path):
    """`stablerl repro` processes side by side need the same cold start: the second waits for the
    first's and reuses it (it used to train its own into the same temporary directory)."""
    import multiprocessing as mp

    from stablerl.rundir import waiting_lock
    from stablerl.sft import _train_cold_start

    out = tmp_path / "sft" / "ckpt"
    overrides = [
        "model.hidden_size=32",
        "model.num_layers=2",
        "sft.steps=2",
        "sft.batch_size=4",
        "task.levels=[1]",
        f"sft.output_dir={out}",
    ]
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    with waiting_lock(out.with_name("ckpt.lock")):  # this process is "the first": it holds the lock
        child = ctx.Process(target=_cold_start_in_child, args=(overrides, messages))
        child.start()
        try:
            kind, text = messages.get(timeout=120)
            assert kind == "log" and "another process is training" in text, text
            cfg = build_config(RunConfig, None, overrides)
            _train_cold_start(cfg, build_task(cfg.task), out, log=lambda *_: None)
        except BaseException:
            child.kill()
            raise
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    got = [messages.get(timeout=120) for _ in range(2)]
    child.join(timeout=60)
    assert child.exitcode == 0
    assert got == [("log", f"[cold start] reusing {out}"), ("returned", str(out))]
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # not trained again


class _StopAt:
    """A task whose training stream fails at one SFT problem index: a cold start killed there."""

    def __init__(self, task, index: int):
        self._task, self._index = task, index

    def train_problem(self, index: int):
        if index == self._index:
            raise KeyboardInterrupt("killed")
        return self._task.train_problem(index)

    def __getattr__(self, name):  # the rest (held-out prompts, for the start-up checks) is the task's
        return getattr(self._task, name)


def test_a_killed_cold_start_resumes_to_the_uninterrupted_result(tmp_path):
    """Every sft.checkpoint_every steps the cold start saves its whole state; killed after step 5 of
    8 (checkpoint at 4), it resumes at step 4 and ends bit-identical to one that was never stopped,
    and the partial state is gone once the checkpoint is published."""
    from safetensors.torch import load_file

    from stablerl.sft import _train_cold_start, sft_state_path

    base = [
        "model.hidden_size=32",
        "model.num_layers=2",
        "sft.steps=8",
        "sft.batch_size=4",
        "sft.checkpoint_every=2",
        "task.levels=[1]",
    ]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    cfg = build_config(RunConfig, None, base + [f"sft.output_dir={whole}"])
    _train_cold_start(cfg, build_task(cfg.task), whole, log=lambda *_: None)
    assert not sft_state_path(whole).exists()

    cfg = build_config(RunConfig, None, base + [f"sft.output_dir={resumed}"])
    task = build_task(cfg.task)
    with pytest.raises(KeyboardInterrupt):  # dies while building step 5's batch (0-based step 5)
        _train_cold_start(cfg, _StopAt(task, 10_000_000 + 5 * 4 + 1), resumed, log=lambda *_: None)
    assert sft_state_path(resumed).is_file() and not resumed.exists()
    logs = []
    _train_cold_start(cfg, task, resumed, log=logs.append)
    assert any(m.startswith("[sft] resuming at step 4/8") for m in logs), logs
    assert not sft_state_path(resumed).exists()
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_partial_cold_start_of_other_settings_is_refused(tmp_path):
    from stablerl.sft import _train_cold_start, sft_state_path

    out = tmp_path / "ckpt"
    base = [
        "model.hidden_size=32",
        "model.num_layers=2",
        "sft.batch_size=4",
        "sft.checkpoint_every=2",
        "task.levels=[1]",
        f"sft.output_dir={out}",
    ]
    cfg = build_config(RunConfig, None, base + ["sft.steps=8"])
    with pytest.raises(KeyboardInterrupt):
        _train_cold_start(cfg, _StopAt(build_task(cfg.task), 10_000_000 + 3 * 4), out, log=lambda *_: None)
    cfg = build_config(RunConfig, None, base + ["sft.steps=6"])
    with pytest.raises(ValueError, match=r"partial cold start of other settings \(sft.steps differ\)"):
        _train_cold_start(cfg, build_task(cfg.task), out, log=lambda *_: None)
    assert sft_state_path(out).is_file()  # never deleted: it is someone's completed work


def test_a_cold_start_checks_the_model_context_before_any_step(tmp_path):
    """Prompts + rollout.max_new_tokens over the context (what a run of these settings refuses) and
    teacher rows over it (what the SFT would train at positions the model does not declare) stop
    the cold start before its first step, naming model.max_positions; nothing is written."""
    from stablerl.sft import _train_cold_start, sft_state_path

    out = tmp_path / "ckpt"
    long = [
        "task.style=noisy_columns",
        "task.levels=[2]",
        f"task.max_operand={10**18 - 1}",
        "rollout.max_new_tokens=224",
        "model.hidden_size=32",
        "model.num_layers=2",
        "sft.steps=2",
    ]
    cfg = build_config(RunConfig, None, long)  # 58-token prompts + 224 > 256
    with pytest.raises(
        ValueError,
        match=r"longer than 32 tokens, the limit set by the model's context \(256 tokens\)"
        r".*raise model.max_positions",
    ):
        _train_cold_start(cfg, build_task(cfg.task), out, log=lambda *_: None)
    assert not out.exists() and not sft_state_path(out).exists()

    # a dataset's teacher solution of ~400 tokens in a 256-token context (its prompt is short)
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"{i}+1", "answer": str(i + 1), "solution": "1" * 400}) + "\n" for i in range(12)
        )
    )
    cfg = build_config(
        RunConfig,
        None,
        [
            "task.name=dataset",
            f"task.dataset={data}",
            "task.columns.solution=solution",
            "task.eval_size=2",
            "model.hidden_size=32",
            "model.num_layers=2",
            "sft.steps=2",
        ],
    )
    with pytest.raises(
        ValueError,
        match=r"10 of 10 teacher rows checked are longer than the model's context "
        r"\(256 tokens\), the longest 4\d\d tokens .*model.max_positions",
    ):
        _train_cold_start(cfg, build_task(cfg.task), out, log=lambda *_: None)
    assert not out.exists()
    # a 512-token context holds them: the cold start trains
    cfg = build_config(
        RunConfig,
        None,
        [
            "task.name=dataset",
            f"task.dataset={data}",
            "task.columns.solution=solution",
            "task.eval_size=2",
            "model.hidden_size=32",
            "model.num_layers=2",
            "sft.steps=2",
            "model.max_positions=512",
        ],
    )
    _train_cold_start(cfg, build_task(cfg.task), out, log=lambda *_: None)
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 512


def test_a_longer_context_changes_no_weight_of_the_cold_start(tmp_path):
    """Rotary positions have no weights: a cold start declaring 512 positions equals one declaring
    the default 256 weight for weight (so experiment 2's cold start at 512 is the one measured at
    256), and only a non-default context gets a cache key of its own."""
    from safetensors.torch import load_file

    from stablerl.sft import _sft_key, _train_cold_start, sft_output_dir

    base = ["model.hidden_size=32", "model.num_layers=2", "sft.steps=6", "sft.batch_size=4", "task.levels=[1]"]
    weights = []
    for n in (256, 512):
        cfg = build_config(RunConfig, None, base + [f"model.max_positions={n}"])
        _train_cold_start(cfg, build_task(cfg.task), tmp_path / str(n), log=lambda *_: None)
        weights.append(load_file(tmp_path / str(n) / "model.safetensors"))
    a, b = weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the default context is not in the key (cold starts trained before the setting keep theirs)
    key = lambda *extra: _sft_key(build_config(RunConfig, None, base + list(extra)))  # noqa: E731
    assert (
        "max_positions" not in json.loads(key())[0]
        and json.loads(key("model.max_positions=512"))[0]["max_positions"] == 512
    )
    assert sft_output_dir(build_config(RunConfig, None, base)) != sft_output_dir(
        build_config(RunConfig, None, base + ["model.max_positions=512"])
    )


def test_run_sft_refuses_a_batch_longer_than_the_context():
    # the guard inside the loop (a stream whose later rows grow past the context): named, no step
    from stablerl.models import build_model
    from stablerl.sft import run_sft
    from stablerl.tasks import ArithmeticTask

    tok = build_tokenizer()
    model = build_model(default_model_config(tok, hidden_size=32, num_layers=1, max_positions=16), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"SFT step 0: a teacher row of \d+ tokens is longer than the model's "
        r"context \(16 tokens\).*model.max_positions",
    ):
        run_sft(model, tok, ArithmeticTask(levels=[3]), steps=2, batch_size=2, lr=1e-3, seed=0, log=None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


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


def test_the_lock_loser_leaves_the_winners_lock_in_place(sft_ckpt, tmp_path):
    run_dir = tmp_path / "r"
    winner = RunLock(run_dir).acquire()
    inode = os.stat(run_dir / ".lock").st_ino
    with pytest.raises(RunLocked):
        Trainer(config(sft_ckpt, run_dir), run_dir, log=lambda *_: None)
    assert os.stat(run_dir / ".lock").st_ino == inode
    with pytest.raises(RunLocked):  # still held
        RunLock(run_dir).acquire()
    winner.release(remove=True)
    assert not (run_dir / ".lock").exists()
    RunLock(run_dir).acquire().release()
