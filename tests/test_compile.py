"""train.compile: the training forward's router-free parts compiled, with the same results.

Routing replay and route capture hook into the routers for one forward at a time, so the routers
stay eager; these tests prove replay still holds inside a compiled model (the compiled gradients
equal eager ones with the same replayed routes, and differ from live routing's), and that a whole
run with train.compile equals the eager run up to float round-off."""

from contextlib import nullcontext

import pytest
import torch

from stablerl.forward import compile_router_free_parts
from stablerl.models import build_model, position_ids_from_mask, tiny_config
from stablerl.routing import moe_routers, replay_routes
from test_memory import COMPARED, _run


def test_compiled_parts_are_everything_but_the_routers_and_what_holds_them():
    moe = build_model(tiny_config("qwen3_moe", num_layers=2), seed=0)
    names = compile_router_free_parts(moe)
    assert names == [f"layers.{i}.{part}" for i in range(2)
                     for part in ("self_attn", "mlp.experts", "input_layernorm", "post_attention_layernorm")]
    dense = build_model(tiny_config("qwen3", num_layers=2), seed=0)
    assert "layers.0.mlp" in compile_router_free_parts(dense)


def _logits_and_grads(model, ids, routes):
    model.zero_grad(set_to_none=True)
    mask = torch.ones_like(ids)
    with replay_routes(model, routes) if routes is not None else nullcontext():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    torch.log_softmax(logits, -1).gather(-1, ids[..., None]).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_replay_holds_in_a_compiled_model(family):
    torch._dynamo.reset()
    eager = build_model(tiny_config(family, num_layers=2, pad_token_id=0), seed=1)
    compiled = build_model(tiny_config(family, num_layers=2, pad_token_id=0), seed=1)
    compile_router_free_parts(compiled)
    ids = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    top_k, layers = 2, len(moe_routers(eager))
    # routes no live router would pick here: each position's experts drawn at random
    routes = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(s))[:top_k]
                          for s in range(3 * 9 * layers)]).view(3, 9, layers, top_k)
    for replayed in (routes, None):
        le, ge = _logits_and_grads(eager, ids, replayed)
        lc, gc = _logits_and_grads(compiled, ids, replayed)
        assert float((le - lc).abs().max()) < 1e-5
        for n in ge:
            assert torch.allclose(gc[n], ge[n], rtol=1e-4, atol=1e-6), (replayed is None, n)
    live, _ = _logits_and_grads(eager, ids, None)
    assert float((live - _logits_and_grads(compiled, ids, routes)[0]).abs().max()) > 1e-2  # replay was not vacuous
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the compiler really ran


def test_a_compiled_run_equals_the_eager_run(sft_ckpt, tmp_path):
    """R3 at N = 2 (replayed routes in every gradient forward, live ones recorded in the
    diagnostic pass), eager vs compiled with packing and activation checkpointing on: the packed
    attention's per-sequence loop breaks the compiled graph, the recompute runs compiled parts."""
    torch._dynamo.reset()
    base_rows, base_w = _run(sft_ckpt, tmp_path / "eager", ["train.routing_replay=R3"])
    rows, weights = _run(sft_ckpt, tmp_path / "compiled", [
        "train.routing_replay=R3", "train.compile=true", "batch.max_tokens_per_micro_batch=40", "batch.packing=true",
        "train.activation_checkpointing=true"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert all(r["grad_norm"] > 0 for r in base_rows[1:])
    for a, b in zip(base_rows, rows):
        for k in COMPARED:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["step"], k)
    for k in base_w:
        assert float((weights[k] - base_w[k]).norm()) <= 1e-5 * float(base_w[k].norm()), k


def test_compile_without_a_cxx_compiler_is_a_clear_error_before_any_work(sft_ckpt, tmp_path, monkeypatch):
    from torch._inductor import cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    from stablerl.config import RunConfig
    from stablerl.config_io import build_config
    from stablerl.loop import Trainer

    def no_compiler():
        raise InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    cfg = build_config(RunConfig, None, [f"model.path={sft_ckpt}", f"run_dir={tmp_path / 'run'}", "train.compile=true",
                                         "log.progress=false", "log.tensorboard=false"])
    with pytest.raises(ValueError, match=r"train.compile=true needs a C\+\+ compiler .* set train.compile=false"):
        Trainer(cfg, tmp_path / "run", log=lambda *_: None).run()
    assert not (tmp_path / "run" / "checkpoints").exists()
