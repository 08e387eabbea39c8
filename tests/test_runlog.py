"""Logging: the collapse warning, the run summary, the console, plots."""

import json

from tinyrun import cli_error, train

from stablerl.cli import main
from stablerl.rundir import RunDir, RunState
from stablerl.runlog import CollapseDetector, RunLogger, write_summary


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


def test_console_that_is_not_a_terminal_gets_plain_whole_lines(tmp_path, capsys):
    from stablerl.config import LogConfig
    from stablerl.runlog import RunLogger

    logger = RunLogger(
        tmp_path, LogConfig(tensorboard=False, progress=True, print_every=2), total_steps=5, start_step=0
    )
    for step in range(1, 6):
        logger.log_step(step, {"reward_mean": 0.5, "entropy": 0.1})
    logger.print("[yellow]" + "x" * 200 + "[/yellow]")
    logger.close()
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in out if line.startswith("[train]")] == ["2/5", "4/5", "5/5"]
    assert "reward 0.50" in out[0] and "x" * 200 in out  # markup stripped, nothing wrapped or cut


def test_plot_labels_are_unique_and_say_what_they_show(tmp_path):
    from stablerl.plot import plot_runs, reward_is_accuracy, run_labels

    assert run_labels([tmp_path / "a" / "seed0", tmp_path / "b" / "seed0"]) == ["a/seed0", "b/seed0"]
    for d in ("a/seed0", "b/seed0"):
        run = RunDir(tmp_path / d)
        run.path.mkdir(parents=True)
        run.config.write_text(json.dumps({"task": {"reward_fns": ["x.py:f"], "reward_weights": [2.0]}}))
        run.metrics.write_text(
            "".join(json.dumps({"step": s, "reward_mean": 0.5, "eval/sampled_acc": 1.5}) + "\n" for s in range(3))
        )
    assert not reward_is_accuracy(tmp_path / "a" / "seed0")
    out = plot_runs([tmp_path / "a" / "seed0", tmp_path / "b" / "seed0"], tmp_path / "c.png")
    assert out.stat().st_size > 5000
