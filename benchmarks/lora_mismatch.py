"""The training-inference mismatch LoRA adds: the bf16 local engine samples with the merged
weights, the trainer computes the base plus unmerged fp32 adapters.

    .venv/bin/python benchmarks/lora_mismatch.py --base MODEL_DIR --adapter RUN_DIR/export/step_N

Samples 64 responses to built-in arithmetic prompts with the bf16 local engine loaded with the
merged weights, then the k3 estimate of KL(mu || pi) (the ``train_infer_kl`` diagnostic) of four
trainers at the same weights: LoRA in fp32 (fp32 base, unmerged adapters) and a plain model holding
the merged weights in fp32 (what a full fine-tune at these weights computes); the same two with
``train.dtype=bf16`` (LoRA: the base stored in bf16 with fp32 adapters, under autocast; plain: fp32
master weights under autocast).
"""

from __future__ import annotations

import argparse
import copy
import json


def main() -> None:
    import torch
    from peft import PeftModel

    from stablerl.config import SamplingConfig
    from stablerl.diagnostics import k3
    from stablerl.forward import response_logp
    from stablerl.generation import encode_prompt
    from stablerl.lora import merged_weights
    from stablerl.models import load_model, load_policy
    from stablerl.rollout import LocalEngine
    from stablerl.tasks import ArithmeticTask

    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--responses", type=int, default=64)
    args = ap.parse_args()
    base, tok = load_policy(args.base)
    lora = PeftModel.from_pretrained(copy.deepcopy(base), args.adapter).get_base_model().eval()
    merged = dict(merged_weights(lora, lora.state_dict().items()))
    plain = load_model(args.base).eval()
    plain.load_state_dict(merged)
    engine = LocalEngine(plain, "bf16", eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    task = ArithmeticTask(levels=[1, 2])
    prompts = [encode_prompt(tok, task.train_problem(i).prompt) for i in range(args.responses)]
    batch = engine.generate(prompts, SamplingConfig(max_new_tokens=40), seeds=list(range(args.responses)))
    lora_bf16 = copy.deepcopy(lora)
    for n, p in lora_bf16.named_parameters():  # the base in bf16, the adapters fp32 (as model.lora)
        if ".lora_" not in n:
            p.data = p.data.to(torch.bfloat16)
    out = {}
    for name, model, bf16 in (
        ("lora_fp32", lora, False),
        ("plain_fp32", plain, False),
        ("lora_bf16_base", lora_bf16, True),
        ("plain_bf16_autocast", plain, True),
    ):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
        with torch.no_grad(), ctx:
            logp = response_logp(model, batch)["logp"]
        d = (logp - batch.rollout_logp)[batch.response_mask]
        out[name] = float(k3(d).mean())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
