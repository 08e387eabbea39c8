"""Checkpoints: atomic, checksummed, never non-finite, read without running code; exports."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from tinyrun import train

from stablerl import checkpoint
from stablerl.generation import encode_prompt
from stablerl.loop import TrainingAborted
from stablerl.models import build_tokenizer
from stablerl.rundir import RunState
from stablerl.runlog import read_metrics


def test_absurd_learning_rate_never_leaves_a_non_finite_checkpoint(sft_ckpt, tmp_path):
    run_dir = tmp_path / "lr"
    with pytest.raises(TrainingAborted, match="no longer finite") as e:
        # every mini-batch steps (a tiny cold start's groups may all lack signal; AdamW's weight decay
        # at this rate is what overflows then)
        train(sft_ckpt, run_dir, "train.steps=3", "optim.lr=3e38", "optim.skip_empty_steps=false")
    for ckpt in checkpoint.complete_checkpoints(run_dir):
        weights = checkpoint.load_model_weights(ckpt)
        assert all(bool(torch.isfinite(t).all()) for t in weights.values()), ckpt
    # the advice works: lower the learning rate and resume
    assert "optim.lr" in str(e.value) and "--resume" in str(e.value)
    train(sft_ckpt, run_dir, "train.steps=3", "optim.lr=1e-5", "optim.skip_empty_steps=false", resume=True)
    assert read_metrics(run_dir)[-1]["step"] == 3
    weights = checkpoint.load_model_weights(checkpoint.latest(run_dir))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())


def test_saving_refuses_a_non_finite_state(sft_ckpt, tmp_path):
    from stablerl.models import load_policy

    model, tok = load_policy(sft_ckpt)
    opt = torch.optim.AdamW(model.parameters())
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(checkpoint.NonFiniteState, match="parameter"):
        checkpoint.save(tmp_path, 1, model, tok, opt, {}, keep_last=2)
    assert checkpoint.latest(tmp_path) is None


def test_the_batched_finiteness_check_agrees_with_a_check_per_element():
    """checkpoint.all_finite (one 2-norm per tensor, batched) against torch.isfinite on every
    element: NaN, +-inf at every position of tensors of three dtypes, finite values near the fp32
    maximum (their squares overflow: the exact test must decide), empty tensors."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for n in (1, 5, 16, 17, 300):
            for pos in range(n):
                for value in (float("nan"), float("inf"), -float("inf"), 3e38):
                    t = torch.randn(n, generator=g).to(dtype)
                    t[pos] = value
                    group = [torch.zeros(0), torch.randn(3, 2, generator=g), t]
                    assert checkpoint.all_finite(group) == all(bool(torch.isfinite(x).all()) for x in group)
    assert checkpoint.all_finite([]) and checkpoint.all_finite([torch.zeros(0)])


def test_the_check_names_a_non_finite_optimizer_state(sft_ckpt):
    from stablerl.models import load_policy

    model, _ = load_policy(sft_ckpt)
    opt = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    checkpoint.check_finite(model, opt)  # finite: nothing raised
    second = list(opt.state.values())[1]
    second["exp_avg_sq"].view(-1)[-1] = float("inf")
    with pytest.raises(checkpoint.NonFiniteState, match="optimizer state exp_avg_sq of parameter #1"):
        checkpoint.check_finite(model, opt)


def test_full_disk_during_a_checkpoint(sft_ckpt, tmp_path, monkeypatch):
    import errno

    import torch.distributed.checkpoint as dcp

    real_save, calls = dcp.save, {"n": 0}

    def save(state, checkpoint_id):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(dcp, "save", save)
    run_dir = tmp_path / "full"
    with pytest.raises(TrainingAborted, match="ENOSPC") as e:
        train(sft_ckpt, run_dir, "train.steps=3")
    assert str(run_dir / "checkpoints" / "step_000002") in str(e.value) and "intact" in str(e.value)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000001"]  # no partial one left
    weights = checkpoint.load_model_weights(checkpoint.latest(run_dir))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    monkeypatch.setattr(dcp, "save", real_save)
    train(sft_ckpt, run_dir, "train.steps=3", resume=True)  # space freed: resume goes on
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2, 3]


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _save_tiny_checkpoint(run_dir: Path, step: int) -> Path:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    model.config = type("Cfg", (), {"save_pretrained": lambda self, path: None})()
    tok = type("Tok", (), {"save_pretrained": lambda self, path: None})()
    return checkpoint.save(run_dir, step, model, tok, opt, RunState(step=step), keep_last=5)


