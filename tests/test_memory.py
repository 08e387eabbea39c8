"""Memory settings never change results: activation checkpointing (with routing replay held in
the recompute), token-budget micro-batches, packed (padding-free) forwards; and the training
dtype (train.dtype)."""

from pathlib import Path

import pytest
import torch

from stablerl import checkpoint
from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.forward import enable_activation_checkpointing, pack_layout, response_logp
from stablerl.learner import micro_batches
from stablerl.models import build_model, position_ids_from_mask, tiny_config
from stablerl.routing import capture_routes, replay_routes


# ---------------------------------------------------------------------------------------------
# activation checkpointing: the same gradients, with and without replayed routes
# ---------------------------------------------------------------------------------------------
def _grads(model, ids, routes):
    model.zero_grad(set_to_none=True)
    mask = torch.ones_like(ids)
    ctx = (
        replay_routes(model, routes)
        if routes is not None
        else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    )
    with ctx:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    # the backward runs after the replay context closed, as the learner's does
    (torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None]).sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("replay", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(family, replay):
    cfg = tiny_config(family, pad_token_id=0, eos_token_id=None)
    plain = build_model(cfg, seed=3, dtype=torch.float32).eval()
    ckpt = build_model(cfg, seed=3, dtype=torch.float32).eval()
    enable_activation_checkpointing(ckpt)
    ids = torch.randint(1, 64, (3, 10), generator=torch.Generator().manual_seed(5))
    routes = None
    if replay:  # another model's routes: replayed, they differ from what the layer would pick live
        other = build_model(cfg, seed=77, dtype=torch.float32).eval()
        with torch.no_grad(), capture_routes(other) as theirs, capture_routes(plain) as ours:
            other(input_ids=ids)
            plain(input_ids=ids)
        assert not torch.equal(theirs.routes, ours.routes)
        routes = theirs.routes
    a, b = _grads(plain, ids, routes), _grads(ckpt, ids, routes)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-8, msg=name)


def test_checkpointed_recompute_without_the_replay_would_differ():
    """The pitfall the recompute guards against, shown: a recompute that routes live (the
    replay closed before the backward) is another function than the forward — torch's
    checkpoint notices it saved different tensors, or the gradient differs."""
    from stablerl import forward as F

    cfg = tiny_config("qwen3_moe", pad_token_id=0, eos_token_id=None)
    plain = build_model(cfg, seed=3, dtype=torch.float32).eval()
    naive = build_model(cfg, seed=3, dtype=torch.float32).eval()
    ids = torch.randint(1, 64, (3, 10), generator=torch.Generator().manual_seed(5))
    other = build_model(cfg, seed=77, dtype=torch.float32).eval()
    with torch.no_grad(), capture_routes(other) as theirs:
        other(input_ids=ids)
    original = F._recompute_contexts
    try:
        F._recompute_contexts = lambda model: (F.nullcontext(), F.nullcontext())
        F.enable_activation_checkpointing(naive)
        a = _grads(plain, ids, theirs.routes)
        try:
            b = _grads(naive, ids, theirs.routes)
        except torch.utils.checkpoint.CheckpointError:
            return
    finally:
        F._recompute_contexts = original
    assert any(not torch.allclose(a[n], b[n]) for n in a)


# ---------------------------------------------------------------------------------------------
# token-budget micro-batches
# ---------------------------------------------------------------------------------------------
def test_micro_batches_by_tokens_hand_worked():
    rows = torch.tensor([4, 0, 3, 1, 2])
    lengths = torch.tensor([2, 10, 1, 6, 3])  # response length of row r
    # prompt width 2: padded widths of rows 4, 0, 3, 1, 2 are 5, 4, 8, 12, 3
    pieces = micro_batches(rows, lengths, 2, max_rows=8, max_tokens=16)
    # [4, 0]: 2 x 5 = 10; + row 3 -> 3 x 8 = 24 > 16: cut. [3]: 8; + row 1 -> 2 x 12 = 24: cut.
    # [1]: 12; + row 2 -> 2 x 12 = 24: cut. [2]
    assert [p.tolist() for p in pieces] == [[4, 0], [3], [1], [2]]
    assert [p.tolist() for p in micro_batches(rows, lengths, 2, max_rows=2, max_tokens=100)] == [[4, 0], [3, 1], [2]]
    assert [p.tolist() for p in micro_batches(rows, lengths, 2, max_rows=2)] == [[4, 0], [3, 1], [2]]
    # a row that alone exceeds the budget goes alone; order and coverage are kept
    assert [p.tolist() for p in micro_batches(rows, lengths, 2, max_rows=8, max_tokens=4)] == [[4], [0], [3], [1], [2]]


