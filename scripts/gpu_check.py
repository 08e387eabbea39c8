"""The GPU paths CPU tests cannot reach, one check per call (scripts/gpu_check.sh runs each in its
own process, with a timeout, and prints the table). Each check prints one ``RESULT`` line with
its figures and exits 0 on pass; an exception or a failed condition is a fail. Nothing is
downloaded: the model is the default tiny Qwen3-MoE, built from its config.

    python scripts/gpu_check.py <check> <work dir>
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def tiny(seed: int = 0):
    from stablerl.models import build_model, build_tokenizer, default_model_config

    tok = build_tokenizer()
    cfg = default_model_config(tok, hidden_size=128, num_layers=2, num_experts=8, top_k=2, expert_size=64)
    return build_model(cfg, seed=seed).eval(), tok


def prompts(n: int = 16):
    g = torch.Generator().manual_seed(0)
    return [
        [1] + torch.randint(5, 99, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def fp32_logp(model, batch, sampling):
    """log pi (fp32, on the GPU) of the sampled tokens under the processed distribution."""
    from stablerl.rollout.sampling import filter_logits

    P, R = batch.prompt_width, batch.response_ids.shape[1]
    model = model.cuda().float()
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids.cuda(),
            attention_mask=batch.attention_mask.cuda(),
            position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0).cuda(),
        ).logits[:, P - 1 : P + R - 1]
    B, T, V = logits.shape
    lp = filter_logits(logits.reshape(B * T, V), sampling).view(B, T, V).log_softmax(-1)
    lp = lp.gather(-1, batch.response_ids.cuda()[..., None]).squeeze(-1).cpu()
    return torch.where(batch.response_mask, lp, torch.zeros_like(lp))


def max_diff(model, batch, sampling) -> float:
    return float((fp32_logp(model, batch, sampling) - batch.rollout_logp)[batch.response_mask].abs().max())


def replay_agreement(model, batch) -> float:
    from stablerl.diagnostics import route_agreement
    from stablerl.forward import response_logp

    model = model.cuda().float()
    on_gpu = dataclasses.replace(batch, input_ids=batch.input_ids.cuda(), attention_mask=batch.attention_mask.cuda())
    with torch.no_grad():
        live = response_logp(model, on_gpu, capture=True)
    return float(route_agreement(live["routes"].cpu(), batch.routes).mean())


# --------------------------------------------------------------------------------------------
def check_nccl(work: Path) -> str:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    x = torch.ones(1 << 20, device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    ok = bool((x == 1).all())
    dist.destroy_process_group()
    assert ok, "all_reduce over one rank changed the tensor"
    return f"all_reduce 4 MiB ok, NCCL {torch.cuda.nccl.version()}"


def check_fsdp2_bf16(work: Path) -> str:
    """One FSDP2 bf16 training step (one rank) against the same step unsharded under autocast."""
    import torch.distributed as dist

    from stablerl.distributed.fsdp import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    ids = torch.randint(5, 99, (4, 32), device="cuda")

    def step(model, autocast: bool) -> tuple[float, float]:
        """The loss before and after one AdamW step."""
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            after = model(input_ids=ids, labels=ids).loss
        return float(loss), float(after)

    fsdp = step(shard_model(tiny()[0].cuda().train(), param_dtype="bf16"), autocast=False)
    ref = step(tiny()[0].cuda().train(), autocast=True)
    dist.destroy_process_group()
    for a, b in zip(fsdp, ref):
        assert abs(a - b) < 2e-2 * abs(b), (fsdp, ref)
    assert fsdp[1] < fsdp[0], fsdp
    return f"loss before/after the step: FSDP2 bf16 {fsdp[0]:.4f}/{fsdp[1]:.4f}, autocast {ref[0]:.4f}/{ref[1]:.4f}"


def check_vllm_inprocess_r3(work: Path) -> str:
    from stablerl.config import SamplingConfig, VllmConfig
    from stablerl.rollout.vllm import VllmEngine

    model, tok = tiny()
    engine = VllmEngine(
        model,
        tok,
        "fp32",
        cfg=VllmConfig(gpu_memory_utilization=0.3, sleep_level=0),
        max_model_len=256,
        eos_token_id=[],
    )
    sampling = SamplingConfig(max_new_tokens=32)
    t = time.perf_counter()
    batch = engine.generate(prompts(), sampling, seeds=list(range(16)))
    tok_s = int(batch.response_mask.sum()) / (time.perf_counter() - t)
    d, agree = max_diff(model, batch, sampling), replay_agreement(model, batch)
    engine.close()
    assert batch.routes is not None and d < 1e-3 and agree > 0.99, (d, agree)
    return f"fp32 |dlogp| {d:.1e}, route agreement {agree:.4f}, {tok_s:.0f} tok/s"


def check_vllm_server_r3(work: Path) -> str:
    """A server with routes from vLLM's routed_experts, weights over vLLM's NCCL transfer when a
    second GPU holds the server (NCCL refuses two ranks of one communicator on one device), else
    over stablerl's gloo transfer into a server on this GPU."""
    from stablerl.config import SamplingConfig, VllmConfig
    from stablerl.rollout.vllm_server import VllmServerEngine

    model, tok = tiny()
    transfer, gpu = ("nccl", 1) if torch.cuda.device_count() >= 2 else ("gloo", 0)
    cfg = VllmConfig(gpu_memory_utilization=0.25, server_gpus=[gpu], weight_transfer=transfer, enforce_eager=True)
    torch.cuda.set_device(0)
    engine = VllmServerEngine(
        model, tok, "fp32", cfg=cfg, max_model_len=256, eos_token_id=[], log_dir=work / "server", timeout_s=120
    )
    try:
        trained, _ = tiny(seed=123)
        state = trained.state_dict()
        gb = sum(t.numel() * 4 for t in state.values()) / 1e9
        t = time.perf_counter()
        engine.load_weights(state, version=1)
        sync_s = time.perf_counter() - t
        sampling = SamplingConfig(max_new_tokens=32)
        batch = engine.generate(prompts(), sampling, seeds=list(range(16)))
        d, agree = max_diff(trained, batch, sampling), replay_agreement(trained, batch)
    finally:
        engine.close()
    assert d < 1e-3 and agree > 0.99, (d, agree)
    return (
        f"after {transfer} sync |dlogp| {d:.1e}, route agreement {agree:.4f}, sync {sync_s:.2f} s ({gb * 1e3:.1f} MB)"
    )


