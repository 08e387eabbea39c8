"""The paper's experiments in miniature (docs/formulation.md s.7): each is a base config plus variants.

Every run uses emulated fp8 inference and fp32 training (the paper's large-discrepancy setting)
and the default tiny MoE, task and cold start unless a variant says otherwise. To make
instability show within minutes, every variant of an experiment gets the same raised learning
rate and step count (`STRESS`) — never tuned per variant.
"""

from __future__ import annotations

COMMON = ["rollout.precision=fp8", "log.progress=false", "eval.every=25", "task.eval_size=200", "eval.samples=2",
          "checkpoint.every=25", "checkpoint.keep_last=1"]
STRESS = ["train.steps=200", "optim.lr=1e-4"]
# the follow-ups where 200 steps could not tell: the same stress learning rate, 3x the steps
LONG = ["train.steps=600", "optim.lr=1e-4", "eval.every=50", "checkpoint.every=50"]


def _off_policy_variants() -> dict[str, list[str]]:
    variants = {}
    for n in (2, 4, 8):
        mb = [f"batch.minibatches_per_step={n}"]
        # without clipping, replay with the mode the paper found best at this N (R2 small, R3 large)
        best = "R2" if n == 2 else "R3"
        variants[f"n{n}_clip_r2"] = mb + ["train.routing_replay=R2"]
        variants[f"n{n}_clip_r3"] = mb + ["train.routing_replay=R3"]
        variants[f"n{n}_noclip_{best.lower()}"] = mb + [f"train.routing_replay={best}", "loss.clip=false"]
        variants[f"n{n}_clip_noreplay"] = mb + ["train.routing_replay=none"]
    return variants


_OFF_POLICY = _off_policy_variants()

EXPERIMENTS: dict[str, dict] = {
    "on-policy": {
        "title": "On-policy (N = 1): MiniRL and its ablations, GRPO and CISPO",
        "base": COMMON + STRESS,
        "variants": {
            "minirl": [],
            "minirl_no_is": ["loss.is_mode=none"],
            "minirl_length_norm": ["loss.aggregation=seq_mean_token_mean"],
            "minirl_r3": ["train.routing_replay=R3"],
            "grpo": ["loss.algorithm=grpo", "loss.aggregation=seq_mean_token_mean", "loss.std_normalize=true"],
            "cispo": ["loss.algorithm=cispo"],
        },
    },
    "off-policy": {
        "title": "Off-policy: N = 2, 4, 8 mini-batches per rollout batch, clipping x routing replay",
        "base": COMMON + STRESS,
        "variants": _OFF_POLICY,
        "rows": {f"N = {n}": [v for v in _OFF_POLICY if v.startswith(f"n{n}_")] for n in (2, 4, 8)},
    },
    "cold-start": {
        "title": "Cold start: three teacher styles, then the same stable RL recipe",
        "base": COMMON + STRESS,
        "variants": {
            "teacher_steps": ["task.style=steps"],
            "teacher_direct": ["task.style=direct"],
            "teacher_noisy": ["task.style=noisy"],
        },
    },
    "on-policy-long": {
        "title": "On-policy follow-up, 600 steps: MiniRL with and without the IS correction",
        "base": COMMON + LONG,
        "variants": {"minirl": [], "minirl_no_is": ["loss.is_mode=none"]},
    },
    "cold-start-long": {
        "title": "Cold-start follow-up, 600 steps: do the three starts converge?",
        "base": COMMON + LONG,
        "variants": {"teacher_steps": ["task.style=steps"], "teacher_direct": ["task.style=direct"],
                     "teacher_noisy": ["task.style=noisy"]},
    },
}
