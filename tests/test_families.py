"""Routing capture and replay on a tiny random model of every MoE family of stablerl.families."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from stablerl.checkpoint import save_model_dir
from stablerl.config import RunConfig, SamplingConfig
from stablerl.config_io import build_config
from stablerl.diagnostics import route_agreement
from stablerl.families import FAMILIES
from stablerl.forward import response_logp
from stablerl.loop import Trainer
from stablerl.models import build_model, build_tokenizer, default_model_config, position_ids_from_mask, tiny_config
from stablerl.moe import use_fast_experts
from stablerl.rollout import LocalEngine
from stablerl.routing import capture_routes, moe_layer_indices, moe_routers, replay_router_hooks, replay_routes
from stablerl.runlog import read_metrics

NAMES = list(FAMILIES)
EOS = 1


def make(family: str, seed: int = 1) -> torch.nn.Module:
    model = build_model(tiny_config(family, pad_token_id=0, eos_token_id=EOS), seed=seed).eval()
    for router in moe_routers(model):
        if hasattr(router, "e_score_correction_bias"):  # zero when fresh: make it choose
            g = torch.Generator().manual_seed(seed)
            router.e_score_correction_bias.copy_(0.3 * torch.randn(router.num_experts, generator=g))
    return model


@pytest.fixture(scope="module")
def models():
    return {f: make(f) for f in NAMES}


@pytest.fixture(scope="module")
def others():
    """A second model of each family: its routes are ones the first would not choose."""
    return {f: make(f, seed=99) for f in NAMES}


def forward(model, ids):
    mask = torch.ones_like(ids)
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits


def ids_for(seed: int, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(2, 64, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", NAMES)
def test_replaying_its_own_routes_reproduces_the_free_forward_bit_for_bit(models, family):
    model, ids = models[family], ids_for(0)
    with torch.no_grad(), capture_routes(model) as cap:
        live = forward(model, ids)
    assert cap.routes.shape == (2, 9, len(moe_layer_indices(model)), 2)
    with torch.no_grad(), replay_routes(model, cap.routes):
        replayed = forward(model, ids)
    assert torch.equal(replayed, live)


@pytest.mark.parametrize("family", NAMES)
def test_replaying_other_routes_runs_exactly_those_experts(models, others, family):
    model, ids = models[family], ids_for(1)
    with torch.no_grad(), capture_routes(others[family]) as theirs, capture_routes(model) as ours:
        forward(others[family], ids)
        live = forward(model, ids)
    assert not torch.equal(theirs.routes, ours.routes)
    ran = []  # the expert indices each MoE layer's experts module is called with
    blocks = [m for m in model.modules() if hasattr(m, "experts") and hasattr(m.experts, "down_proj")]
    hooks = [b.experts.register_forward_pre_hook(lambda _m, args: ran.append(args[1])) for b in blocks]
    try:
        with torch.no_grad(), replay_routes(model, theirs.routes), capture_routes(model) as got:
            replayed = forward(model, ids)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(got.routes, theirs.routes)
    expected = theirs.routes.long()
    assert len(ran) == expected.shape[2]
    for layer, idx in enumerate(ran):
        assert torch.equal(idx.reshape(2, 9, -1).long(), expected[:, :, layer])
    assert not torch.allclose(replayed, live)


def independent_weights(family: str, router, x: torch.Tensor, idx: torch.Tensor, config) -> torch.Tensor:
    """The family's weights at experts ``idx``, written out from its paper/model card formula."""
    bias = getattr(router, "bias", None)
    logits = x.float() @ router.weight.float().T + (0 if bias is None else bias.float())
    scoring = FAMILIES[family].scoring
    if scoring == "topk_softmax":  # gpt-oss: softmax over the chosen experts' logits
        chosen = logits.gather(-1, idx)
        return chosen.exp() / chosen.exp().sum(-1, keepdim=True)
    if scoring == "sigmoid_grouped":  # DeepSeek-V3: sigmoid, no correction bias, normalise, scale
        s = torch.sigmoid(logits).gather(-1, idx)
        return s / s.sum(-1, keepdim=True) * config.routed_scaling_factor
    p = logits.exp() / logits.exp().sum(-1, keepdim=True)
    w = p.gather(-1, idx)
    return w / w.sum(-1, keepdim=True) if getattr(config, "norm_topk_prob", True) else w


