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
