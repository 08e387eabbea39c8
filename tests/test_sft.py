"""The cold start (SFT) and its cache key."""

from pathlib import Path

from tinyrun import SAMPLE

from stablerl.config import RunConfig
from stablerl.config_io import build_config


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


def test_a_cold_start_without_teacher_solutions_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """No model.path and no teacher-solution column: one line naming both keys, before the
    cold-start model is built (nothing written)."""
    import json

    import pytest
    from tinyrun import cli_error

    import stablerl.sft as sft

    data = tmp_path / "d.jsonl"
    rows = [json.loads(x) for x in Path(SAMPLE).read_text().splitlines()]
    data.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sft, "build_default_policy", lambda *a, **k: pytest.fail("the cold-start model was built"))
    err = cli_error(capsys, ["train", f"run_dir={tmp_path / 'r'}", "task.name=dataset", f"task.dataset={data}"])
    assert "task.columns.solution" in err and "model.path" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()


def test_the_cold_start_says_what_it_does_before_building_anything(tmp_path, monkeypatch):
    """The first console line of a run that cold-starts comes before the model is built."""
    import pytest

    import stablerl.sft as sft
    from stablerl.tasks import build_task

    said = []

    def build(*_a, **_k):
        said.append("built")
        raise RuntimeError("stop here")

    monkeypatch.setattr(sft, "build_default_policy", build)
    cfg = build_config(RunConfig, None, [f"sft.output_dir={tmp_path / 'sft'}"])
    with pytest.raises(RuntimeError, match="stop here"):
        sft.cold_start(cfg, build_task(cfg.task), log=said.append)
    assert said[0].startswith("[cold start] building") and said[1] == "built"
