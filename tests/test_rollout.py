"""The local rollout engine: numerics against the training forward, sampling, layout, sync."""

import math

import pytest
import torch
from layout import assert_batch_layout

from stablerl.config import SamplingConfig
from stablerl.diagnostics import route_agreement, train_infer_kl
from stablerl.forward import response_logp
from stablerl.models import build_model, build_tokenizer, default_model_config, tiny_config
from stablerl.precision import PackedWeight, linear, native_half_matmul, pack_weight
from stablerl.rollout import LocalEngine
from stablerl.rollout.sampling import GumbelNoise, filter_logits, sample, sample_next
from stablerl.routing import NO_ROUTE

EOS = 1


@pytest.fixture(scope="module")
def moe():
    return build_model(tiny_config("qwen3_moe", pad_token_id=0, eos_token_id=EOS), seed=0).eval()


def seeds(n, base):
    """Request i's seed: base + i."""
    return [base + i for i in range(n)]


def prompts(n=8, seed=0, lo=3, hi=10):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(2, 64, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


@pytest.mark.parametrize("fast", [True, False])
def test_fp32_engine_reproduces_training_logp_and_routes(moe, fast):
    engine = LocalEngine(moe, "fp32", fast=fast)
    batch = engine.generate(prompts(), SamplingConfig(max_new_tokens=12), seeds=seeds(8, 3))
    with torch.no_grad():
        train = response_logp(moe, batch, capture=True)
    mask = batch.response_mask
    assert float((train["logp"] - batch.rollout_logp)[mask].abs().max()) < 1e-4
    agreement = route_agreement(train["routes"], batch.routes)
    assert bool((agreement == 1.0).all()), agreement


def test_fast_and_generic_paths_sample_the_same_tokens(moe):
    ps, sampling = prompts(8, seed=9), SamplingConfig(max_new_tokens=12)
    fast = LocalEngine(moe, "fp32", fast=True).generate(ps, sampling, seeds=seeds(8, 4))
    generic = LocalEngine(moe, "fp32", fast=False).generate(ps, sampling, seeds=seeds(8, 4))
    assert torch.equal(fast.input_ids, generic.input_ids) and torch.equal(fast.routes, generic.routes)
    torch.testing.assert_close(fast.rollout_logp, generic.rollout_logp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3"])
def test_other_families_through_the_generic_path(family):
    model = build_model(tiny_config(family, pad_token_id=0, eos_token_id=EOS), seed=4).eval()
    engine = LocalEngine(model, "fp32")
    assert not engine.fast
    batch = engine.generate(prompts(4, seed=1), SamplingConfig(max_new_tokens=8))
    with torch.no_grad():
        train = response_logp(model, batch, capture=family != "qwen3")
    assert float((train["logp"] - batch.rollout_logp)[batch.response_mask].abs().max()) < 1e-4
    if family == "qwen3":
        assert batch.routes is None  # dense model: nothing to route
    else:
        assert bool((route_agreement(train["routes"], batch.routes) == 1.0).all())


def test_low_precision_engines_show_a_measurable_discrepancy(moe):
    ps = prompts(32, seed=2, lo=6, hi=12)
    sampling = SamplingConfig(max_new_tokens=16)
    results = {}
    for precision in ("bf16", "fp8"):
        batch = LocalEngine(moe, precision, eos_token_id=[]).generate(ps, sampling, seeds=seeds(32, 5))
        with torch.no_grad():
            train = response_logp(moe, batch, capture=True)
        results[precision] = (
            train_infer_kl(train["logp"], batch.rollout_logp, batch.response_mask),
            float(route_agreement(train["routes"], batch.routes).mean()),
        )
    (kl_bf16, agree_bf16), (kl_fp8, agree_fp8) = results["bf16"], results["fp8"]
    assert 0 < kl_bf16 < kl_fp8
    assert agree_fp8 < agree_bf16 < 1.0
    assert agree_fp8 > 0.8  # a discrepancy, not a different model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matmuls_multiplied_in_fp32_are_within_an_ulp_of_the_native_kernel(dtype):
    """``precision.linear`` / ``matmul`` with fp32 weights (a CPU without native half kernels):
    the same half-precision inputs, fp32 sums, one rounding of the result, so within 1 ulp of the
    result's dtype of torch's own half-precision kernel, plus what summing K products in another
    fp32 order can move (the textbook bound 2 K u_fp32 sum_k |a_k b_k|, which matters only where
    the sum cancels to near zero)."""
    from stablerl.precision import linear, matmul

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 96, generator=g).to(dtype), torch.randn(288, 96, generator=g).to(dtype)
    a, b = torch.randn(8, 20, 96, generator=g).to(dtype), torch.randn(8, 96, 192, generator=g).to(dtype)
    mantissa = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    for ours, native, magnitude in (
        (linear(x, w.float()), torch.nn.functional.linear(x, w), x.double().abs() @ w.double().abs().T),
        (matmul(a, b, torch.float32), torch.bmm(a, b), a.double().abs() @ b.double().abs()),
    ):
        assert ours.dtype == dtype and ours.shape == native.shape
        # the spacing of the result's dtype at the result (subnormals: the fixed smallest step)
        ulp = (2.0 ** (torch.floor(torch.log2(native.double().abs())) - mantissa)).clamp(
            min=torch.finfo(dtype).smallest_normal * 2.0**-mantissa
        )
        bound = ulp + 2 * 96 * 2.0**-24 * magnitude
        diff = (ours.double() - native.double()).abs()
        assert bool((diff <= bound).all()), float((diff / bound).max())
        assert float((diff > 0).float().mean()) < 0.05  # mostly bit-equal: the same inputs and products


def test_the_fp32_multiply_of_bf16_inputs_keeps_the_engine_numerics(moe, monkeypatch):
    """The fast decoder at bf16 multiplying in fp32 (``matmul_dtype``; the default on CPUs without
    native bf16) vs in bf16 through torch's kernel: the same tokens, and the same discrepancy
    against the fp32 training forward."""
    import stablerl.rollout.decoders as decoders

    ps, sampling = prompts(16, seed=2, lo=6, hi=12), SamplingConfig(max_new_tokens=12)
    out = {}
    for mode, dtype_of in (
        ("fp32", lambda dtype, device="cpu": torch.float32 if dtype == torch.bfloat16 else dtype),
        ("native", lambda dtype, device="cpu": dtype),
    ):
        monkeypatch.setattr(decoders, "matmul_dtype", dtype_of)
        batch = LocalEngine(moe, "bf16", eos_token_id=[], fast=True).generate(ps, sampling, seeds=seeds(16, 5))
        with torch.no_grad():
            train = response_logp(moe, batch, capture=True)
        out[mode] = batch, train_infer_kl(train["logp"], batch.rollout_logp, batch.response_mask)
    (ours, kl_ours), (native, kl_native) = out["fp32"], out["native"]
    assert float((ours.input_ids == native.input_ids).float().mean()) > 0.95
    assert kl_ours > 0 and kl_native > 0 and kl_ours == pytest.approx(kl_native, rel=0.3)


@pytest.mark.skipif(
    not native_half_matmul(torch.bfloat16), reason="prepacking applies where oneDNN has native bf16 kernels"
)
def test_prepacked_weights_change_no_engine_number(moe, monkeypatch):
    """The fast decoder's bf16 matrices prepacked for oneDNN (``pack_weight``) vs plain: the same
    kernel's products, so the same tokens, log-probs and routes, bit for bit; and ``linear`` on a
    packed matrix equals ``F.linear`` on the plain one at every row count."""
    import stablerl.rollout.decoders as decoders

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g).bfloat16()
    packed = pack_weight(w, 16)
    assert isinstance(packed, PackedWeight)
    assert not isinstance(pack_weight(w.float(), 16), PackedWeight)  # fp32: left as it is
    for shape in ((1, 64), (16, 64), (100, 64), (4, 3, 64)):
        x = torch.randn(*shape, generator=g).bfloat16()
        assert torch.equal(linear(x, packed), torch.nn.functional.linear(x, w))
    ps, sampling = prompts(16, seed=2, lo=6, hi=12), SamplingConfig(max_new_tokens=12)
    packed_batch = LocalEngine(moe, "bf16", eos_token_id=[], fast=True).generate(ps, sampling, seeds=seeds(16, 5))
    monkeypatch.setattr(decoders, "pack_weight", lambda weight, rows: weight)
    plain = LocalEngine(moe, "bf16", eos_token_id=[], fast=True).generate(ps, sampling, seeds=seeds(16, 5))
    assert torch.equal(packed_batch.input_ids, plain.input_ids)
    assert torch.equal(packed_batch.rollout_logp, plain.rollout_logp) and torch.equal(packed_batch.routes, plain.routes)