@pytest.mark.parametrize("family", NAMES)
def test_replayed_weights_and_router_gradient_follow_the_family_scoring(models, others, family):
    """At one router: the replayed weights and d(weights . r)/d(router weight) equal an independent
    computation of the family's scoring (autograd through it), and one entry a finite difference."""
    model = models[family]
    ids = ids_for(2, (1, 12))
    with torch.no_grad(), capture_routes(others[family]) as theirs:
        forward(others[family], ids)
    router = moe_routers(model)[-1]
    layer = len(moe_routers(model)) - 1
    x = torch.randn(12, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    r = torch.randn(12, 2, generator=torch.Generator().manual_seed(4))
    idx = theirs.routes[0, :, layer].long()

    def replayed_loss():
        with replay_router_hooks(model, theirs.routes):
            _, weights, chosen = router(x)
        assert torch.equal(chosen, idx)
        return weights, (weights * r).sum()

    router.zero_grad()
    weights, loss = replayed_loss()
    loss.backward()
    grad = router.weight.grad.clone()
    w = router.weight.detach().clone().requires_grad_(True)
    reference = independent_weights(family, _with_weight(router, w), x, idx, model.config)
    (reference * r).sum().backward()
    torch.testing.assert_close(weights.detach().float(), reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.float(), w.grad, rtol=1e-4, atol=1e-6)
    assert float(grad.abs().max()) > 1e-3  # the router keeps its gradient under replay
    e, j = int(idx[0, 0]), 5
    h, values = 1e-2, []
    with torch.no_grad():
        for step in (1, -1):
            router.weight[e, j] += step * h
            values.append(float(replayed_loss()[1]))
            router.weight[e, j] -= step * h
    assert grad[e, j].item() == pytest.approx((values[0] - values[1]) / (2 * h), rel=2e-2, abs=1e-4)


class _with_weight:
    """``router`` seen with another weight tensor (for the independent computation's autograd)."""

    def __init__(self, router, weight):
        self.weight, self.bias = weight, getattr(router, "bias", None)


@pytest.mark.parametrize("family", NAMES)
def test_local_engine_samples_with_routes_equal_to_the_training_forward_per_layer(models, family):
    model = models[family]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 64, (int(n),), generator=g).tolist() for n in (3, 7, 5)]
    batch = LocalEngine(model, "fp32").generate(prompts, SamplingConfig(max_new_tokens=6), seeds=[1, 2, 3])
    with torch.no_grad():
        train = response_logp(model, batch, capture=True)
    assert float((train["logp"] - batch.rollout_logp)[batch.response_mask].abs().max()) < 1e-4
    agreement = route_agreement(train["routes"], batch.routes)
    assert agreement.shape == (len(moe_layer_indices(model)),) and bool((agreement == 1.0).all()), agreement
    bf16 = LocalEngine(model, "bf16").generate(prompts, SamplingConfig(max_new_tokens=6), seeds=[1, 2, 3])
    assert bf16.routes.shape[2:] == batch.routes.shape[2:] and bool(
        (bf16.routes[bf16.attention_mask == 1][:-1] >= 0).any()
    )


@pytest.mark.parametrize("family", NAMES)
def test_export_and_reload_give_the_same_model(models, family, tmp_path):
    model, tok = models[family], build_tokenizer()
    path = save_model_dir(tmp_path / family, model, tok)
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    # every tensor comes back bit for bit ...
    saved, back = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    ids = ids_for(6)
    with torch.no_grad():
        # ... so plain transformers computes the same model (its own experts kernel sums in another
        # order: round-off only), and on the same kernel as the trainer's, the same logits exactly
        plain = forward(reloaded, ids)
        assert torch.allclose(plain, forward(model, ids), rtol=0, atol=1e-5)
        assert torch.equal(forward(use_fast_experts(reloaded), ids), forward(model, ids))
    assert moe_layer_indices(reloaded) == moe_layer_indices(model)


def test_dense_first_layers_and_mlp_only_layers_have_no_route_slot():
    assert moe_layer_indices(make("deepseek_v3")) == [1, 2, 3]  # first_k_dense_replace = 1
    assert moe_layer_indices(make("glm4_moe")) == [1, 2, 3]
    qwen = build_model(tiny_config("qwen3_next", pad_token_id=0, mlp_only_layers=[2]), seed=0).eval()
    assert moe_layer_indices(qwen) == [0, 1, 3]
    with torch.no_grad(), capture_routes(qwen) as cap:
        forward(qwen, ids_for(7))
    with torch.no_grad(), replay_routes(qwen, cap.routes), capture_routes(qwen) as again:
        forward(qwen, ids_for(7))
    assert cap.routes.shape[2] == 3 and torch.equal(again.routes, cap.routes)


@pytest.fixture(scope="module")
def family_ckpts(tmp_path_factory):
    tok = build_tokenizer()
    root = tmp_path_factory.mktemp("families")
    paths = {}
    for family in NAMES:
        config = default_model_config(tok, family=family, hidden_size=32, expert_size=32, num_layers=2)
        paths[family] = save_model_dir(root / family, build_model(config, seed=0), tok)
    return paths


