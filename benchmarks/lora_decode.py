"""Merged weights against a LoRA-aware forward for sampling: the decode time of HF ``generate``
with the adapters unmerged (peft's layers on every call) and with the merged weights, and the
time of one merge (what the local engine pays per sync instead).

    .venv/bin/python benchmarks/lora_decode.py [--shape deep] [--responses 16] [--new-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

from shapes import SHAPES  # benchmarks/shapes.py


def main() -> None:
    import torch

    from stablerl.config import LoraConfig
    from stablerl.lora import apply_lora, merged_weights
    from stablerl.models import build_model, build_tokenizer, default_model_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="deep")
    ap.add_argument("--responses", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tok = build_tokenizer()
    config = default_model_config(tok, **SHAPES[args.shape])
    config.eos_token_id = None  # every response runs to --new-tokens
    base = build_model(config, seed=0).eval()
    lora = apply_lora(copy.deepcopy(base), LoraConfig(enabled=True), seed=0).eval()
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    merged = copy.deepcopy(base)
    ids = torch.randint(4, config.vocab_size, (args.responses, 16), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    times = {"lora_aware": [], "merged": [], "merge": []}
    with torch.no_grad():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            merged.load_state_dict(dict(merged_weights(lora, lora.state_dict().items())))
            times["merge"].append(time.perf_counter() - t0)
            for name, model in (("lora_aware", lora), ("merged", merged)):
                t0 = time.perf_counter()
                model.generate(ids, **kwargs)
                times[name].append(time.perf_counter() - t0)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["lora_aware_over_merged_plus_merge"] = out["lora_aware"] / (out["merged"] + out["merge"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