def check_fp8_rollouts(work: Path) -> str:
    from stablerl.config import SamplingConfig, VllmConfig
    from stablerl.rollout.vllm import VllmEngine

    model, tok = tiny()
    engine = VllmEngine(
        model, tok, "fp8", cfg=VllmConfig(gpu_memory_utilization=0.3, sleep_level=0), max_model_len=256, eos_token_id=[]
    )
    sampling = SamplingConfig(max_new_tokens=32)
    batch = engine.generate(prompts(), sampling, seeds=list(range(16)))
    engine.close()
    d = fp32_logp(model, batch, sampling) - batch.rollout_logp
    kl = float((d.exp() - 1 - d)[batch.response_mask].mean())  # k3 of mu against pi
    assert 0 < kl < 0.1, kl
    return f"KL(mu_fp8 || pi_fp32) k3 {kl:.2e}"


def check_sleep_wake(work: Path) -> str:
    from stablerl.config import SamplingConfig, VllmConfig
    from stablerl.rollout.vllm import VllmEngine

    model, tok = tiny()
    out = []
    for level in (1, 2):
        engine = VllmEngine(
            model,
            tok,
            "fp32",
            cfg=VllmConfig(gpu_memory_utilization=0.3, sleep_level=level),
            max_model_len=256,
            eos_token_id=[],
        )
        sampling = SamplingConfig(max_new_tokens=16)
        engine.generate(prompts(), sampling, seeds=list(range(16)))  # ends asleep
        asleep_free = torch.cuda.mem_get_info()[0]
        engine.load_weights(model.state_dict(), version=1)  # wakes
        awake_free = torch.cuda.mem_get_info()[0]
        batch = engine.generate(prompts(), sampling, seeds=list(range(16)))
        d = max_diff(model, batch, sampling)
        engine.close()
        freed = (asleep_free - awake_free) / 2**30
        assert freed > 0.5 and d < 1e-3, (level, freed, d)
        out.append(f"level {level}: {freed:.1f} GiB freed, |dlogp| {d:.0e}")
    return "; ".join(out)


def check_train_compile(work: Path) -> str:
    import subprocess

    from stablerl.checkpoint import save_model_dir

    model, tok = tiny()
    ckpt = save_model_dir(work / "model", model, tok)
    args = [
        "train.steps=2",
        "batch.prompts_per_step=2",
        "batch.group_size=4",
        "rollout.max_new_tokens=12",
        "task.levels=[1]",
        "task.eval_size=4",
        "eval.every=0",
        "log.progress=false",
        "log.tensorboard=false",
    ]
    rows = {}
    for compile_ in ("false", "true"):
        run = work / f"compile_{compile_}"
        t = time.perf_counter()
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "stablerl",
                "train",
                f"model.path={ckpt}",
                f"run_dir={run}",
                f"train.compile={compile_}",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        from stablerl.runlog import read_metrics

        rows[compile_] = (read_metrics(run)[-1]["grad_norm"], time.perf_counter() - t)
    (g0, t0), (g1, t1) = rows["false"], rows["true"]
    assert abs(g1 - g0) < 1e-2 * abs(g0), (g0, g1)
    return f"grad_norm compiled {g1:.4f} vs eager {g0:.4f}; run {t1:.0f} s vs {t0:.0f} s"


def _free_port() -> int:
    from stablerl.rollout.server_process import free_port

    return free_port()


CHECKS = {name.removeprefix("check_"): f for name, f in list(globals().items()) if name.startswith("check_")}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in CHECKS:
        sys.exit(f"usage: python scripts/gpu_check.py <{'|'.join(CHECKS)}> <work dir>")
    if not torch.cuda.is_available():
        sys.exit("RESULT no CUDA GPU visible")
    work = Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    print(f"RESULT {CHECKS[sys.argv[1]](work)}", flush=True)
