"""The training-side experts kernel (stablerl.moe) vs transformers' `grouped_mm`, and its parts.

On the default tiny Qwen3-MoE at the TRL benchmark's update shape (64 sequences x 56 tokens,
all real): median forward and backward time of one training forward + backward with each experts
implementation (alternating), the largest logit and gradient differences between them, the
share of `aten::_index_put_impl_` (advanced-indexing backward) in a profile of each, a
[7168, 96] row gather's forward + backward with advanced indexing vs `index_select`, and one
AdamW step, for-loop vs fused. Run on an idle machine: with other jobs on the 2 cores, OpenMP
kernels slow down several-fold and the figures mean nothing.

    .venv/bin/python benchmarks/experts_kernel.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from stablerl.models import build_model, build_tokenizer, default_model_config
    from stablerl.moe import NAME

    tok = build_tokenizer()
    model = build_model(default_model_config(tok), seed=0)
    ids = torch.randint(5, 90, (64, 56), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    impls = ["grouped_mm", NAME]
    times = {i: {"forward_ms": [], "backward_ms": []} for i in impls}
    outputs = {}
    for r in range(args.repeats + 1):
        for impl in impls:
            model.set_experts_implementation(impl)
            model.zero_grad()
            t0 = time.perf_counter()
            logits = model(input_ids=ids, attention_mask=mask).logits
            t1 = time.perf_counter()
            logits.logsumexp(-1).mean().backward()
            t2 = time.perf_counter()
            if r:  # the first round warms up
                times[impl]["forward_ms"].append(1e3 * (t1 - t0))
                times[impl]["backward_ms"].append(1e3 * (t2 - t1))
            outputs[impl] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
    index_put_share = {}
    for impl in impls:
        model.set_experts_implementation(impl)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                model(input_ids=ids, attention_mask=mask).logits.logsumexp(-1).mean().backward()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        index_put_share[impl] = sum(e.self_cpu_time_total for e in events if e.key == "aten::_index_put_impl_") / total

    x = torch.randn(3584, 96, requires_grad=True)
    idx = torch.randint(0, 3584, (7168,), generator=torch.Generator().manual_seed(1))
    g = torch.randn(7168, 96)
    gather = {
        "advanced_indexing_ms": timed(lambda: x[idx].backward(g), 4 * args.repeats),
        "index_select_ms": timed(lambda: x.index_select(0, idx).backward(g), 4 * args.repeats),
    }

    for p in model.parameters():
        p.grad = torch.randn_like(p)
    adamw = {}
    for name, kw in (("for_loop_ms", {}), ("fused_ms", {"fused": True})):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, **kw)
        adamw[name] = timed(opt.step, 4 * args.repeats)

    a, b = outputs["grouped_mm"], outputs[NAME]
    print(
        json.dumps(
            {
                "setup": {"repeats": args.repeats, "torch_threads": torch.get_num_threads(), "tokens": ids.numel()},
                "train_forward_backward": {
                    i: {k: statistics.median(v) for k, v in t.items()} for i, t in times.items()
                },
                "max_logit_diff": float((a[0] - b[0]).abs().max()),
                "max_grad_diff": max(float((u - v).abs().max()) for u, v in zip(a[1], b[1])),
                "index_put_share_of_profile": index_put_share,
                "row_gather_forward_backward": gather,
                "adamw_step": adamw,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
