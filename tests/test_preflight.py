"""Start-up checks: prompt lengths against the limits, the memory estimate, oversized rows."""

import json
from pathlib import Path

import pytest
from tinyrun import FNS, cli_error, config

from stablerl.cli import main
from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.loop import Trainer
from stablerl.models import build_tokenizer, default_model_config
from stablerl.preflight import check_memory, check_prompts
from stablerl.tasks import build_task


def _dataset(tmp_path: Path, long_row: int | None, n: int = 20) -> Path:
    path = tmp_path / "data.jsonl"
    rows = [{"question": "x" * (10_000_000 if i == long_row else 5), "answer": "1"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_an_over_long_prompt_is_named_before_any_work(tmp_path):
    data = _dataset(tmp_path, long_row=7)
    cfg = build_config(RunConfig, None, ["task.name=dataset", f"task.dataset={data}", "task.eval_size=2"])
    tok = build_tokenizer()
    with pytest.raises(ValueError, match=r"row 8: over .* characters.*raise model.max_positions.*long_prompts=skip"):
        check_prompts(build_task(cfg.task), [], tok, cfg, default_model_config(tok))
    cfg.task.long_prompts = "skip"
    task, notes = build_task(cfg.task), []
    longest = check_prompts(task, [], tok, cfg, default_model_config(tok), log=notes.append)
    assert len(task.train_problems()) + len(task.eval_problems()) == 19 and "dropped 1 training" in notes[0]
    assert longest == 1 + len("x" * 5 + "\n")  # BOS + the longest kept prompt


def test_the_model_context_is_the_hard_limit(tmp_path):
    tok = build_tokenizer()
    cfg = build_config(
        RunConfig, None, ["task.max_prompt_tokens=100000", "rollout.max_new_tokens=250", "task.levels=[3]"]
    )
    with pytest.raises(ValueError, match=r"model's context \(256 tokens\) less rollout.max_new_tokens \(250\)"):
        check_prompts(build_task(cfg.task), [], tok, cfg, default_model_config(tok))


def test_eval_refuses_prompts_the_context_cannot_hold(sft_ckpt, capsys):
    # what a run of the same settings refuses, `stablerl eval` refuses too, before any sampling
    # (it used to generate past the model's declared context)

    rc = main(["eval", str(sft_ckpt), "task.levels=[3]", "task.eval_size=4", "rollout.max_new_tokens=250"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "model's context (256 tokens) less rollout.max_new_tokens (250)" in err and "model.max_positions" in err


def test_a_huge_rollout_batch_fails_with_a_memory_estimate():
    tok = build_tokenizer()
    cfg = build_config(RunConfig, None, ["batch.prompts_per_step=200000"])
    with pytest.raises(ValueError, match=r"one step would need about .* GiB .*batch.prompts_per_step=200000"):
        check_memory(cfg, default_model_config(tok), 1, 20)
    check_memory(build_config(RunConfig, None, []), default_model_config(tok), 1, 20)  # the default fits


def test_a_trainer_on_a_10mb_row_stops_at_start_up_and_leaves_nothing(sft_ckpt, tmp_path):
    data = _dataset(tmp_path, long_row=3)
    cfg = config(
        sft_ckpt,
        tmp_path / "run",
        "task.name=dataset",
        f"task.dataset={data}",
        "task.eval_size=2",
        "task.reward_fns=[" + FNS + ":exact]",
    )
    with pytest.raises(ValueError, match="row 4"):
        Trainer(cfg, tmp_path / "run", log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_a_cxx_compiler_that_answers_but_cannot_build_is_one_line_naming_it_and_the_way_out(
    tmp_path, capsys, monkeypatch
):
    """A compiler that passes torch's `--version` check but fails every build: refused before any
    work (no run directory), naming the compiler, its error and the option to turn off."""
    import torch._inductor.config as inductor

    from stablerl.preflight import compiler_error

    fake = tmp_path / "cxx"
    script = [
        '[ "$1" = "--version" ] && { echo "g++ (fake) 12"; exit 0; }',
        'echo "fatal: broken install" >&2',
        "exit 1",
    ]
    fake.write_text("#!/bin/sh\n" + "\n".join(script) + "\n")
    fake.chmod(0o755)
    monkeypatch.setattr(inductor.cpp, "cxx", (None, str(fake)))
    err = cli_error(capsys, ["train", f"run_dir={tmp_path / 'r'}", "train.compile=true"])
    assert str(fake) in err and "fatal: broken install" in err and "train.compile=false" in err
    assert not (tmp_path / "r").exists()
    assert compiler_error("g++") == ""  # a working compiler passes the probe
