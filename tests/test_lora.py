"""LoRA through peft (model.lora): exactness at initialisation, gradients against a hand-written
LoRA and finite differences, a frozen base, merged-weight syncs, checkpoints and exports."""

import copy
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from stablerl import checkpoint
from stablerl.config import LoraConfig, RunConfig
from stablerl.config_io import build_config
from stablerl.loop import Trainer
from stablerl.lora import apply_lora, merged_weights
from stablerl.models import FAMILIES, build_model, tiny_config
from stablerl.runlog import read_metrics

REWARD = str(Path(__file__).parent / "data" / "reward_fns.py") + ":digit_fraction"
TIMING = ("time", "per_s")


def lora_model(family="qwen3_moe", dtype=torch.float32, **settings):
    base = build_model(tiny_config(family, hidden_size=32, num_layers=2, num_experts=4, expert_size=16), dtype=dtype)
    if dtype == torch.float64 and family != "qwen3":
        base.config._experts_implementation = "eager"  # HF's loop over experts: grouped_mm has no float64
    model = apply_lora(copy.deepcopy(base), LoraConfig(enabled=True, rank=2, alpha=4.0, **settings), seed=1)
    return base, model.to(dtype)


@pytest.mark.parametrize("family", FAMILIES)
def test_at_initialisation_the_lora_model_computes_the_base_model_exactly(family):
    base, model = lora_model(family)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids).logits, base(ids).logits)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    if family != "qwen3":  # a MoE: the packed experts are adapted too, the routers frozen
        assert any("experts" in n for n in trained) and not any(".gate." in n for n in trained)


def _randomize_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _hand_merged(base, named):
    """The base's parameters with each adapted weight replaced by W + s B A (``named``: the LoRA
    model's A and B by name), written out here layer by layer (expert e of a packed weight: rows
    e*r.. of A, columns e, e+E, .. of B)."""
    out = {}
    for name, W in base.named_parameters():
        out[name] = W
        module, _, pname = name.rpartition(".")
        if pname == "weight" and f"{module}.lora_A.default.weight" in named:
            A, B = named[f"{module}.lora_A.default.weight"], named[f"{module}.lora_B.default.weight"]
            out[name] = W + 2.0 * B @ A
        elif pname in ("gate_up_proj", "down_proj"):
            prefix = module + (".base_layer" if pname == "gate_up_proj" else "")
            A, B = named[f"{prefix}.lora_A.default.weight"], named[f"{prefix}.lora_B.default.weight"]
            E, r = W.shape[0], 2
            out[name] = W + 2.0 * torch.stack([B[:, e::E] @ A[e * r : (e + 1) * r] for e in range(E)])
    return out


def test_lora_gradients_equal_a_hand_written_lora_and_finite_differences():
    base, model = lora_model(dtype=torch.float64)
    _randomize_adapters(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    weights = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    loss_of = lambda logits: (torch.log_softmax(logits, -1) * weights).sum()  # noqa: E731
    loss = loss_of(model(ids).logits)
    loss.backward()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # the same loss through the hand-written LoRA: its gradients with respect to the same A, B
    hand = {n: p.detach().clone().requires_grad_(True) for n, p in lora.items()}
    hand_loss = loss_of(functional_call(base, _hand_merged(base, hand), (ids,)).logits)
    assert float(hand_loss) == pytest.approx(float(loss), rel=1e-12)
    grads = torch.autograd.grad(hand_loss, list(hand.values()))
    for (n, p), g in zip(lora.items(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12, msg=n)
    # central finite differences on a few entries of an attention and an expert adapter (HF's
    # RMSNorm computes in float32 even in a float64 model: h and the tolerance are sized for that)
    for n in (
        "model.layers.1.self_attn.q_proj.lora_A.default.weight",
        "model.layers.0.mlp.experts.lora_B.default.weight",
    ):
        p = lora[n]
        for idx in [(0, 0), (1, 3)]:
            h = 1e-3
            with torch.no_grad():
                p[idx] += h
                up = float(loss_of(model(ids).logits))
                p[idx] -= 2 * h
                down = float(loss_of(model(ids).logits))
                p[idx] += h
            assert float(p.grad[idx]) == pytest.approx((up - down) / (2 * h), rel=2e-3, abs=5e-4), (n, idx)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_merged_weights_compute_what_the_unmerged_adapters_do(family):
    base, model = lora_model(family)
    _randomize_adapters(model)
    merged = dict(merged_weights(model, model.state_dict().items()))
    assert merged.keys() == base.state_dict().keys()
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, model(ids).logits, atol=1e-3)  # the adapters matter
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_merged_weights_equal_peft_merge():
    base, model = lora_model()
    _randomize_adapters(model)
    merged = dict(merged_weights(model, model.state_dict().items()))
    peft_merged = copy.deepcopy(model)
    from peft.tuners.lora import LoraLayer

    for m in peft_merged.modules():
        if isinstance(m, LoraLayer):
            m.merge()
    for name, t in merged.items():  # peft's own merge, module by module
        src = name.replace("experts.", "experts.base_layer.base_layer.") if "experts." in name else name
        src = src if src in peft_merged.state_dict() else src.replace(".weight", ".base_layer.weight")
        torch.testing.assert_close(t, peft_merged.state_dict()[src], rtol=1e-6, atol=1e-6, msg=name)


def test_lora_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="target_modules"):
        lora_model("qwen3_moe", target_modules=["nope"], experts=False)
    with pytest.raises(ValueError, match="dropout"):
        lora_model("qwen3_moe", dropout=0.1)
    for engine in ("vllm", "vllm_server"):
        with pytest.raises(ValueError, match=f"rollout.engine={engine}: .*use rollout.engine=local"):
            RunConfig.model_validate({"model": {"lora": {"enabled": True}}, "rollout": {"engine": engine}})