@pytest.mark.parametrize("family", NAMES)
def test_r2_and_r3_train_every_family(family_ckpts, family, tmp_path):
    for mode in ("R2", "R3"):
        cfg = build_config(
            RunConfig,
            None,
            [
                f"model.path={family_ckpts[family]}",
                f"run_dir={tmp_path / mode}",
                "batch.prompts_per_step=2",
                "batch.group_size=2",
                "batch.minibatches_per_step=2",
                "rollout.max_new_tokens=6",
                "rollout.precision=fp32",
                "task.levels=[1]",
                "task.eval_size=4",
                "eval.every=5",
                "log.progress=false",
                "log.tensorboard=false",
                "train.steps=1",
                f"train.routing_replay={mode}",
            ],
        )
        Trainer(cfg, tmp_path / mode, log=lambda *_: None).run()
        step = read_metrics(tmp_path / mode)[-1]
        assert step["policy_version"] == 1 and step["staleness_kl/mb0"] == pytest.approx(0.0, abs=1e-10)
        assert step["route_agreement/train_infer"] == 1.0  # fp32 engine: the same routes as training


def test_an_uncovered_moe_is_refused_naming_it_and_the_supported_families(tmp_path):
    from transformers import PhimoeConfig

    from stablerl.build import check_model

    config = PhimoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
    )
    model = AutoModelForCausalLM.from_config(config)
    cfg = build_config(RunConfig, None, [f"run_dir={tmp_path}", "train.routing_replay=R3"])
    with pytest.raises(ValueError) as err:
        check_model(cfg, model)
    message = str(err.value)
    assert "'phimoe' is a Mixture-of-Experts family routing replay does not support yet" in message
    assert "supported: qwen3_moe, qwen2_moe, olmoe, mixtral, qwen3_5_moe" in message and "gpt_oss" in message
    assert "dense" not in message


@pytest.mark.parametrize("family", ["qwen3_next", "gpt_oss", "deepseek_v3"])
def test_dropping_finished_rows_changes_no_token_route_or_logp(models, family):
    """Rows leave the decode as they end (the cache, recurrent linear-attention state included,
    keeps the live rows only); what is sampled is what the full batch samples."""
    model = models[family]
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(2, 64, (int(n),), generator=g).tolist() for n in (3, 7, 5, 4, 6, 2, 8, 5)]
    sampling, eos = SamplingConfig(max_new_tokens=10), list(range(1, 20))
    full = LocalEngine(model, "fp32", eos_token_id=eos).generate(prompts, sampling, seeds=list(range(8)))
    dropped = LocalEngine(model, "fp32", eos_token_id=eos, drop_finished=True).generate(
        prompts, sampling, seeds=list(range(8))
    )
    assert len(set(full.response_mask.sum(1).tolist())) > 2  # rows end at different steps
    assert torch.equal(full.input_ids, dropped.input_ids) and torch.equal(full.routes, dropped.routes)
    torch.testing.assert_close(full.rollout_logp, dropped.rollout_logp, rtol=0, atol=1e-5)


def test_model_family_picks_the_tiny_model_and_keys_its_cold_start():
    from stablerl.models import build_default_policy
    from stablerl.sft import _sft_key, sft_output_dir

    default = build_config(RunConfig, None, [])
    gpt = build_config(RunConfig, None, ["model.family=gpt_oss", "model.hidden_size=32"])
    assert build_default_policy(gpt.model, build_tokenizer()).config.model_type == "gpt_oss"
    assert sft_output_dir(default) != sft_output_dir(build_config(RunConfig, None, ["model.family=gpt_oss"]))
    assert '"family"' not in _sft_key(default)  # the default model's cold starts keep their key
    with pytest.raises(ValueError, match="unknown model family 'llama4'; allowed: qwen3_moe, .*gpt_oss"):
        build_config(RunConfig, None, ["model.family=llama4"])
    with pytest.raises(ValueError, match="num_experts must be even"):
        build_config(RunConfig, None, ["model.family=deepseek_v3", "model.num_experts=7"])


def test_activation_quantized_experts_of_another_layout_are_the_module_maths_with_rounded_inputs():
    """gpt-oss experts (transposed, biased, gate/up interleaved): with an identity rounding the
    engine's W8A8 expert path equals the experts' maths written out; with fp8 rounding it moves off it."""
    from stablerl.moe import _quantized_experts_any_layout
    from stablerl.precision import quantize_activations_fp8

    experts = make("gpt_oss").model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(9)
    h = torch.randn(10, experts.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(10)])
    w = torch.softmax(torch.randn(10, 2, generator=g), -1)
    with torch.no_grad():
        exact = _quantized_experts_any_layout(experts, h, idx, w, lambda x: x)
        rounded = _quantized_experts_any_layout(experts, h, idx, w, quantize_activations_fp8)
    reference = torch.zeros_like(h)  # written out: gpt-oss's clamped SwiGLU with biases
    for t in range(10):
        for j in range(2):
            e = int(idx[t, j])
            gu = h[t] @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
            gate, up = gu[::2].clamp(max=experts.limit), gu[1::2].clamp(-experts.limit, experts.limit)
            act = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
            reference[t] += w[t, j] * (act @ experts.down_proj[e] + experts.down_proj_bias[e])
    torch.testing.assert_close(exact, reference, rtol=1e-5, atol=1e-6)
    assert 0 < float((rounded - exact).abs().max()) < 0.1 * float(exact.abs().max())
