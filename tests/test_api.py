"""The Python API (stablerl.train)."""

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