def test_sampling_is_reproducible_and_per_request(moe):
    engine = LocalEngine(moe, "bf16")
    ps = prompts(6, seed=3)
    sampling = SamplingConfig(max_new_tokens=10)
    a = engine.generate(ps, sampling, seeds=seeds(6, 11))
    b = engine.generate(ps, sampling, seeds=seeds(6, 11))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.rollout_logp, b.rollout_logp)
    c = engine.generate(ps, sampling, seeds=seeds(6, 12))
    assert not torch.equal(a.response_ids, c.response_ids)
    # a request's sample depends on its own seed, not on the rest of the batch
    alone = LocalEngine(moe, "fp32").generate(ps[2:3], sampling, seeds=[11 + 2])
    full = LocalEngine(moe, "fp32").generate(ps, sampling, seeds=seeds(6, 11))
    n = int(alone.response_mask.sum())
    assert torch.equal(full.response_ids[2, :n], alone.response_ids[0, :n])


def test_layout_eos_padding_and_routes(moe):
    # half of the vocabulary ends a response, so most stop early
    engine = LocalEngine(moe, "fp32", eos_token_id=list(range(1, 33)))
    ps = prompts(8, seed=4)
    batch = engine.generate(ps, SamplingConfig(max_new_tokens=10), seeds=seeds(8, 1))
    P = batch.prompt_width
    lengths = assert_batch_layout(batch, ps, lambda t: 1 <= t <= 32, max_new_tokens=10, pad_token_id=0)
    for i, n in enumerate(lengths):
        routes = batch.routes[i]
        real = batch.attention_mask[i].bool()
        assert bool((routes[~real] == NO_ROUTE).all())  # padding: no route
        last_step = batch.response_ids.shape[1] - 1
        if n - 1 == last_step:  # sampled in the final step: never fed back, so no route
            assert bool((routes[P + n - 1] == NO_ROUTE).all())
            assert bool((routes[real][:-1] >= 0).all())
        else:  # an EOS fed back in the next step has its route
            assert bool((routes[real] >= 0).all())
    assert batch.routes.shape == (8, batch.input_ids.shape[1], 4, 2)


