"""The vLLM server engine against the in-process vLLM engine, on CPU: rollout tokens/s and weight
sync seconds per GB, the same model and prompts in one run (medians of --repeats).

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/vllm_server.py [--prompts 64] [--new-tokens 32]

The model is the tiny Qwen3-MoE of the vLLM tests, or wider and deeper (--hidden-size, --layers;
random weights, so responses run to --new-tokens); the
server is one started by stablerl (`rollout.engine=vllm_server`), weights over stablerl's gloo
transfer engine; the in-process engine reloads from the same state dict. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from stablerl.config import SamplingConfig, VllmConfig
from stablerl.models import build_model, build_tokenizer, default_model_config


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [[1] + torch.randint(5, 99, (8,), generator=g).tolist() for _ in range(n)]


def measure(engine, state, ps, sampling, repeats: int) -> dict:
    gen, sync = [], []
    for r in range(repeats):
        t = time.perf_counter()
        batch = engine.generate(ps, sampling, seeds=list(range(len(ps))), capture_routes=True)
        gen.append(int(batch.response_mask.sum()) / (time.perf_counter() - t))
        t = time.perf_counter()
        engine.load_weights(state, version=r + 1)
        sync.append(time.perf_counter() - t)
    gb = sum(t.numel() * t.element_size() for t in state.values()) / 1e9
    return {
        "tokens_per_s": statistics.median(gen),
        "sync_s": statistics.median(sync),
        "sync_s_per_gb": statistics.median(sync) / gb,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden-size", type=int, default=128, help="the model's width (heads of 32)")
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    from stablerl.rollout.vllm import VllmEngine
    from stablerl.rollout.vllm_server import VllmServerEngine

    tok = build_tokenizer()
    size = dict(hidden_size=args.hidden_size, num_layers=args.layers, expert_size=args.hidden_size // 2)
    model = build_model(default_model_config(tok, num_experts=8, top_k=2, **size))
    state = model.state_dict()
    cfg, ps = VllmConfig(kv_cache_gb=0.25), prompts(args.prompts)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    out = {
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "weights_mb": sum(t.numel() * 4 for t in state.values()) / 1e6,
    }
    local = VllmEngine(model, tok, "fp32", cfg=cfg, max_model_len=256, eos_token_id=[])
    server = VllmServerEngine(
        model, tok, "fp32", cfg=cfg, max_model_len=256, eos_token_id=[], log_dir=tempfile.mkdtemp()
    )
    try:
        for _ in range(2):  # alternate, so drift in the machine's load touches both
            for name, engine in (("in_process", local), ("server", server)):
                out.setdefault(name, []).append(measure(engine, state, ps, sampling, args.repeats))
    finally:
        server.close()
        local.close()
    for name in ("in_process", "server"):
        out[name] = {k: statistics.median(m[k] for m in out[name]) for k in out[name][0]}
    out["server_vs_in_process_tokens"] = out["server"]["tokens_per_s"] / out["in_process"]["tokens_per_s"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
