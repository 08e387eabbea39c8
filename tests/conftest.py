"""Shared fixtures: a tiny cold-started policy (SFT of a 2-layer Qwen3-MoE for 30 steps)."""

import pytest

from stablerl.checkpoint import save_model_dir
from stablerl.models import build_model, build_tokenizer, default_model_config
from stablerl.sft import run_sft
from stablerl.tasks import ArithmeticTask


@pytest.fixture(scope="session")
def sft_ckpt(tmp_path_factory):
    tok = build_tokenizer()
    model = build_model(default_model_config(tok, hidden_size=32, expert_size=32, num_layers=2), seed=0)
    run_sft(model, tok, ArithmeticTask(levels=[1]), steps=30, batch_size=16, lr=3e-3, seed=0, log=None)
    return save_model_dir(tmp_path_factory.mktemp("sft") / "ckpt", model, tok)
