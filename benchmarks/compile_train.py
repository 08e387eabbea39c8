"""``torch.compile`` of the training forward + backward, measured against eager.

    .venv/bin/python benchmarks/compile_train.py [--repeats 7] [--dynamic] [--traced-grouped-mm]
                                                 [--region model|layers|parts]

The default tiny Qwen3-MoE (stablerl's experts kernel) at the TRL benchmark's update shape: 64
sequences x 56 tokens, all real, one forward + backward of ``logsumexp(logits).mean()``. Eager
and ``torch.compile(model)`` alternate after a warm-up; the compiled model's first call (its
compile time) is reported apart. A fixed shape is the best case for compiling: a real update's
micro-batches change shape with the responses' lengths every step (``--dynamic`` compiles with
symbolic shapes instead, as that would need; it then also times new sequence lengths, each
one's first call apart). Logits and gradients are compared.

Under the compiler the experts' grouped matmuls run as ``stablerl.moe.grouped_mm_op``, a custom op
with its own fake kernel and backward. ``--traced-grouped-mm`` lets the compiler trace
``torch._grouped_mm`` instead, as it did before that op existed: it fails at the first MoE layer
(dynamo's fake-tensor kernel accepts only bf16 inputs, though the CPU kernel runs fp32).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch


def traced_grouped_mm() -> None:
    """Undo ``stablerl.moe``'s opaque op: the compiler traces ``torch._grouped_mm`` itself."""
    import torch.nn.functional as F

    import stablerl.moe

    stablerl.moe._grouped_mm = lambda x, w, offs: F.grouped_mm(x, w, offs=offs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dynamic", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument(
        "--region",
        choices=["model", "layers", "parts"],
        default="model",
        help="what is compiled: the whole model; each decoder layer; or what train.compile compiles, "
        "each layer's attention, experts and norms (routers stay eager; always dynamic shapes)",
    )
    ap.add_argument(
        "--traced-grouped-mm",
        action="store_true",
        help="let the compiler trace torch._grouped_mm (as before stablerl.moe.grouped_mm_op): it refuses",
    )
    ap.add_argument(
        "--new-lengths",
        type=int,
        nargs="*",
        default=[40, 72],
        help="with --dynamic: further sequence lengths to time (each one's first call apart)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.traced_grouped_mm:
        traced_grouped_mm()

    from stablerl.forward import compile_router_free_parts
    from stablerl.models import build_model, build_tokenizer, default_model_config

    model = build_model(default_model_config(build_tokenizer()), seed=0)
    if args.region == "model":
        compiled = torch.compile(model, dynamic=args.dynamic)
    else:  # a copy whose submodules are compiled in place (the state dict keys stay as they are)
        compiled = copy.deepcopy(model)
        if args.region == "parts":  # what train.compile compiles (always with dynamic shapes)
            compile_router_free_parts(compiled)
        else:
            for layer in compiled.model.layers:
                layer.compile(dynamic=args.dynamic)
    ids = torch.randint(5, 90, (64, 56), generator=torch.Generator().manual_seed(0))

    def step(m, ids=ids) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
        m.zero_grad()
        t = time.perf_counter()
        logits = m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        logits.logsumexp(-1).mean().backward()
        return time.perf_counter() - t, logits.detach(), [p.grad.clone() for p in m.parameters()]

    step(model)
    try:
        first, _, _ = step(compiled)
    except Exception as e:  # noqa: BLE001 - report why the compiler refused, as the measurement
        lines = [ln.strip() for ln in f"{e}\n{e.__cause__ or ''}".splitlines() if ln.strip()]
        cause = next((ln for ln in lines if "Expected" in ln), next((ln for ln in lines if "Error:" in ln), ""))
        print(
            json.dumps(
                {"setup": vars(args), "compiled": False, "error": f"{type(e).__name__}: {cause[:300]}"}, indent=2
            )
        )
        return
    times = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        times["eager"].append(step(model)[0])
        times["compiled"].append(step(compiled)[0])
    _, logits_e, grads_e = step(model)
    _, logits_c, grads_c = step(compiled)
    med = {k: statistics.median(v) for k, v in times.items()}
    new_lengths = {}
    for length in args.new_lengths if args.dynamic else []:
        other = torch.randint(5, 90, (64, length), generator=torch.Generator().manual_seed(length))
        first_new = step(compiled, other)[0]
        e = statistics.median(step(model, other)[0] for _ in range(3))
        c = statistics.median(step(compiled, other)[0] for _ in range(3))
        new_lengths[length] = {"first_call_s": first_new, "eager_s": e, "compiled_s": c, "speedup": e / c}
    print(
        json.dumps(
            {
                "setup": vars(args) | {"torch_threads": torch.get_num_threads()},
                "median_s": med,
                "first_compiled_call_s": first,
                "speedup": med["eager"] / med["compiled"],
                "max_logit_diff": float((logits_e - logits_c).abs().max()),
                "max_grad_diff": max(float((a - b).abs().max()) for a, b in zip(grads_e, grads_c)),
                "new_lengths": new_lengths,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