# --------------------------------------------------------------------------------------------
def args(ckpt, run_dir, *extra):
    return [
        f"model.path={ckpt}",
        f"run_dir={run_dir}",
        "batch.prompts_per_step=2",
        "batch.group_size=4",
        "rollout.max_new_tokens=12",
        "rollout.precision=fp32",
        "task.levels=[1]",
        "task.eval_size=6",
        "eval.every=2",
        "eval.samples=2",
        "log.progress=false",
        "log.tensorboard=false",
        "train.steps=3",
        f"task.reward_fns=[{REWARD}]",
        "task.reward_workers=1",
        "optim.lr=1e-2",
        "model.lora.enabled=true",
        "model.lora.rank=4",
        *extra,
    ]


def trainer(ckpt, run_dir, *extra, resume=False):
    return Trainer(
        build_config(RunConfig, None, args(ckpt, run_dir, *extra)), run_dir, resume=resume, log=lambda *_: None
    )


def strip(rows):
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def test_a_lora_run_trains_adapters_only_and_syncs_merged_weights(sft_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    t = trainer(sft_ckpt, tmp_path / "r", "loss.kl_beta=0.1", "model.lora.export_merged=true")
    before = {n: p.detach().clone() for n, p in t.learner.model.named_parameters() if not p.requires_grad}
    t.run()
    model = t.learner.model
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in before.items())  # the base, bit for bit
    assert any(float(p.abs().max()) > 0 for n, p in after.items() if "lora_B" in n)  # the adapters moved
    rows = read_metrics(tmp_path / "r")
    assert rows[-1]["kl_ref"] > 0 if "kl_ref" in rows[-1] else True
    # the engine's weights are the merged ones: its log-probs of fixed tokens equal the trainer's
    ids = torch.randint(4, 90, (3, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(t.engine.model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    # the checkpoint holds the adapters only; the export is a peft adapter plus the merged model
    saved = checkpoint.load_model_weights(checkpoint.latest(tmp_path / "r"))
    assert saved and all(".lora_" in k for k in saved)
    export = tmp_path / "r" / "export" / "step_000003"
    merged = AutoModelForCausalLM.from_pretrained(export / "merged")
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_ckpt), export)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(adapted(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)
    # `stablerl export` rebuilds the same from the checkpoint (adapters + the base at model.path)
    from stablerl.cli import main

    assert main(["export", str(tmp_path / "r"), "--merged", "--out", str(tmp_path / "again")]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again" / "merged")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, merged(ids).logits, rtol=0, atol=0)


def test_a_resumed_lora_run_equals_the_uninterrupted_one_and_refuses_another_base(sft_ckpt, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    base = shutil.copytree(sft_ckpt, tmp_path / "base")
    trainer(base, tmp_path / "full", "train.steps=4").run()
    trainer(base, tmp_path / "cut", "train.steps=2").run()
    trainer(base, tmp_path / "cut", "train.steps=4", resume=True).run()
    assert strip(read_metrics(tmp_path / "cut")) == strip(read_metrics(tmp_path / "full"))
    wa = checkpoint.load_model_weights(checkpoint.latest(tmp_path / "full"))
    wb = checkpoint.load_model_weights(checkpoint.latest(tmp_path / "cut"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the base at model.path replaced by another model: the adapters are refused, naming both
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1.01)
    model.save_pretrained(base)
    with pytest.raises(ValueError, match="adapters for the base .*digest .*has digest"):
        trainer(base, tmp_path / "cut", "train.steps=5", resume=True)


@pytest.mark.slow
def test_a_two_rank_fsdp2_lora_run_equals_the_one_rank_run(sft_ckpt, tmp_path):
    from test_distributed import assert_metrics_close, assert_weights_close, base_args, one_rank, torchrun

    # FSDP2 with the frozen base sharded too, off-policy with R2, checkpointed layers, packed
    # micro-batches by tokens and the KL reference (the base, adapters off)
    mode = [
        "model.lora.enabled=true",
        "model.lora.rank=4",
        "optim.lr=1e-2",
        "batch.minibatches_per_step=2",
        "train.routing_replay=R2",
        "train.activation_checkpointing=true",
        "batch.max_tokens_per_micro_batch=40",
        "batch.packing=true",
        "loss.kl_beta=0.1",
    ]
    one_rank(sft_ckpt, tmp_path / "k1", *mode)
    rc, out = torchrun(base_args(sft_ckpt, tmp_path / "k2", *mode))
    assert rc == 0, out[-3000:]
    ma, mb = read_metrics(tmp_path / "k1"), read_metrics(tmp_path / "k2")
    assert_metrics_close(ma, mb)
    assert all(m["grad_norm"] > 0 for m in ma[1:])
    wa = checkpoint.load_model_weights(checkpoint.latest(tmp_path / "k1"))
    wb = checkpoint.load_model_weights(checkpoint.latest(tmp_path / "k2"))
    assert all(".lora_" in k for k in wa)
    assert_weights_close(wa, wb)


def test_train_router_trains_the_routers_whole_and_exports_them_beside_the_adapter(tmp_path):
    from safetensors.torch import load_file

    from stablerl.lora import save_adapter
    from stablerl.routing import moe_routers

    _, model = lora_model(train_router=True)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    routers = {n for n, p in model.named_parameters() if any(p is r.weight for r in moe_routers(model))}
    assert routers and routers <= trained
    save_adapter(tmp_path / "a", model, model.state_dict())
    assert set(load_file(tmp_path / "a" / "routers.safetensors")) == routers
    with pytest.raises(ValueError, match="no MoE routers"):
        lora_model("qwen3", train_router=True)
