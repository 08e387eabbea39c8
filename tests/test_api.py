"""The Python API (stablerl.train)."""

import re

import pytest


def test_python_api_trains_from_a_dict_and_resumes(sft_ckpt, tmp_path):
    import stablerl

    cfg = {
        "model": {"path": str(sft_ckpt)},
        "run_dir": str(tmp_path / "api"),
        "train": {"steps": 1},
        "batch": {"prompts_per_step": 2, "group_size": 4},
        "rollout": {"max_new_tokens": 12},
        "task": {"levels": [1], "eval_size": 4},
        "log": {"progress": False, "tensorboard": False},
    }
    summary = stablerl.train(cfg, log=lambda *_: None)
    assert summary["steps"] == 1 and summary["run_dir"] == str(tmp_path / "api") and "sampled_after" in summary
    summary = stablerl.train(resume=tmp_path / "api", overrides=["train.steps=2"], log=lambda *_: None)
    assert summary["steps"] == 2
    with pytest.raises(ValueError, match=r"train.steps"):
        stablerl.train({"train": {"steps": 0}})


@pytest.mark.parametrize(
    "config, overrides, named",
    [
        ([1, 2], (), "config [1, 2] (a list) is not a config"),
        (7, (), "config 7 (a int) is not a config"),
        (None, "train.steps=2", "overrides"),
    ],
)
def test_the_api_names_a_config_or_overrides_of_the_wrong_type(config, overrides, named):
    import stablerl

    with pytest.raises(ValueError, match=re.escape(named)) as e:
        stablerl.train(config, overrides=overrides, log=lambda *_: None)
    assert "does not exist" not in str(e.value)


def test_the_api_and_the_cli_leave_the_same_run_directory(sft_ckpt, tmp_path, capsys):
    from tinyrun import args

    import stablerl
    from stablerl.cli import main

    stablerl.train(overrides=args(sft_ckpt, tmp_path / "api", "train.steps=1"), log=lambda *_: None)
    assert main(["train", *args(sft_ckpt, tmp_path / "cli", "train.steps=1")]) == 0

    def files(run):
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "tb" not in p.parts)

    assert "plots/curves.png" in files(tmp_path / "api")
    assert files(tmp_path / "api") == files(tmp_path / "cli")
