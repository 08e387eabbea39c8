"""Routing capture and replay on real HF MoE models (four families)."""

import pytest
import torch

from stablerl.models import build_model, position_ids_from_mask, tiny_config
from stablerl.routing import NO_ROUTE, capture_routes, moe_routers, replay_routes, replay_weights

MOE_FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]


@pytest.fixture(scope="module")
def models():
    return {f: build_model(tiny_config(f, pad_token_id=0, eos_token_id=None), seed=1).eval() for f in MOE_FAMILIES}


def forward(model, ids, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_capture_shape_dtype_and_values(models, family):
    model = models[family]
    ids = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_routes(model) as cap:
        forward(model, ids)
    routes = cap.routes
    assert routes.shape == (3, 9, 4, 2) and routes.dtype == torch.int16
    assert int(routes.min()) >= 0 and int(routes.max()) < 8
    # the top-k experts of a position are distinct
    assert bool((routes[..., 0] != routes[..., 1]).all())


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_capture_alignment_with_padding(models, family, side):
    """Routes of a padded batch, at real positions, equal the routes of each sequence run alone;
    padding positions are -1."""
    model = models[family]
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, 64, (n,), generator=g) for n in (7, 4, 6)]
    T = 7
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    with torch.no_grad(), capture_routes(model) as cap:
        forward(model, ids, mask)
    padded = cap.routes
    assert bool((padded[mask == 0] == NO_ROUTE).all())
    for i, s in enumerate(seqs):
        with torch.no_grad(), capture_routes(model) as alone:
            forward(model, s[None])
        real = padded[i][mask[i] == 1]
        assert torch.equal(real, alone.routes[0]), f"sequence {i} misaligned"


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_replaying_own_routes_leaves_logits_unchanged(models, family):
    model = models[family]
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), capture_routes(model) as cap:
        live = forward(model, ids)
    with torch.no_grad(), replay_routes(model, cap.routes):
        replayed = forward(model, ids)
    torch.testing.assert_close(replayed, live, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_replaying_another_engines_routes_routes_exactly_as_replayed(models, family):
    model = models[family]
    other = build_model(tiny_config(family, pad_token_id=0, eos_token_id=None), seed=99).eval()
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), capture_routes(other) as theirs, capture_routes(model) as ours:
        forward(other, ids)
        live = forward(model, ids)
    assert not torch.equal(theirs.routes, ours.routes)  # the two engines route differently
    # capture nested inside replay, and capture outside replay, both see the replayed routes
    with (
        torch.no_grad(),
        capture_routes(model) as outer,
        replay_routes(model, theirs.routes),
        capture_routes(model) as inner,
    ):
        replayed = forward(model, ids)
    assert torch.equal(inner.routes, theirs.routes) and torch.equal(outer.routes, theirs.routes)
    assert not torch.allclose(replayed, live)


def test_missing_routes_fall_back_to_live_routing(models):
    model = models["qwen3_moe"]
    other = build_model(tiny_config("qwen3_moe"), seed=7).eval()
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), capture_routes(other) as theirs, capture_routes(model) as ours:
        forward(other, ids)
        forward(model, ids)
    routes = theirs.routes.clone()
    routes[0, 3:] = NO_ROUTE  # an engine could not report these positions
    routes[1, :, 2] = NO_ROUTE  # nor layer 2 of the second sequence
    with torch.no_grad(), replay_routes(model, routes), capture_routes(model) as got:
        forward(model, ids)
    expected = theirs.routes.clone()
    # positions without a route take the model's own choice for that forward; layer 0 at those
    # positions sees the same hidden states as the live forward, so its choice is the live one
    assert torch.equal(got.routes[0, :3], expected[0, :3])
    assert torch.equal(got.routes[0, 3:, 0], ours.routes[0, 3:, 0])
    assert torch.equal(got.routes[1, :, :2], expected[1, :, :2])
    assert bool((got.routes >= 0).all())


def test_replay_weights_gradient_is_exact():
    """The replayed routing weights (softmax, gather at fixed experts, renormalize) as a pure
    function of the router logits: autograd against float64 finite differences."""
    logits = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 3], [7, 1], [2, 2 + 3], [4, 6], [1, 0]])
    for normalize in (True, False):
        assert torch.autograd.gradcheck(lambda x, n=normalize: replay_weights(x, idx, n, torch.float64), (logits,))


def test_router_gradient_under_replay_matches_finite_differences():
    """End to end through the model: HF computes its norms and softmaxes in fp32 even in an
    fp64 model, so the finite difference is 4th-order with a large step (h = 0.04; routes are
    replayed, so nothing flips) and the tolerance is that fp32 noise floor (measured ~5e-6
    absolute), far below the size of any real gradient error (~1e-2 here)."""
    model = build_model(tiny_config("qwen3_moe"), seed=3, dtype=torch.float64).eval()
    model.config._experts_implementation = "eager"  # float64 on CPU
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(6))
    proj = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    other = build_model(tiny_config("qwen3_moe"), seed=8).eval()
    with torch.no_grad(), capture_routes(other) as cap:
        forward(other, ids)
    routes = cap.routes  # replay routes the model would not pick itself
    router = moe_routers(model)[1]

    def objective():
        with replay_routes(model, routes):
            return (forward(model, ids) * proj).sum()

    model.zero_grad()
    objective().backward()
    grad = router.weight.grad.clone()
    assert float(grad.abs().max()) > 1e-3  # the router keeps its gradient under replay
    h = 0.04
    checked = 0
    for e in range(8):
        for j in (0, 5, 33, 60):
            values = {}
            with torch.no_grad():
                for step in (-2, -1, 1, 2):
                    router.weight[e, j] += step * h
                    values[step] = float(objective())
                    router.weight[e, j] -= step * h
            fd = (8 * (values[1] - values[-1]) - (values[2] - values[-2])) / (12 * h)
            assert grad[e, j].item() == pytest.approx(fd, rel=1e-3, abs=2e-5), (e, j)
            checked += abs(fd) > 1e-3
    assert checked >= 8  # enough entries with a gradient well above the noise floor


def test_errors_are_clear(models):
    dense = build_model(tiny_config("qwen3"))
    with pytest.raises(ValueError, match="supported: qwen3_moe, qwen2_moe, olmoe, mixtral"):
        with capture_routes(dense):
            pass
    model = models["qwen3_moe"]
    ids = torch.randint(1, 64, (2, 5))
    with torch.no_grad(), capture_routes(model) as cap:
        forward(model, ids)
    routes = cap.routes
    with pytest.raises(ValueError, match="shape"):
        with torch.no_grad(), replay_routes(model, routes):
            forward(model, ids[:, :4])  # inputs shorter than the routes: never silently misaligned
    with pytest.raises(ValueError, match="layers, top_k"):
        with replay_routes(model, routes[:, :, :3]):
            pass
    bad = routes.clone()
    bad[0, 0, 0, 0] = 8
    with pytest.raises(ValueError, match="-1 .* or in \\[0, 8\\)"):
        with replay_routes(model, bad):
            pass
    half = routes.clone()
    half[0, 0, 0, 0] = NO_ROUTE
    with pytest.raises(ValueError, match="all of its top_k experts or none"):
        with replay_routes(model, half):
            pass
    with pytest.raises(ValueError, match="integer tensor"):
        with replay_routes(model, routes.float()):
            pass
