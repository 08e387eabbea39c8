"""vLLM against stablerl's local engine, in one process, on the same model, prompts and sampling.

    .venv-vllm/bin/python benchmarks/vllm_engine.py          # after `bash scripts/setup_vllm.sh`
    .venv-vllm/bin/python benchmarks/vllm_engine.py --throughput-only --sft-steps 50 \
        --set model.hidden_size=512 --out runs/bench/vllm_engine_h512.json     # a larger model

1. Discrepancy: per-layer routing agreement and training-inference KL (k3 and k1, per sampled
   token) of each engine against the fp32 training model: vLLM fp32 and bf16 (real inference
   kernels) beside LocalEngine's emulated bf16, fp8 (weight-only) and fp8_w8a8. Is the emulation
   realistic?
2. Throughput: vLLM vs LocalEngine vs HF `generate`, same batch, lengths and sampling, routes
   captured by all three (HF through stablerl's capture hooks); alternating repeats, medians.

The model is the default tiny Qwen3-MoE widened to hidden 128 (head_dim 32: vLLM's CPU attention
needs one of its head sizes), cold-started by SFT on the arithmetic task so that its distribution
is as peaked as a trained policy's (cached under runs/sft/). `--set model.KEY=VALUE` sizes the
model otherwise (hidden size, layers, experts, expert width; 4 attention heads, so the head size is
hidden / 4 and must be one vLLM's CPU attention supports: 32, 64, 80, ..., 256). Throughput does not
depend on how well the model was trained (no EOS: every response is `--new-tokens` long), so larger
sizes can take a short cold start (`--sft-steps 50`) and `--throughput-only`. `--compile` also times
the local engine with `rollout.compile` (its first call, in the warm-up, compiles).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def cold_start(sft_steps: int, overrides: list[str]):
    from stablerl.config import RunConfig
    from stablerl.config_io import build_config
    from stablerl.models import load_policy
    from stablerl.sft import cold_start as sft
    from stablerl.tasks import build_task

    cfg = build_config(RunConfig, None, ["model.hidden_size=128", f"sft.steps={sft_steps}", *overrides])
    path = sft(cfg, build_task(cfg.task), log=lambda *_: None)
    return (*load_policy(path), build_task(cfg.task))


def discrepancy(engine, model, prompts, sampling) -> dict:
    from stablerl.diagnostics import route_agreement
    from stablerl.forward import response_logp

    batch = engine.generate(prompts, sampling, seeds=list(range(len(prompts))))
    with torch.no_grad():
        train = response_logp(model, batch, capture=True)
    m = batch.response_mask
    log_w = (train["logp"] - batch.rollout_logp)[m]
    per_layer = route_agreement(train["routes"], batch.routes)
    return {
        "kl_k3": float((log_w.exp() - 1 - log_w).mean()),
        "kl_k1": float((-log_w).mean()),
        "route_agreement": float(per_layer.mean()),
        "per_layer": [round(float(x), 4) for x in per_layer],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="model.KEY=VALUE",
        help="model size overrides (model.hidden_size, model.num_layers, model.num_experts, ...)",
    )
    ap.add_argument("--throughput-only", action="store_true", help="skip the discrepancy part")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time LocalEngine with rollout.compile (local_fp32_compiled, local_bf16_compiled)",
    )
    ap.add_argument("--out", default="runs/bench/vllm_engine.json")
    args = ap.parse_args()
    if any(not s.startswith("model.") for s in args.set):
        ap.error(f"--set takes model.KEY=VALUE overrides only, got {args.set}")

    from stablerl.config import SamplingConfig
    from stablerl.generation import encode_prompt
    from stablerl.rollout import LocalEngine
    from stablerl.rollout.vllm import VllmEngine
    from stablerl.routing import capture_routes

    model, tok, task = cold_start(args.sft_steps, args.set)
    prompts = [encode_prompt(tok, task.train_problem(i).prompt) for i in range(args.batch)]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters ({' '.join(args.set) or 'hidden 128'})")
    report: dict = {"setup": vars(args), "parameters": n_params, "discrepancy": {}, "throughput_tokens_per_s": {}}

    def engines_with(eos: list[int]) -> dict:
        local = dict(eos_token_id=eos, pad_token_id=tok.pad_token_id)
        return {
            "vllm_fp32": VllmEngine(model, tok, "fp32", max_model_len=256, eos_token_id=eos),
            "vllm_bf16": VllmEngine(model, tok, "bf16", max_model_len=256, eos_token_id=eos),
            "local_fp32": LocalEngine(model, "fp32", **local),
            "local_bf16": LocalEngine(model, "bf16", **local),
            "local_fp8": LocalEngine(model, "fp8", **local),
            "local_fp8_w8a8": LocalEngine(model, "fp8_w8a8", **local),
        }

    # discrepancy on responses as RL samples them: each ends at its EOS
    engines = {} if args.throughput_only else engines_with([tok.eos_token_id])
    for name, engine in engines.items():
        report["discrepancy"][name] = discrepancy(engine, model, prompts, sampling)
        print(
            f"{name:>15}: KL k3 {report['discrepancy'][name]['kl_k3']:.2e}  "
            f"k1 {report['discrepancy'][name]['kl_k1']:.2e}"
            f"  routing agreement {report['discrepancy'][name]['route_agreement']:.4f} per layer "
            f"{report['discrepancy'][name]['per_layer']}"
        )

    def hf_generate():
        pad = tok.pad_token_id
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        with torch.inference_mode(), capture_routes(model):  # routes captured, as by both engines
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                top_k=0,
                pad_token_id=pad,
            )

    for engine in engines.values():
        if hasattr(engine, "close"):
            engine.close()
    engines = engines_with([])  # throughput at fixed lengths: every response is max_new_tokens long

    def gen(name):
        return lambda: engines[name].generate(prompts, sampling, seeds=list(range(len(prompts))))

    timed = {
        "vllm_fp32": gen("vllm_fp32"),
        "local_fp32": gen("local_fp32"),
        "hf_generate_fp32": hf_generate,
        "vllm_bf16": gen("vllm_bf16"),
        "local_bf16": gen("local_bf16"),
    }
    if args.compile:  # their first calls (the warm-up below) compile
        for p in ("fp32", "bf16"):
            engines[f"local_{p}_compiled"] = LocalEngine(
                model, p, eos_token_id=[], pad_token_id=tok.pad_token_id, compile=True
            )
            timed[f"local_{p}_compiled"] = gen(f"local_{p}_compiled")
    times: dict[str, list[float]] = {k: [] for k in timed}
    for fn in timed.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in timed.items():  # alternating, so machine noise hits all alike
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.new_tokens
    for name, ts in times.items():
        report["throughput_tokens_per_s"][name] = tokens / statistics.median(ts)
        print(f"{name:>17}: {tokens / statistics.median(ts):8.0f} tokens/s (median of {len(ts)})")
    for engine in engines.values():
        if hasattr(engine, "close"):
            engine.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
