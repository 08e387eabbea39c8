"""LoRA (``model.lora``) against full fine-tuning: trainable parameters, optimizer state, peak
memory, the time of a training step, and the bytes of a weight sync.

    .venv/bin/python benchmarks/lora.py [--shapes deep m200] [--responses 8] [--response-len 64]

Each (shape, setting) runs in a fresh process (peak RSS is a process-lifetime maximum): build the
model (``deep``: examples/deep_moe; ``m200``: a ~200M-parameter random MoE), the learner (LoRA with
its defaults: rank 16 on the attention projections and every expert), a batch of random tokens,
then 3 training steps (forward, backward, AdamW), whose median time is reported. Then one weight
sync into a bf16 local engine: the merged weights streamed from the learner (what the local
engine loads) and, for LoRA, the adapters alone (what an adapter-only sync moves).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from shapes import SHAPES  # benchmarks/shapes.py

EXTRA = {"m200": {"hidden_size": 512, "num_layers": 8, "num_experts": 32, "top_k": 4, "expert_size": 512}}


def child(args) -> dict:
    import torch

    from stablerl.config import RunConfig
    from stablerl.config_io import build_config
    from stablerl.learner import Learner
    from stablerl.models import build_model, build_tokenizer, default_model_config
    from stablerl.rollout import LocalEngine
    from stablerl.rollout.base import RolloutBatch

    torch.manual_seed(0)
    tok = build_tokenizer()
    shape = {**SHAPES, **EXTRA}[args.shape]
    model = build_model(default_model_config(tok, **shape), seed=0)
    total = sum(p.numel() for p in model.parameters())
    cfg = build_config(RunConfig, None, [f"model.lora.enabled={str(args.lora).lower()}"])
    learner = Learner(model, cfg)
    B, P, R = args.responses, 16, args.response_len
    ids = torch.randint(4, model.config.vocab_size, (B, P + R), generator=torch.Generator().manual_seed(1))
    batch = RolloutBatch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        prompt_width=P,
        response_mask=torch.ones(B, R, dtype=torch.bool),
        rollout_logp=torch.zeros(B, R),
        finished=torch.ones(B, dtype=torch.bool),
        version=0,
    )
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        learner.optimizer.zero_grad(set_to_none=True)
        learner._logp(learner.model, batch)["logp"].sum().backward()
        learner.optimizer.step()
        times.append(time.perf_counter() - t0)
    state = sum(t.numel() * t.element_size() for s in learner.optimizer.state.values() for t in s.values())
    engine = LocalEngine(build_model(model.config), "bf16", eos_token_id=tok.eos_token_id)
    sent, own = [], engine.model.state_dict()

    def counted(stream):  # bytes as the engine stores them (bf16)
        for name, t in stream:
            sent.append(t.numel() * own[name].element_size() if name in own else 0)
            yield name, t

    t0 = time.perf_counter()
    engine.load_weights(counted(learner.full_weights()), version=1)
    sync_s = time.perf_counter() - t0
    sent = sum(sent)
    adapters = sum(p.numel() * p.element_size() for p in learner.model.parameters() if p.requires_grad)
    return {
        "shape": args.shape,
        "setting": "lora" if args.lora else "full",
        "params": total,
        "trainable": sum(p.numel() for p in learner.model.parameters() if p.requires_grad),
        "optimizer_state_mib": state / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": statistics.median(times),
        "sync_merged_mib": sent / 2**20,
        "sync_s": sync_s,
        "adapter_mib": adapters / 2**20 if args.lora else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["deep", "m200"])
    ap.add_argument("--responses", type=int, default=8)
    ap.add_argument("--response-len", type=int, default=64)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.shape:
        print(json.dumps(child(args)))
        return
    rows = []
    for shape in args.shapes:
        for lora in (False, True):
            cmd = [sys.executable, __file__, "--shape", shape, "--responses", str(args.responses)]
            cmd += ["--response-len", str(args.response_len)] + (["--lora"] if lora else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
