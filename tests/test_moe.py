"""The MoE experts kernels (stablerl.moe) against per-expert loops."""

import pytest
import torch

from stablerl import moe
from stablerl.models import build_model, tiny_config
from stablerl.moe import NAME, grouped_experts, pick_layout
from stablerl.precision import PackedWeight, native_half_matmul, pack_weight


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


@pytest.mark.parametrize(
    "layout,dtype,tol,H,I",
    [
        ("padded", torch.float64, 1e-12, 6, 5),
        ("pairs", torch.float32, 1e-5, 8, 4),
        ("dense", torch.float64, 1e-12, 6, 5),
    ],
)
def test_grouped_experts_matches_a_per_expert_loop_in_value_and_gradient(layout, dtype, tol, H, I):
    # the pairs layout runs F.grouped_mm: no float64 kernel, rows of whole 16-byte multiples
    g = torch.Generator().manual_seed(0)
    N, E, k = 37, 4, 2
    h = torch.randn(N, H, generator=g, dtype=dtype, requires_grad=True)
    gate_up = torch.randn(E, 2 * I, H, generator=g, dtype=dtype, requires_grad=True)
    down = torch.randn(E, H, I, generator=g, dtype=dtype, requires_grad=True)
    w = torch.rand(N, k, generator=g, dtype=dtype, requires_grad=True)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    idx[:9] = torch.tensor([1, 3])  # an unbalanced load: expert 1 and 3 busiest, so padding slots exist
    act = torch.nn.functional.silu

    def loop(h, gate_up, down, w):  # the obvious definition, token by token
        rows = []
        for t in range(N):
            acc = torch.zeros(H, dtype=h.dtype)
            for j in range(k):
                e = int(idx[t, j])
                gate, up = (gate_up[e] @ h[t]).chunk(2)
                acc = acc + w[t, j] * (down[e] @ (act(gate) * up))
            rows.append(acc)
        return torch.stack(rows)

    out = grouped_experts(h, idx, w, gate_up, down, act, layout=layout)
    ref = loop(h, gate_up, down, w)
    assert torch.allclose(out, ref, atol=tol)
    probe = torch.randn(N, H, generator=g, dtype=dtype)
    grads = torch.autograd.grad((out * probe).sum(), (h, gate_up, down, w))
    grads_ref = torch.autograd.grad((ref * probe).sum(), (h, gate_up, down, w))
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=tol)


def test_grouped_experts_picks_the_pairs_layout_once_padding_doubles_the_rows(monkeypatch):
    g = torch.Generator().manual_seed(1)
    N, H, I, E, k = 16, 8, 8, 4, 2
    h, w = torch.randn(N, H, generator=g), torch.rand(N, k, generator=g)
    gate_up, down = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    act = torch.nn.functional.silu
    balanced = torch.arange(N * k).view(N, k) % E  # 8 pairs per expert: no padding
    skewed = torch.stack([torch.zeros(N, dtype=torch.long), torch.arange(N) % (E - 1) + 1], 1)  # expert 0: all 16
    big = (512, 512)
    for dtype in (torch.float32, torch.bfloat16):
        assert pick_layout(N * k, E * 8, *big, dtype) == "padded"  # no padding
        assert pick_layout(N * k, E * 16, *big, dtype) == "pairs"  # 64 rows for 32 pairs
        assert pick_layout(N * k, E * 16, 256, 512, dtype) == "padded"  # small experts
    assert pick_layout(N * k, E * 16, 516, 516, torch.bfloat16) == "padded"  # 1032-byte rows: no grouped_mm
    assert pick_layout(N * k, E * 16, *big, torch.float32, "meta") == "padded"  # measured on CPU only
    monkeypatch.setattr(moe, "pick_layout", lambda pairs, rows, *rest: "pairs" if rows >= 2 * pairs else "padded")
    for idx, chosen in ((balanced, "padded"), (skewed, "pairs")):
        auto = grouped_experts(h, idx, w, gate_up, down, act)
        assert torch.equal(auto, grouped_experts(h, idx, w, gate_up, down, act, layout=chosen))
        other = grouped_experts(h, idx, w, gate_up, down, act, layout={"padded": "pairs", "pairs": "padded"}[chosen])
        assert torch.allclose(auto, other, atol=1e-5)
    if native_half_matmul(torch.bfloat16):  # the pairs layout on prepacked bf16 matrices, expert by expert
        hb, wb, gub, db = h.bfloat16(), w.bfloat16(), gate_up.bfloat16(), down.bfloat16()
        packed = ([pack_weight(m, 4) for m in gub], [pack_weight(m, 4) for m in db])
        assert isinstance(packed[0][0], PackedWeight)
        on_packed = grouped_experts(hb, skewed, wb, gub, db, act, layout="pairs", packed=packed)
        grouped = grouped_experts(hb, skewed, wb, gub, db, act, layout="pairs")
        exact = grouped_experts(h.double(), skewed, w.double(), gate_up.double(), down.double(), act, layout="padded")
        scale = float(exact.abs().max())
        assert float((on_packed.double() - exact).abs().max()) < 0.02 * scale  # bf16 round-off
        assert float((on_packed.double() - grouped.double()).abs().max()) < 0.02 * scale
    with pytest.raises(ValueError, match="layout must be 'padded', 'pairs', 'dense' or None"):
        grouped_experts(h, skewed, w, gate_up, down, act, layout="diagonal")


def test_the_compiled_decode_layout_follows_the_rule():
    from stablerl.moe import static_layout

    f32, b16 = torch.float32, torch.bfloat16
    assert static_layout(8, 2, 64, 64, f32) == "dense"  # the tiny model's step
    assert static_layout(8, 2, 64, 64, f32, decode=False) == "pairs"  # its prefill
    assert static_layout(32, 4, 64, 48, f32) == "pairs"  # the deep shape: E > 4k
    assert static_layout(8, 2, 1024, 512, b16) == "pairs"  # experts of 512 x 512 and up
    assert static_layout(32, 4, 64, 6, b16) == "dense"  # 12-byte rows: no grouped_mm