def test_a_crafted_checkpoint_metadata_is_refused_not_executed(tmp_path):
    ckpt = _save_tiny_checkpoint(tmp_path, 1)
    marker = tmp_path / "pwned"
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    model = torch.nn.Linear(3, 2)
    with pytest.raises(checkpoint.UnsafeCheckpoint, match="refusing to load posix.system|refusing to load os.system"):
        checkpoint.load(ckpt, model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(checkpoint.UnsafeCheckpoint):
        checkpoint.load_model_weights(ckpt)
    assert not marker.exists()
    # and the resume path never even opens it: the checksum no longer matches
    assert "does not match its checksum" in checkpoint.damage(ckpt)


def test_an_intact_checkpoint_loads_through_the_restricted_reader(tmp_path):
    ckpt = _save_tiny_checkpoint(tmp_path, 1)
    assert checkpoint.damage(ckpt) is None
    weights = checkpoint.load_model_weights(ckpt)
    assert set(weights) == {"weight", "bias"}


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(tmp_path):
    good = _save_tiny_checkpoint(tmp_path, 1)
    bad = _save_tiny_checkpoint(tmp_path, 2)
    data = next((bad / "dcp").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-7])  # truncated
    found, warnings = checkpoint.latest_good(tmp_path)
    assert found == good
    assert len(warnings) == 1 and str(bad) in warnings[0] and str(good) in warnings[0]
    (bad / "state.json").write_text('{"step": 2, "fi')  # a truncated state.json names its path
    assert str(bad / "state.json") in checkpoint.damage(bad)


def test_an_exported_tokenizer_encodes_prompts_as_training_did(sft_ckpt, tmp_path):
    from transformers import AutoTokenizer

    from stablerl.checkpoint import save_model_dir
    from stablerl.models import load_policy

    model, tok = load_policy(sft_ckpt)
    save_model_dir(tmp_path / "export", model, tok)
    plain = AutoTokenizer.from_pretrained(tmp_path / "export")  # what a user of the export loads
    for text in ("12+34=", "7+8+9="):
        assert plain(text).input_ids == encode_prompt(tok, text)
    fresh = build_tokenizer()
    assert fresh("1+2=").input_ids == encode_prompt(fresh, "1+2=")
    assert fresh.decode(fresh("1+2=").input_ids, skip_special_tokens=True) == "1+2="


def test_a_full_disk_inside_dcps_shard_write_is_one_line_naming_the_path_and_the_space(sft_ckpt, tmp_path, monkeypatch):
    """DCP wraps a shard write's OSError in its CheckpointException, a BaseException: still one
    line naming the checkpoint, the errno and the space it needs; the partial step is removed."""
    import errno

    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    real, calls = _FileSystemWriter.write_data, {"n": 0}

    def write_data(self, plan, planner):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: half a shard on disk, then the disk is full
            (Path(self.path) / "__0_0.distcp").write_bytes(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, plan, planner)

    monkeypatch.setattr(_FileSystemWriter, "write_data", write_data)
    run_dir = tmp_path / "full"
    with pytest.raises(TrainingAborted) as e:
        train(sft_ckpt, run_dir, "train.steps=3", "checkpoint.every=1")
    message = str(e.value)
    assert len(message.splitlines()) == 1, message
    assert str(run_dir / "checkpoints" / "step_000002") in message and "ENOSPC" in message
    assert "needs about" in message and "free" in message and "intact" in message
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000001"]  # no partial one left


def test_sigterm_inside_dcps_shard_write_stops_the_run_as_interrupted(sft_ckpt, tmp_path, monkeypatch):
    """A SIGTERM (or Ctrl-C) that lands while DCP writes a shard reaches the run wrapped in DCP's
    CheckpointException: it still stops the run as interrupted (the CLI's exit 143), not as a
    failed checkpoint write, and the previous checkpoint is the one a resume uses."""
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    from stablerl.errors import Terminated

    real, calls = _FileSystemWriter.write_data, {"n": 0}

    def write_data(self, plan, planner):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Terminated("SIGTERM")
        return real(self, plan, planner)

    monkeypatch.setattr(_FileSystemWriter, "write_data", write_data)
    run_dir = tmp_path / "stopped"
    with pytest.raises(Terminated):
        train(sft_ckpt, run_dir, "train.steps=3", "checkpoint.every=1")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] is True and "aborted" not in summary
    assert checkpoint.latest(run_dir).name == "step_000001"