def test_temperature_and_greedy_match_the_training_distribution(moe):
    engine = LocalEngine(moe, "fp32")
    ps = prompts(4, seed=5)
    batch = engine.generate(ps, SamplingConfig(max_new_tokens=8, temperature=0.7))
    with torch.no_grad():
        train = response_logp(moe, batch, temperature=0.7)
    assert float((train["logp"] - batch.rollout_logp)[batch.response_mask].abs().max()) < 1e-4
    greedy = engine.generate(ps, SamplingConfig(max_new_tokens=8, temperature=0))
    with torch.no_grad():
        logits = moe(input_ids=greedy.input_ids, attention_mask=greedy.attention_mask).logits
    # each greedy token is the argmax of the training model's next-token logits
    P = greedy.prompt_width
    for i in range(4):
        n = int(greedy.response_mask[i].sum())
        pos = torch.arange(P - 1, P - 1 + n)
        # left-padded rows need position ids from the mask; compare on the unpadded row instead
        row = torch.tensor(ps[i] + greedy.response_ids[i, :n].tolist())[None]
        with torch.no_grad():
            row_logits = moe(input_ids=row).logits[0, len(ps[i]) - 1 : -1]
        assert row_logits.argmax(-1).tolist() == greedy.response_ids[i, :n].tolist()
    assert bool((greedy.rollout_logp == 0).all()) and logits.shape[0] == 4 and len(pos) > 0


def test_quantize_activations_fp8_hand_worked():
    from stablerl.precision import quantize_activations_fp8

    x = torch.tensor([[448.0, 1.0, -0.5, 0.0], [896.0, 3.0, 1.0625 * 2, -20.0]])
    q = quantize_activations_fp8(x)
    # row 0: scale 1, every value is an e4m3 number; row 1: scale 2 (one scale per token),
    # 1.0625 is between the e4m3 neighbours 1.0 and 1.125 (3 mantissa bits): ties go to even
    assert q.tolist() == [[448.0, 1.0, -0.5, 0.0], [896.0, 3.0, 2.0, -20.0]]