def test_micro_batches_by_real_tokens_when_packed():
    rows = torch.tensor([4, 0, 3, 1, 2])
    lengths = torch.tensor([2, 10, 1, 6, 3])
    prompts = torch.tensor([1, 2, 2, 1, 2])  # real prompt tokens: rows 4, 0, 3, 1, 2 hold 4, 3, 8, 12, 3
    pieces = micro_batches(rows, lengths, 2, max_rows=8, max_tokens=16, prompt_lengths=prompts)
    # [4, 0, 3]: 4 + 3 + 8 = 15; + row 1 -> 27 > 16: cut. [1]: 12; + row 2 -> 15. (padded: 4 pieces)
    assert [p.tolist() for p in pieces] == [[4, 0, 3], [1, 2]]


# ---------------------------------------------------------------------------------------------
# packed forwards: the padded forward's log-probs, entropies, routes and gradients
# ---------------------------------------------------------------------------------------------
def _ragged_batch(model, seed=0):
    """A rollout batch with ragged prompts (left padding) and responses (right padding), and the
    routes of another model (so replayed routes differ from live ones)."""
    from stablerl.rollout.base import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    prompt_lens, resp_lens, P, R = [3, 7, 1, 5, 7], [6, 1, 4, 6, 2], 7, 6
    B = len(prompt_lens)
    ids = torch.zeros(B, P + R, dtype=torch.long)
    am = torch.zeros(B, P + R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        ids[i, P - p : P + r] = torch.randint(3, 60, (p + r,), generator=g)
        am[i, P - p : P + r] = 1
    rm = am[:, P:].bool()
    batch = RolloutBatch(
        input_ids=ids,
        attention_mask=am,
        prompt_width=P,
        response_mask=rm,
        rollout_logp=torch.zeros(B, R),
        finished=torch.ones(B, dtype=torch.bool),
        version=0,
    )
    if model.config.model_type != "qwen3":
        other = build_model(model.config, seed=99, dtype=torch.float32).eval()
        with torch.no_grad(), capture_routes(other) as cap:
            other(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am))
        batch.routes = cap.routes
    return batch


def test_pack_layout_hand_worked():
    from stablerl.rollout.base import RolloutBatch

    # prompt width 2, response width 3: row 0 = [pad, a | b, c, pad], row 1 = [d, e | f, pad, pad]
    am = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    batch = RolloutBatch(
        input_ids=torch.arange(10).view(2, 5) * am,
        attention_mask=am,
        prompt_width=2,
        response_mask=am[:, 2:].bool(),
        rollout_logp=torch.zeros(2, 3),
        finished=torch.ones(2, dtype=torch.bool),
        version=0,
    )
    layout = pack_layout(batch)
    assert layout.real.tolist() == [1, 2, 3, 5, 6, 7]
    assert layout.pack(batch.input_ids).tolist() == [[1, 2, 3, 5, 6, 7]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    # b and c are predicted from packed positions 0 and 1, f from 4 (e)
    assert layout.predicts.tolist() == [0, 1, 4]
    assert layout.unpack(layout.pack(batch.input_ids), -1).tolist() == [[-1, 1, 2, 3, -1], [5, 6, 7, -1, -1]]
    holey = RolloutBatch(
        input_ids=batch.input_ids,
        attention_mask=torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 0, 0]]),
        prompt_width=2,
        response_mask=torch.tensor([[True, False, True], [True, False, False]]),
        rollout_logp=torch.zeros(2, 3),
        finished=torch.ones(2, dtype=torch.bool),
        version=0,
    )
    with pytest.raises(ValueError, match="contiguous"):
        pack_layout(holey)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "qwen3"])
