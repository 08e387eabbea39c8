"""The training-side experts kernel (stablerl.moe) against transformers' own per-expert loop."""

import pytest
import torch

from stablerl.models import build_model, tiny_config
from stablerl.moe import NAME


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_fast_experts_match_the_eager_loop_in_logits_and_gradients(family):
    model = build_model(tiny_config(family, vocab_size=50, hidden_size=32, num_layers=2), seed=0)
    assert model.config._experts_implementation == NAME  # build_model switches MoE models to it
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (6, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[:2, :4] = 0  # left padding on two rows

    def run(impl):
        model.set_experts_implementation(impl)
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits.log_softmax(-1)[..., 7] * mask).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits, grads = run(NAME)
    ref_logits, ref_grads = run("eager")  # HF's token loop over experts: an independent computation
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    expert_grads = [n for n in grads if "experts" in n]
    assert expert_grads
    for n in grads:
        assert torch.allclose(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4), n


def test_dense_models_are_left_alone():
    model = build_model(tiny_config("qwen3", vocab_size=50, hidden_size=32, num_layers=2), seed=0)
    assert getattr(model.config, "_experts_implementation", None) != NAME