def test_w8a8_engine_quantizes_activations_on_both_paths(moe):
    """fp8_w8a8 = the weight-only fp8 engine plus e4m3 activations: the same quantization on the
    fast and the generic path, and more discrepancy than weight-only fp8."""
    ps, sampling = prompts(32, seed=2, lo=6, hi=12), SamplingConfig(max_new_tokens=16)
    out = {}
    for precision, fast in (("fp8", True), ("fp8_w8a8", True), ("fp8_w8a8", False)):
        batch = LocalEngine(moe, precision, eos_token_id=[], fast=fast).generate(ps, sampling, seeds=seeds(32, 5))
        with torch.no_grad():
            train = response_logp(moe, batch, capture=True)
        out[precision, fast] = (batch, train_infer_kl(train["logp"], batch.rollout_logp, batch.response_mask))
    (fast, kl_fast), (generic, kl_generic) = out["fp8_w8a8", True], out["fp8_w8a8", False]
    assert kl_fast > out["fp8", True][1] and kl_generic > out["fp8", True][1]
    same = (fast.response_ids == generic.response_ids).all(-1)
    assert float(same.float().mean()) > 0.8  # bf16 paths that sum in another order, same quantization
    diff = (fast.rollout_logp - generic.rollout_logp)[same][fast.response_mask[same]].abs()
    assert float(diff.max()) < 0.05


def test_building_an_engine_never_changes_the_training_model():
    """An engine holds its own copy of the weights *and* of the config: the W8A8 engine switches
    its own model's experts implementation, which must not reach the training model (it once
    did through a shared config object, quietly quantizing the training forward's experts)."""
    model = build_model(tiny_config("qwen3_moe", pad_token_id=0, eos_token_id=EOS), seed=1).eval()
    ids = torch.tensor([prompts(1, seed=9)[0]])
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    implementation = model.config._experts_implementation
    for precision in ("fp32", "bf16", "fp8", "fp8_w8a8"):
        LocalEngine(model, precision, weight_noise=0.1).generate(prompts(2), SamplingConfig(max_new_tokens=4))
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, before), precision
        assert model.config._experts_implementation == implementation, precision


def test_weight_noise_is_a_fixed_pattern_on_the_engine_only(moe):
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    ps, sampling = prompts(32, seed=2, lo=6, hi=12), SamplingConfig(max_new_tokens=16)
    kls = []
    for noise in (0.0, 0.02, 0.1):
        engine = LocalEngine(moe, "fp32", eos_token_id=[], weight_noise=noise)
        batch = engine.generate(ps, sampling, seeds=seeds(32, 5))
        with torch.no_grad():
            kls.append(train_infer_kl(response_logp(moe, batch)["logp"], batch.rollout_logp, batch.response_mask))
        if noise:
            held = {k: v.clone() for k, v in engine.model.state_dict().items()}
            engine.load_weights(moe.state_dict())  # a sync of the same weights: the same perturbation
            assert all(torch.equal(held[k], v) for k, v in engine.model.state_dict().items())
            gate = "model.layers.0.mlp.gate.weight"
            rel = (engine.model.state_dict()[gate] - before[gate]).norm() / before[gate].norm()
            assert rel == pytest.approx(noise, rel=0.2)  # noise of the set size, routers included
    assert kls[0] < 1e-5 and 10 * kls[0] < kls[1] < kls[2]  # fp32 alone: round-off only
    assert all(torch.equal(before[k], v) for k, v in moe.state_dict().items())  # the trained weights untouched


def test_load_weights_syncs_and_versions(moe):
    engine = LocalEngine(moe, "fp32")
    assert engine.version == 0
    trained = build_model(moe.config, seed=123).eval()
    engine.load_weights(trained.state_dict())
    assert engine.version == 1
    batch = engine.generate(prompts(4, seed=6), SamplingConfig(max_new_tokens=6))
    assert batch.version == 1
    with torch.no_grad():
        new, old = response_logp(trained, batch), response_logp(moe, batch)
    assert float((new["logp"] - batch.rollout_logp)[batch.response_mask].abs().max()) < 1e-4
    assert float((old["logp"] - batch.rollout_logp)[batch.response_mask].abs().max()) > 1e-2
    engine.load_weights(moe.state_dict(), version=7)
    assert engine.version == 7
    with pytest.raises(ValueError, match="lacks"):
        engine.load_weights({})