def test_packed_forward_equals_the_padded_forward(family):
    model = build_model(tiny_config(family, pad_token_id=0, eos_token_id=None), seed=3, dtype=torch.float32).eval()
    batch = _ragged_batch(model)
    moe = batch.routes is not None
    for replay in [None, batch.routes] if moe else [None]:
        padded = response_logp(model, batch, replay=replay, capture=moe, with_entropy=True)
        packed = response_logp(model, batch, replay=replay, capture=moe, with_entropy=True, packed=True)
        mask = batch.response_mask
        assert bool((packed["logp"][~mask] == 0).all()) and bool((packed["entropy"][~mask] == 0).all())
        torch.testing.assert_close(packed["logp"], padded["logp"], rtol=0, atol=2e-6)
        torch.testing.assert_close(packed["entropy"], padded["entropy"], rtol=0, atol=2e-6)
        if moe:  # the same experts at every real position, -1 at padding, in the padded layout
            assert torch.equal(packed["routes"], padded["routes"])
            if replay is not None:
                assert torch.equal(packed["routes"][batch.attention_mask.bool()], replay[batch.attention_mask.bool()])
        grads = []
        for out in (padded, packed):
            model.zero_grad(set_to_none=True)
            out = response_logp(model, batch, replay=replay, packed=out is packed)
            (out["logp"] * torch.linspace(0.5, 1.5, out["logp"].numel()).view_as(out["logp"])).sum().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        # the same terms summed in another order: they agree to round-off relative to the terms'
        # size, not to a sum that cancels to near zero (an embedding gradient of -0.0018 among
        # entries of 0.5 differs by 2e-6 on an AMD EPYC); a packing bug (a response attending to
        # another, wrong positions) moves gradients by O(1) of their scale
        for n in grads[0]:
            scale = float(grads[0][n].abs().max())
            torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=max(1e-6, 1e-5 * scale), msg=n)


def test_packed_forward_attends_over_each_sequence_alone(monkeypatch):
    """The packed forward's attention runs once per sequence and layer, over exactly that
    sequence's tokens (no T x T mask over the packed length); unpacked forwards are HF's sdpa."""
    from stablerl import forward as F

    model = build_model(tiny_config("qwen3_moe", pad_token_id=0, eos_token_id=None), seed=3, dtype=torch.float32).eval()
    batch = _ragged_batch(model)
    calls = []
    original = F.sdpa_attention_forward
    monkeypatch.setattr(
        F,
        "sdpa_attention_forward",
        lambda m, q, k, v, mask, *a, **kw: (
            calls.append((q.shape[2], mask is None)) or original(m, q, k, v, mask, *a, **kw)
        ),
    )
    with torch.no_grad():
        response_logp(model, batch, packed=True)
    lengths = batch.attention_mask.sum(-1).tolist()
    assert model.config._attn_implementation == F.PACKED_ATTENTION
    assert calls == [(n, True) for _ in range(model.config.num_hidden_layers) for n in lengths]
    calls.clear()
    with torch.no_grad():
        response_logp(model, batch)
    assert calls == [(batch.input_ids.shape[1], False)] * model.config.num_hidden_layers


def test_packing_confines_attention_to_each_response():
    """The negative control: the same packed tokens with positions that do not restart (HF then
    sees one sequence, attention crosses rows) give other log-probs — the equality above is not
    vacuous."""
    model = build_model(tiny_config("qwen3_moe", pad_token_id=0, eos_token_id=None), seed=3, dtype=torch.float32).eval()
    batch = _ragged_batch(model)
    layout = pack_layout(batch)
    with torch.no_grad():
        one = model(input_ids=layout.pack(batch.input_ids), position_ids=torch.arange(len(layout.real))[None]).logits
        packed = model(input_ids=layout.pack(batch.input_ids), position_ids=layout.position_ids).logits
    assert float((one[0, layout.predicts] - packed[0, layout.predicts]).abs().max()) > 1e-2


def test_packing_needs_a_token_budget():
    with pytest.raises(ValueError, match="batch.packing=true needs batch.max_tokens_per_micro_batch"):
        build_config(RunConfig, None, ["batch.packing=true"])
    assert build_config(RunConfig, None, ["batch.packing=true", "batch.max_tokens_per_micro_batch=512"]).batch.packing


# ---------------------------------------------------------------------------------------------
# end to end: the same run with every memory setting
# ---------------------------------------------------------------------------------------------
# a graded reward (the fraction of digits in the answer): groups differ, gradients are not zero
REWARD = str(Path(__file__).parent / "data" / "reward_fns.py") + ":digit_fraction"


def _run(sft_ckpt, run_dir, extra):
    from stablerl.loop import Trainer
    from stablerl.runlog import read_metrics

    common = [
        f"model.path={sft_ckpt}",
        f"run_dir={run_dir}",
        "batch.prompts_per_step=2",
        "batch.group_size=4",
        "rollout.max_new_tokens=12",
        "task.levels=[1]",
        "task.eval_size=4",
        "eval.every=5",
        "log.progress=false",
        "log.tensorboard=false",
        "train.steps=2",
        "batch.minibatches_per_step=2",
        "optim.lr=1e-3",
        f"task.reward_fns=[{REWARD}]",
        "task.reward_workers=1",
        "rollout.precision=fp32",
    ]
    cfg = build_config(RunConfig, None, [*common, *extra])
    Trainer(cfg, run_dir, log=lambda *_: None).run()
    return read_metrics(run_dir), checkpoint.load_model_weights(checkpoint.latest(run_dir))


