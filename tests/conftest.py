"""Shared fixtures: a tiny cold-started policy (SFT of a 2-layer Qwen3-MoE for 30 steps); and
``--vllm-only``, the vLLM suite's selection (scripts/test.sh), which a user's ``-m`` narrows
instead of replacing."""

import pytest


@pytest.fixture(scope="session")
def sft_ckpt(tmp_path_factory):
    # imported here, not at the top: collecting tests (as tests/test_harness.py does) needs no torch
    from stablerl.checkpoint import save_model_dir
    from stablerl.models import build_model, build_tokenizer, default_model_config
    from stablerl.sft import run_sft
    from stablerl.tasks import ArithmeticTask

    tok = build_tokenizer()
    model = build_model(default_model_config(tok, hidden_size=32, expert_size=32, num_layers=2), seed=0)
    run_sft(model, tok, ArithmeticTask(levels=[1]), steps=30, batch_size=16, lr=3e-3, seed=0, log=None)
    return save_model_dir(tmp_path_factory.mktemp("sft") / "ckpt", model, tok)


def pytest_addoption(parser):
    parser.addoption(
        "--vllm-only", action="store_true", help="run only the tests marked vllm (together with any -m expression)"
    )


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--vllm-only"):
        return
    others = [item for item in items if item.get_closest_marker("vllm") is None]
    if others:
        config.hook.pytest_deselected(items=others)
        items[:] = [item for item in items if item.get_closest_marker("vllm") is not None]
