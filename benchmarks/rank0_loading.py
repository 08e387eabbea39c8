"""Peak memory per rank when K learner ranks load a model: only rank 0 reads the checkpoint
(stablerl's way, ``distributed.fsdp.shard_from_rank0``) against every rank reading it.

    .venv/bin/python benchmarks/rank0_loading.py [--ranks 2] [--hidden 1024] [--layers 4]

Builds a Qwen3-MoE of ~220M parameters at random init (hidden 1024, 4 layers, 32 experts of
width 512, top-4), saves it as an HF checkpoint, then runs ``torchrun --nproc_per_node=K`` twice:

- ``rank0``: rank 0 ``load_policy(path)``; the others ``load_policy(path, weights=False)`` (a
  meta-device skeleton); then ``shard_from_rank0`` (FSDP2 shards, each rank's shards scattered
  from rank 0 one tensor at a time);
- ``every``: every rank ``load_policy(path)``, then ``shard_model`` (each keeps its own shards).

Each rank reports its peak RSS (``ru_maxrss``) after loading and after sharding, and a checksum
of its shards (the two modes must hold the same shards).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def child(args) -> None:
    import torch
    import torch.distributed as dist

    from stablerl.distributed.fsdp import shard_from_rank0, shard_model
    from stablerl.models import load_policy

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731 (MiB)
    start = peak()
    holds = args.mode == "every" or rank == 0
    model, _ = load_policy(args.path, weights=holds)
    loaded = peak()
    if args.mode == "every":
        model = shard_model(model, "fp32", "fp32")
    else:
        model = shard_from_rank0(model, "fp32", "fp32", torch.device("cpu"))
    sharded = peak()
    local = sum(float(p.to_local().double().sum()) for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    row = {
        "rank": rank,
        "mode": args.mode,
        "start_mib": start,
        "after_load_mib": loaded,
        "after_shard_mib": sharded,
        "params": params,
        "shard_checksum": local,
    }
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if rank == 0:
        print("RESULT " + json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default="runs/bench/rank0_loading.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="rank0", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    from stablerl.checkpoint import save_model_dir
    from stablerl.models import build_model, build_tokenizer, default_model_config

    results = {}
    with tempfile.TemporaryDirectory(prefix="stablerl-rank0-") as tmp:
        tok = build_tokenizer()
        model = build_model(
            default_model_config(
                tok,
                hidden_size=args.hidden,
                expert_size=args.hidden // 2,
                num_layers=args.layers,
                num_experts=32,
                top_k=4,
            ),
            seed=0,
        )
        params = sum(p.numel() for p in model.parameters())
        path = save_model_dir(Path(tmp) / "ckpt", model, tok)
        del model
        print(f"model: {params / 1e6:.0f}M parameters, {params * 4 / 2**20:.0f} MiB in fp32", flush=True)
        for mode in ("rank0", "every"):
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={args.ranks}",
                __file__,
                "--child",
                "--mode",
                mode,
                "--path",
                str(path),
            ]
            out = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900
            )
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
            results[mode] = json.loads(line[len("RESULT ") :])
            for r in results[mode]:
                print(
                    f"{mode:5}  rank {r['rank']}: start {r['start_mib']:6.0f} MiB, "
                    f"after load {r['after_load_mib']:6.0f}, "
                    f"after sharding {r['after_shard_mib']:6.0f} (peak RSS); shard checksum {r['shard_checksum']:.6e}",
                    flush=True,
                )
    same = all(
        abs(a["shard_checksum"] - b["shard_checksum"]) <= 1e-9 * max(1.0, abs(a["shard_checksum"]))
        for a, b in zip(results["rank0"], results["every"])
    )
    print(f"the same shards in both modes: {same}")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(
        json.dumps({"params": params, "ranks": args.ranks, "results": results, "same_shards": same}, indent=1)
    )


if __name__ == "__main__":
    main()
