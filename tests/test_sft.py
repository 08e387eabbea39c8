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
