"""``torch.compile`` of the training forward + backward, measured against eager.

    .venv/bin/python benchmarks/compile_train.py [--repeats 7] [--dynamic]

The default tiny Qwen3-MoE (stablerl's experts kernel) at the TRL benchmark's update shape: 64
sequences x 56 tokens, all real, one forward + backward of ``logsumexp(logits).mean()``. Eager
and ``torch.compile(model)`` alternate after a warm-up; the compiled model's first call (its
compile time) is reported apart. A fixed shape is the best case for compiling: a real update's
micro-batches change shape with the responses' lengths every step (``--dynamic`` compiles with
symbolic shapes instead, as that would need). Logits and gradients are compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dynamic", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from stablerl.models import build_model, build_tokenizer, default_model_config

    model = build_model(default_model_config(build_tokenizer()), seed=0)
    compiled = torch.compile(model, dynamic=args.dynamic)
    ids = torch.randint(5, 90, (64, 56), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def step(m) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        t = time.perf_counter()
        logits = m(input_ids=ids, attention_mask=mask).logits
        logits.logsumexp(-1).mean().backward()
        return time.perf_counter() - t, logits.detach(), [p.grad.clone() for p in model.parameters()]

    step(model)
    try:
        first, _, _ = step(compiled)
    except Exception as e:  # noqa: BLE001 - report why the compiler refused, as the measurement
        lines = [ln.strip() for ln in f"{e}\n{e.__cause__ or ''}".splitlines() if ln.strip()]
        cause = next((ln for ln in lines if "Expected" in ln), next((ln for ln in lines if "Error:" in ln), ""))
        print(json.dumps({"setup": vars(args), "compiled": False, "error": f"{type(e).__name__}: {cause[:300]}"},
                         indent=2))
        return
    times = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        times["eager"].append(step(model)[0])
        times["compiled"].append(step(compiled)[0])
    _, logits_e, grads_e = step(model)
    _, logits_c, grads_c = step(compiled)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"setup": vars(args) | {"torch_threads": torch.get_num_threads()},
                      "median_s": med, "first_compiled_call_s": first,
                      "speedup": med["eager"] / med["compiled"],
                      "max_logit_diff": float((logits_e - logits_c).abs().max()),
                      "max_grad_diff": max(float((a - b).abs().max()) for a, b in zip(grads_e, grads_c))}, indent=2))


if __name__ == "__main__":
    main()