def test_fp8_engine_holds_quantized_weights(moe):
    engine = LocalEngine(moe, "fp8")
    w_train = moe.model.layers[0].self_attn.q_proj.weight.detach()
    w_engine = engine.model.model.layers[0].self_attn.q_proj.weight
    assert w_engine.dtype == torch.bfloat16
    # e4m3 has 3 mantissa bits: rounding error up to 2^-4 of a value (plus 2^-9 for the bf16
    # result), so at most ~2^-4 of its row's largest value; bf16 alone would stay under 2^-9
    rel = ((w_engine.float() - w_train) / w_train.abs().amax(-1, keepdim=True)).abs().max()
    assert 2**-9 < float(rel) <= 2**-4 + 2**-8
    # routers, norms and embeddings stay bf16 (not fp8-quantized)
    router = engine.model.model.layers[0].mlp.gate.weight
    torch.testing.assert_close(router.float(), moe.model.layers[0].mlp.gate.weight.bfloat16().float())


def test_filter_logits_hand_worked():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda cfg: torch.isfinite(filter_logits(logits, cfg))[0].tolist()  # noqa: E731
    assert kept(SamplingConfig(top_k=2)) == [True, True, False, False, False]
    assert kept(SamplingConfig(top_p=0.5)) == [True, False, False, False, False]
    assert kept(SamplingConfig(top_p=0.7)) == [True, True, False, False, False]
    assert kept(SamplingConfig(top_p=0.71)) == [True, True, True, False, False]
    assert kept(SamplingConfig(top_k=3, top_p=0.6)) == [True, True, False, False, False]


