"""Config validation: bad values, YAML errors and overrides get one-line errors."""

import json

import pytest
from tinyrun import args, cli_error

from stablerl.cli import main
from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.runlog import read_metrics


@pytest.mark.parametrize(
    "bad",
    ["optim.lr=.inf", "optim.lr=nan", "task.reward_timeout_s=inf", "distributed.timeout_s=.nan", "loss.is_cap=inf"],
)
def test_non_finite_config_values_are_rejected_at_start(bad, capsys, tmp_path):
    err = cli_error(capsys, ["train", f"run_dir={tmp_path / 'x'}", bad])
    assert bad.split("=")[0] in err and "finite" in err
    assert not (tmp_path / "x").exists()


def test_yaml_errors_in_files_and_overrides(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    err = cli_error(capsys, ["train", "--config", str(bad)])
    assert str(bad) in err and "not valid YAML" in err and "line" in err
    err = cli_error(capsys, ["train", "loss.eps_high=[0.2"])
    assert "loss.eps_high" in err and "not valid YAML" in err and "quote it" in err
    cfg = build_config(RunConfig, None, ["task.prompt_template=Question: {question}"])
    assert cfg.task.prompt_template == "Question: {question}"


def test_overrides_after_config(sft_ckpt, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  steps: 5\n")
    run_dir = tmp_path / "after"
    assert main(["train", "train.steps=1", "--config", str(cfg_file), *args(sft_ckpt, run_dir)]) == 0
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 1
    assert read_metrics(run_dir)[-1]["step"] == 1


def test_in_flight_updates_name_what_they_need_and_what_they_exclude():
    on = ["rollout.vllm.in_flight_updates=true", "train.steps=4"]
    server = [*on, "rollout.engine=vllm_server"]
    cases = [
        (on, "needs rollout.engine=vllm_server \\(not local\\)"),
        ([*server, "rollout.max_staleness=1"], "needs exactly one rollout worker \\(rollout.workers=1, not 0\\)"),
        ([*server, "rollout.workers=2", "rollout.max_staleness=1"], "rollout.workers=1, not 2"),
        ([*server, "rollout.workers=1"], "needs rollout.max_staleness >= 1"),
        ([*server, "rollout.workers=1", "rollout.max_staleness=1", "batch.filter_groups=true"], "batch.filter_groups"),
        ([*server, "rollout.workers=1", "rollout.max_staleness=1", "log.lag_kl=true"], "log.lag_kl=false"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            build_config(RunConfig, None, overrides)
    ok = build_config(RunConfig, None, [*server, "rollout.workers=1", "rollout.max_staleness=1"])
    assert ok.rollout.vllm.in_flight_updates


def test_a_lag_at_or_beyond_the_run_is_refused_naming_both_keys(capsys):
    for eta in (4, 5, 10**9):
        with pytest.raises(ValueError, match=rf"rollout.max_staleness={eta} is not below train.steps=4.*at most 3"):
            build_config(RunConfig, None, ["train.steps=4", f"rollout.max_staleness={eta}"])
    assert build_config(RunConfig, None, ["train.steps=4", "rollout.max_staleness=3"]).rollout.max_staleness == 3
    err = cli_error(capsys, ["train", "train.steps=4", "rollout.max_staleness=1000000000"])
    assert "rollout.max_staleness" in err and "train.steps" in err