COMPARED = (
    "loss",
    "grad_norm",
    "train_infer_kl",
    "staleness_kl",
    "is_weight_mean",
    "entropy",
    "reward_mean",
    "clip_frac_low",
    "clip_frac_high",
    "n_tokens_contrib",
    "route_agreement/train_infer",
    "route_agreement/stale",
)


@pytest.mark.parametrize("replay", ["R2", "R3"])
def test_memory_settings_never_change_the_run(sft_ckpt, tmp_path, replay):
    base_rows, base_w = _run(sft_ckpt, tmp_path / "base", [f"train.routing_replay={replay}"])
    assert all(r["grad_norm"] > 0 for r in base_rows[1:])
    for name, extra in (
        ("tokens", ["batch.max_tokens_per_micro_batch=40"]),
        ("ckpt", ["train.activation_checkpointing=true", "batch.micro_batch_size=3"]),
        # packed forwards of <= 40 real tokens (the no-grad pi_old pass is cut too), recomputed
        (
            "packed",
            ["batch.max_tokens_per_micro_batch=40", "batch.packing=true", "train.activation_checkpointing=true"],
        ),
    ):
        rows, weights = _run(sft_ckpt, tmp_path / name, [f"train.routing_replay={replay}", *extra])
        for a, b in zip(base_rows, rows):
            for k in COMPARED:
                if k in a:
                    assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (name, a["step"], k)
        for k in base_w:
            assert float((weights[k] - base_w[k]).norm()) <= 1e-5 * float(base_w[k].norm()), (name, k)


def test_token_budget_really_cuts_micro_batches(sft_ckpt, tmp_path, monkeypatch):
    from stablerl import learner

    seen = []
    original = learner.micro_batches
    monkeypatch.setattr(learner, "micro_batches", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    _run(sft_ckpt, tmp_path / "r", ["batch.max_tokens_per_micro_batch=40", "train.steps=1"])
    sizes = [len(p) for pieces in seen for p in pieces]
    assert max(sizes) < 4 <= sum(sizes)  # 4 rows per mini-batch, never all in one forward


# ---------------------------------------------------------------------------------------------
# train.dtype
# ---------------------------------------------------------------------------------------------
def test_bf16_training_keeps_fp32_master_weights_and_state(sft_ckpt, tmp_path):
    rows32, w32 = _run(sft_ckpt, tmp_path / "fp32", ["train.dtype=fp32"])
    rows16, w16 = _run(sft_ckpt, tmp_path / "bf16", ["train.dtype=bf16"])
    assert all(v.dtype == torch.float32 for v in w16.values()) and rows32[1]["grad_norm"] > 0
    # the same rollouts at step 1 (the same starting weights), a bf16 forward's log-probs differ
    # from fp32's by bf16 rounding: small, not zero
    assert rows16[1]["reward_mean"] == rows32[1]["reward_mean"]
    diff = abs(rows16[1]["train_infer_kl"] - rows32[1]["train_infer_kl"])
    assert 0 < diff < 0.05
    assert any(not torch.equal(w16[k], w32[k]) for k in w32)


def test_bf16_learner_computes_in_bf16_with_fp32_gradients(sft_ckpt):
    from stablerl.learner import Learner
    from stablerl.models import load_policy

    model, _ = load_policy(sft_ckpt)
    cfg = build_config(RunConfig, None, ["train.dtype=bf16"])
    learner = Learner(model, cfg)
    ids = torch.randint(1, 20, (2, 6))
    seen = []
    handle = learner.model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    from stablerl.rollout.base import RolloutBatch

    batch = RolloutBatch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        prompt_width=2,
        response_mask=torch.ones(2, 4, dtype=torch.bool),
        rollout_logp=torch.zeros(2, 4),
        finished=torch.ones(2, dtype=torch.bool),
        version=0,
    )
    out = learner._logp(learner.model, batch)
    handle.remove()
    out["logp"].sum().backward()
    assert seen == [torch.bfloat16] and out["logp"].dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in learner.model.parameters() if p.grad is not None)


def test_old_param_dtype_key_still_loads():
    assert build_config(RunConfig, None, ["distributed.param_dtype=bf16"]).train.dtype == "bf16"
    assert build_config(RunConfig, None, []).train.dtype == "auto"
    with pytest.raises(ValueError, match="set only train.dtype"):
        build_config(RunConfig, None, ["distributed.param_dtype=bf16", "train.dtype=fp32"])