def test_gumbel_sampling_matches_the_filtered_distribution():
    """Empirical frequencies of 20000 draws against the renormalized top-p/temperature distribution,
    and the returned log-prob is that distribution's."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    cfg = SamplingConfig(temperature=0.8, top_p=0.9)
    filtered = filter_logits(logits[None], cfg)[0]
    target = filtered.softmax(-1)
    n = 20000
    noise = GumbelNoise(list(range(n)), 6)
    tokens, logp = sample(logits[None].expand(n, 6), cfg, noise, 0)
    freq = torch.bincount(tokens, minlength=6).double() / n
    for p, f in zip(target.tolist(), freq.tolist()):
        assert abs(f - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9
    torch.testing.assert_close(logp, target.log()[tokens])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sample_next_is_the_eager_loops_sampling_and_bookkeeping(temperature):
    """``sample_next`` (what the compiled decode runs inside its graph) against the eager loop's
    steps written out by hand: rows that had finished get the pad token and log-prob 0, a row
    ends when it samples one of the EOS ids, the others draw what ``sample`` draws."""
    cfg = SamplingConfig(temperature=temperature, top_k=6)
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0)) * 3
    finished = torch.tensor([False, True, False, False, True, False, False, False])
    eos, pad = torch.tensor([2, 7]), 9
    drawn, drawn_logp = sample(logits, cfg, GumbelNoise(list(range(8)), 10), 3)
    noise = GumbelNoise(list(range(8)), 10)
    tokens, logp, active, now_finished = sample_next(
        logits, noise.step(3) if temperature else None, finished, cfg, eos, pad
    )
    assert torch.equal(active, ~finished)
    assert tokens.tolist() == [pad if f else int(t) for t, f in zip(drawn, finished)]
    assert logp.tolist() == [0.0 if f else float(lp) for lp, f in zip(drawn_logp, finished)]
    assert now_finished.tolist() == [bool(f or int(t) in (2, 7)) for t, f in zip(drawn, finished)]
    assert bool((now_finished & ~finished).any())  # a row really ended here (it drew EOS 7)
    assert (temperature == 0) == (not logp.any())


def test_engine_errors(moe):
    with pytest.raises(ValueError, match="precision"):
        LocalEngine(moe, "fp4")
    engine = LocalEngine(moe, "bf16")
    with pytest.raises(ValueError, match="non-empty"):
        engine.generate([[]], SamplingConfig())
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        engine.generate([[1, 99]], SamplingConfig())
    with pytest.raises(ValueError, match="seeds"):
        engine.generate([[1, 2]], SamplingConfig(), seeds=[1, 2])
    with pytest.raises(ValueError, match="qwen3_moe only"):
        LocalEngine(build_model(tiny_config("mixtral")), "fp32", fast=True)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)


def test_concat_of_pieces_is_the_layout_of_one_call():
    """Rollout workers sample pieces of a learner's rows in separate calls; concatenated, they
    must be exactly the batch one call over all the prompts gives (fp32: same tokens and routes)."""
    from stablerl.rollout import concat

    tok = build_tokenizer()
    model = build_model(default_model_config(tok), seed=0)
    engine = LocalEngine(model, "fp32", eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10], [1, 5], [1, 9, 9, 9]]
    sampling = SamplingConfig(max_new_tokens=8)
    whole = engine.generate(prompts, sampling, seeds=[0, 1, 2, 3])
    joined = concat(
        [engine.generate(prompts[:2], sampling, seeds=[0, 1]), engine.generate(prompts[2:], sampling, seeds=[2, 3])],
        tok.pad_token_id,
    )
    assert joined.prompt_width == whole.prompt_width
    for name in ("input_ids", "attention_mask", "response_mask", "finished", "routes"):
        assert torch.equal(getattr(joined, name), getattr(whole, name)), name
    torch.testing.assert_close(joined.rollout_logp, whole.rollout_logp, rtol=0, atol=1e-6)


def test_per_token_versions_survive_concat_select_and_trim():
    """In-flight batches carry each token's version: a piece without them is all its own version
    (0 at padding), the joined batch's version is the oldest, and row and column slices keep the
    versions aligned with their tokens."""
    from dataclasses import replace

    from stablerl.rollout import concat

    tok = build_tokenizer()
    engine = LocalEngine(build_model(default_model_config(tok), seed=0), "fp32", eos_token_id=[], pad_token_id=0)
    sampling = SamplingConfig(max_new_tokens=6)
    a = replace(engine.generate([[1, 5, 6], [1, 7]], sampling, seeds=[0, 1]), version=3)
    b = engine.generate([[1, 9, 9, 9]], SamplingConfig(max_new_tokens=4), seeds=[2])
    b = replace(b, version=2, token_version=torch.tensor([[2, 2, 3, 3]]))
    joined = concat([a, b], tok.pad_token_id)
    assert joined.version == 2
    assert joined.token_version.tolist() == [[3] * 6, [3] * 6, [2, 2, 3, 3, 0, 0]]
    assert torch.equal(joined.token_version == 0, ~joined.response_mask)
    picked = joined.select([2])
    assert picked.token_version.tolist() == [[2, 2, 3, 3, 0, 0]]
    assert picked.trim().token_version.tolist() == [[2, 2, 3, 3]]


def test_e2m1_rounding_and_nvfp4_blocks_hand_worked():
    from stablerl.precision import quantize_activations_nvfp4, quantize_nvfp4, round_e2m1

    # the e2m1 grid 0, .5, 1, 1.5, 2, 3, 4, 6; ties go to the even mantissa (0, 1, 2, 4), beyond 6 saturates
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.3, -2.6, 0.1, 4.9])
    assert round_e2m1(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.5, -3.0, 0.0, 4.0]
    # one token, two blocks of 16; the per-token fp32 scale is g = amax / (6 x 448) = 12 / 2688.
    # block 0: amax 12 -> e4m3 block scale 2 / g = 448 -> 2 per e2m1 unit: 12, 5, -2.9, 1 are
    # 6, 2.5, -1.45, 0.5 units -> 6, 2 (tie to even), -1.5, 0.5 -> 12, 4, -3, 1.
    # block 1: amax 3 -> block scale 0.5 / g = 112 (an e4m3 number) -> 0.5 per unit: 3, 0.7,
    # -1.3, 0.2 are 6, 1.4, -2.6, 0.4 units -> 6, 1.5, -3, 0.5 -> 3, 0.75, -1.5, 0.25
    b0 = [12.0, 5.0, -2.9, 1.0] + [0.0] * 12
    b1 = [3.0, 0.7, -1.3, 0.2] + [0.0] * 12
    q = quantize_activations_nvfp4(torch.tensor([b0 + b1]))
    assert q[0, :4].tolist() == [12.0, 4.0, -3.0, 1.0]
    assert q[0, 16:20].tolist() == [3.0, 0.75, -1.5, 0.25]
    # weights: one fp32 scale per matrix (per expert of a stacked tensor): scaling one expert
    # changes no other expert's rounding; a last dim not a multiple of 16 ends in a short block
    e = torch.randn(3, 8, 40, generator=torch.Generator().manual_seed(0))
    scaled = e.clone()
    scaled[0] *= 100
    assert torch.equal(quantize_nvfp4(scaled)[1:], quantize_nvfp4(e)[1:]) and quantize_nvfp4(e).shape == (3, 8, 40)


def _nearest_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Brute force: the nearest of the eight magnitudes (in float64), a tie to the even index;
    beyond 6 it saturates."""
    from stablerl.precision import E2M1_VALUES

    grid = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    dist = (x.double().abs().clamp(max=6.0)[:, None] - grid).abs()
    nearest = dist == dist.min(dim=1, keepdim=True).values
    prefer_even = torch.tensor([2.0, 1.0] * 4, dtype=torch.float64)
    return torch.sign(x.double()) * grid[(nearest * prefer_even).argmax(dim=1)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_e2m1_rounding_equals_the_brute_force_nearest_value(dtype):
    from stablerl.precision import round_e2m1

    if dtype == torch.bfloat16:  # every bfloat16 number but NaN and inf
        x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    else:  # every midpoint and grid value, its two neighbours, and a spread of random values
        points = torch.tensor([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
        points = torch.cat(
            [points, torch.nextafter(points, torch.tensor(0.0)), torch.nextafter(points, torch.tensor(9.0))]
        )
        spread = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 4
        x = torch.cat([points, -points, spread])
    x = x[x.isfinite()]
    assert torch.equal(round_e2m1(x).double(), _nearest_e2m1(x))


def test_nvfp4_engines_raise_the_discrepancy_above_fp8(moe):
    """The ladder fp8 -> fp8_w8a8 -> nvfp4 -> nvfp4_w4a4 raises the training-inference KL, and
    nvfp4_w4a4 quantizes the same way on the fast and the generic path."""
    ps, sampling = prompts(32, seed=2, lo=6, hi=12), SamplingConfig(max_new_tokens=16)
    kl = {}
    for precision, fast in (
        ("fp8", True),
        ("fp8_w8a8", True),
        ("nvfp4", True),
        ("nvfp4_w4a4", True),
        ("nvfp4_w4a4", False),
    ):
        batch = LocalEngine(moe, precision, eos_token_id=[], fast=fast).generate(ps, sampling, seeds=seeds(32, 5))
        with torch.no_grad():
            train = response_logp(moe, batch)
        kl[precision, fast] = float(train_infer_kl(train["logp"], batch.rollout_logp, batch.response_mask))
    assert kl["fp8", True] < kl["fp8_w8a8", True] < kl["nvfp4", True] < kl["nvfp4_w4a4", True]
    assert kl["nvfp4_w4a4", False] == pytest.approx(kl["nvfp4_w4a4", True], rel=0.5)


def test_vllm_refuses_nvfp4_with_a_reason():
    from stablerl.rollout.vllm_support import vllm_dtype_args

    with pytest.raises(ValueError, match="rollout.engine=local, which emulates it"):
        vllm_dtype_args("nvfp4", on_cuda=True)


@pytest.mark.parametrize("fast", [True, False])
def test_dropping_finished_rows_changes_nothing(moe, fast, monkeypatch):
    """Rows that have ended leave the decode (their caches are cut away): every row's tokens,
    log-probs and routes are those of the decode that kept computing them."""
    from stablerl.rollout import local

    ps, sampling = prompts(24, seed=4, lo=3, hi=12), SamplingConfig(max_new_tokens=24)
    out = {}
    for drop in (0.01, 0.25, 2.0):  # 0.01: at every row that ends; 2.0: never
        monkeypatch.setattr(local, "DROP_FINISHED", drop)
        engine = LocalEngine(
            moe,
            "bf16",
            eos_token_id=[5, 9, 17],
            fast=fast,  # frequent EOS: rows end apart
            drop_finished=True,
        )
        out[drop] = engine.generate(ps, sampling, seeds=seeds(24, 3))
    b = out[2.0]
    lengths = b.response_mask.sum(-1)
    assert len(set(lengths.tolist())) > 3 and int(lengths.min()) < 12  # rows ended at many different steps
    for a in (out[0.01], out[0.25]):
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
        assert torch.allclose(a.rollout_logp, b.rollout_logp, atol=1e-5)
        assert torch.equal(a.routes, b.routes)
