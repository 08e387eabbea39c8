"""The run directory's owner: paths, atomic writes, the typed run state and its checkpoint form."""

import json

from stablerl.rundir import RunDir, RunState, atomic_write_text, truncate_lines


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
    from stablerl.config import RunConfig
    from stablerl.config_io import build_config
    from stablerl.sft import cold_start
    from stablerl.tasks import build_task

    cfg = build_config(RunConfig, None, overrides)
    messages.put(("returned", str(cold_start(cfg, build_task(cfg.task), log=lambda m: messages.put(("log", m))))))


def test_a_cold_start_two_processes_need_is_trained_once(tmp_path):
    """`stablerl repro` processes side by side need the same cold start: the second waits for the
    first's and reuses it (it used to train its own into the same temporary directory)."""
    import multiprocessing as mp

    from stablerl.config import RunConfig
    from stablerl.config_io import build_config
    from stablerl.rundir import waiting_lock
    from stablerl.sft import _train_cold_start
    from stablerl.tasks import build_task

    out = tmp_path / "sft" / "ckpt"
    overrides = ["model.hidden_size=32", "model.num_layers=2", "sft.steps=2", "sft.batch_size=4",
                 "task.levels=[1]", f"sft.output_dir={out}"]
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    with waiting_lock(out.with_name("ckpt.lock")):   # this process is "the first": it holds the lock
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
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp   # not trained again
