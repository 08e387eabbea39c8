"""``torch.compile`` of the local engine's decode step, measured against the eager decoder.

    .venv/bin/python benchmarks/compile_decode.py --region forward     # the whole decoder forward
    .venv/bin/python benchmarks/compile_decode.py --region attention   # each layer's attention only

The tiny Qwen3-MoE of benchmarks/rollout_throughput.py (batch 64, 24-token prompts, 32 new
tokens, no EOS, fp32, routes captured). The eager engine is timed first (``--repeats`` runs after a
warm-up), then the decoder's ``--region`` is wrapped in ``torch.compile(dynamic=True)`` (the cache
length grows every step) and timed the same way; the first compiled run's time is the compile
time. Sampled tokens must be identical and log-probs within round-off; both are reported.

The forward has a data-dependent shape inside (the experts' capacity, the busiest expert's load,
``stablerl.moe.grouped_experts``), so dynamo breaks the graph there; the attention writes the
preallocated KV cache in place, an input mutation the compiled graph must replay.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from shapes import decode_model  # benchmarks/shapes.py

from stablerl.config import SamplingConfig
from stablerl.rollout import LocalEngine, decoders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--region", default="forward", choices=["forward", "attention"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = decode_model(None)
    engine = LocalEngine(model, "fp32", eos_token_id=[], pad_token_id=0)
    prompts = torch.randint(2, model.config.vocab_size, (64, 24), generator=torch.Generator().manual_seed(0)).tolist()
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=32)

    def run():
        t = time.perf_counter()
        out = engine.generate(prompts, sampling, seeds=list(range(len(prompts))))
        return time.perf_counter() - t, out

    run()  # warm-up
    eager = [run()[0] for _ in range(args.repeats)]
    _, reference = run()
    name = "_forward" if args.region == "forward" else "_attention"
    setattr(
        decoders.FastQwen3MoeDecoder, name, torch.compile(getattr(decoders.FastQwen3MoeDecoder, name), dynamic=True)
    )
    first, _ = run()
    compiled = [run()[0] for _ in range(args.repeats)]
    _, out = run()
    med = {"eager": statistics.median(eager), "compiled": statistics.median(compiled)}
    print(
        json.dumps(
            {
                "setup": vars(args) | {"torch_threads": torch.get_num_threads()},
                "median_s": med,
                "first_compiled_run_s": first,
                "speedup": med["eager"] / med["compiled"],
                "tokens_identical": bool(torch.equal(reference.input_ids, out.input_ids)),
                "max_logp_diff": float((reference.rollout_logp - out.rollout_logp).abs().max()),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
