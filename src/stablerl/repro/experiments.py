"""The paper's experiments in miniature (docs/formulation.md s.7), as its text describes them.

Every experiment is a base config plus named variants; every run uses the default tiny MoE and
its cold start, fp32 training, and (unless the experiment varies it) emulated FP8 W8A8 inference,
the paper's large-discrepancy setting.

The design follows the paper:

- **The mini-batch is fixed** (the paper: 64 prompts x 16 responses; here 8 prompts x 16) and the
  rollout batch of a step is N mini-batches, one optimizer step each: N = 1 is on-policy, N > 1
  adds staleness while every optimizer step sees the same amount of data. Every run makes the
  same number of optimizer steps (``OPT_STEPS``), so a run at N = 8 samples 1/8 as many rollout
  batches, each 8 times as large: the same data and the same number of updates for every N.
- MiniRL with the paper's hyper-parameters: eps_low 0.2, eps_high 0.27, token-level IS truncated
  at 5, group-mean advantages without std division, 16 responses per prompt.
- GRPO and CISPO as the paper's appendix defines them: std-normalized advantages, their own length
  normalization (GRPO: per response; CISPO: per token of the batch), no training-inference IS.

Learning rate and steps are calibrated once per experiment, never per variant (docs/notebook/first-set.md
"Calibration"): the stress learning rate ``STRESS_LR`` is the largest of a grid at which the
paper's recommended recipe for the experiment stays stable over ``OPT_STEPS`` on a calibration
seed outside the reported ones, so that what separates the variants is the practice they drop.
"""

from __future__ import annotations

MINI_PROMPTS, GROUP = 8, 16  # one mini-batch: 8 prompts x 16 responses = 128 responses
OPT_STEPS = 160  # optimizer steps per run, for every N (divisible by 1, 2, 4, 8)
EVAL_OPT_STEPS = 20  # evaluate every this many optimizer steps
STRESS_LR = 2e-4  # calibrated once for all experiments (docs/notebook/first-set.md)

# dose-response: the inference engine's discrepancy, from none to beyond FP8 W8A8 (a fixed
# perturbation of the engine's weights on top of it, rollout.weight_noise)
DOSE_LEVELS: dict[str, list[str]] = {
    "fp32": ["rollout.precision=fp32"],
    "bf16": ["rollout.precision=bf16"],
    "fp8": ["rollout.precision=fp8"],
    "w8a8": ["rollout.precision=fp8_w8a8"],
    "w8a8_noise20": ["rollout.precision=fp8_w8a8", "rollout.weight_noise=0.2"],
    "w8a8_noise40": ["rollout.precision=fp8_w8a8", "rollout.weight_noise=0.4"],
}
DOSE_N = 4  # the off-policy ablations of the dose-response run at this N

# the experiments below were run before optim.skip_empty_steps existed: they step on every
# mini-batch, so that their committed records (docs/results/) stay reproducible
STEP_ALWAYS = ["optim.skip_empty_steps=false"]

COMMON = [
    *STEP_ALWAYS,
    "rollout.precision=fp8_w8a8",
    f"batch.group_size={GROUP}",
    "log.progress=false",
    "task.eval_size=200",
    "eval.samples=2",
    "eval.greedy=false",
    "checkpoint.keep_last=1",
    f"optim.lr={STRESS_LR}",
]

NO_IS = ["loss.is_mode=none"]
LEN_NORM = ["loss.aggregation=seq_mean_token_mean"]
R2, R3 = ["train.routing_replay=R2"], ["train.routing_replay=R3"]
NO_CLIP = ["loss.clip=false"]
GRPO = ["loss.algorithm=grpo", "loss.std_normalize=true", "loss.aggregation=seq_mean_token_mean", *NO_IS]
CISPO = ["loss.algorithm=cispo", "loss.std_normalize=true", "loss.aggregation=token_mean", *NO_IS]


def schedule(n: int, opt_steps: int = OPT_STEPS, eval_opt_steps: int = EVAL_OPT_STEPS) -> list[str]:
    """N mini-batches of the fixed size per rollout batch; the same optimizer steps for every N."""
    steps = opt_steps // n
    every = max(1, eval_opt_steps // n)
    return [
        f"batch.prompts_per_step={n * MINI_PROMPTS}",
        f"batch.minibatches_per_step={n}",
        f"train.steps={steps}",
        f"eval.every={every}",
        f"checkpoint.every={every}",
    ]


def _off_policy_variants() -> dict[str, list[str]]:
    out = {}
    for n in (2, 4, 8):
        s = schedule(n)
        out[f"n{n}_noclip_noreplay"] = s + NO_CLIP
        out[f"n{n}_noclip_r2"] = s + NO_CLIP + R2
        out[f"n{n}_clip_r2"] = s + R2
        out[f"n{n}_clip_r3"] = s + R3
    return out


def _dose_variants() -> dict[str, list[str]]:
    out = {}
    for level, engine in DOSE_LEVELS.items():
        on, off = schedule(1), schedule(DOSE_N)
        out[f"{level}/on_minirl"] = engine + on
        out[f"{level}/on_no_is"] = engine + on + NO_IS
        out[f"{level}/on_r3"] = engine + on + R3
        out[f"{level}/off_noreplay"] = engine + off
        out[f"{level}/off_r2"] = engine + off + R2
        out[f"{level}/off_r3"] = engine + off + R3
    return out


_OFF = _off_policy_variants()
_DOSE = _dose_variants()

# staleness from lag (docs/notebook/staleness.md): the default run (`stablerl train` with no
# overrides) at a fixed lag eta, with the decoupled correction (pi_old recomputed) and with bypass
# (pi_old := mu). Only the evaluation is thinned (every 100 steps instead of 50; evaluation uses
# its own seeds and never changes training).
STALENESS_ETAS = (0, 1, 2, 4)
_STALE = {
    f"eta{eta}{suffix}": [f"rollout.max_staleness={eta}", f"loss.proximal={proximal}"]
    for eta in STALENESS_ETAS
    for suffix, proximal in (("", "recompute"), ("_bypass", "rollout"))
}

# the calibration grid and the recipes that must stay stable at the chosen learning rate
CALIBRATION_LRS = (5e-5, 1e-4, 2e-4, 4e-4)
_CAL = {
    f"lr{lr:g}/{name}": [f"optim.lr={lr}"] + v
    for lr in CALIBRATION_LRS
    for name, v in (("on_minirl", schedule(1)), ("off8_r3", schedule(8) + R3))
}

# ---------------------------------------------------------------------------------------------
# The next set (docs/notebook/preregistration.md): the long-reasoning task, the numerics ladder up to NVFP4.
# Its reading was fixed before any of its runs; the constants below were set by its calibration
# (section 2 there; docs/notebook/long-reasoning.md) before any reported run.
# ---------------------------------------------------------------------------------------------
LONG_TASK = [
    "task.style=noisy_columns",
    "task.levels=[2]",
    "task.max_operand=999999999",
    "rollout.max_new_tokens=112",
    "sft.steps=1500",
]
LONG_OPT_STEPS = 100  # optimizer steps per run, for every N
LONG_EVAL_OPT_STEPS = 20  # held-out evaluation (500 problems x 4 samples) every this many
LONG_LR = 2e-4  # long-calibration (docs/notebook/long-reasoning.md): no collapse on either seed
LADDER: dict[str, list[str]] = {  # the dose, in decreasing order: what the budget cuts is the low end
    rung: [f"rollout.precision={rung}"] for rung in ("nvfp4_w4a4", "nvfp4", "fp8_w8a8", "fp8", "bf16", "fp32")
}
# everything but the task: the same for both lengths (experiment 2 changes only the task)
LONG_RUN = [
    *STEP_ALWAYS,
    f"batch.group_size={GROUP}",
    "log.progress=false",
    "task.eval_size=500",
    "eval.samples=4",
    "eval.greedy=false",
    "checkpoint.keep_last=1",
    "batch.max_tokens_per_micro_batch=4096",
    "batch.packing=true",
    "rollout.precision=fp8_w8a8",
]
LONG_COMMON = [*LONG_TASK, *LONG_RUN]
LONG_CALIBRATION_LRS = (5e-5, 1e-4, 2e-4)


def long_schedule(n: int) -> list[str]:
    return schedule(n, opt_steps=LONG_OPT_STEPS, eval_opt_steps=LONG_EVAL_OPT_STEPS)


_LONG_CAL = {f"lr{lr:g}": [f"optim.lr={lr}"] + long_schedule(1) for lr in LONG_CALIBRATION_LRS}
_LONG_DOSE = {
    f"{rung}/{name}": engine + variant
    for rung, engine in LADDER.items()
    for name, variant in (
        ("on_minirl", long_schedule(1)),
        ("on_no_is", long_schedule(1) + NO_IS),
        ("on_r3", long_schedule(1) + R3),
        ("off_noreplay", long_schedule(DOSE_N)),
        ("off_r2", long_schedule(DOSE_N) + R2),
        ("off_r3", long_schedule(DOSE_N) + R3),
    )
}

# experiments 3 and 4 of the set run at the rung where experiment 1 finds IS starting to matter,
# which is not known before it: every rung is a row, and `--variants` picks the rung's.
OFF_NS = (2, 4, 8)
LAG_ETAS = (1, 2, 4)
_OFF_FOUR = {"noclip_noreplay": NO_CLIP, "noclip_r2": NO_CLIP + R2, "clip_r2": R2, "clip_r3": R3}
_LONG_OFF = {
    f"{rung}/n{n}/{name}": engine + long_schedule(n) + v
    for rung, engine in LADDER.items()
    for n in OFF_NS
    for name, v in _OFF_FOUR.items()
}
# the lag: on-policy mini-batches sampled eta versions back; the decoupled correction (pi_old
# recomputed) for the four variants, the bypass (pi_old := mu) beside the two it allows (R2
# replays the recomputed pi_old's routes, which the bypass skips: rejected by the config)
_LONG_LAG = {
    f"{rung}/eta{eta}/{name}{suffix}": engine
    + long_schedule(1)
    + [f"rollout.max_staleness={eta}", f"loss.proximal={proximal}"]
    + v
    for rung, engine in LADDER.items()
    for eta in LAG_ETAS
    for name, v in _OFF_FOUR.items()
    for suffix, proximal in (("", "recompute"), ("_bypass", "rollout"))
    if not (proximal == "rollout" and "r2" in name)
}

# experiment 2, the sequence length (docs/notebook/preregistration.md Amendment 8): the on-policy pair
# (MiniRL, no IS) down the same ladder at twice the length. Three 18-digit numbers instead of three
# 9-digit ones: the same column step (three digits and a carry), twice as many of them, ~200-token
# solutions. Its own cold start with the same SFT budget; the learning rate, run length, batch and
# evaluation are the ~100-token set's, so the length is the one thing that changes. The SFT budget
# follows the amendment's rule: 1500 steps gave sampled accuracy 0.214 < 0.3, so 3000 steps, whatever
# they give (docs/notebook/long-length.md). A 58-token prompt and 224 new tokens overflow the default
# model's 256-token context, so the model declares 512 (Amendment 10: rotary positions have no weights,
# and the cold start trained at 512 equals the one trained at 256 weight for weight).
LONG2_TASK = [
    "task.style=noisy_columns",
    "task.levels=[2]",
    f"task.max_operand={10**18 - 1}",
    "rollout.max_new_tokens=224",
    "sft.steps=3000",
    "model.max_positions=512",
]
LONG2_COMMON = [*LONG2_TASK, *LONG_RUN]
_LONG_LENGTH = {
    f"{rung}/{name}": engine + variant
    for rung, engine in LADDER.items()
    for name, variant in (("on_minirl", long_schedule(1)), ("on_no_is", long_schedule(1) + NO_IS))
}

# Why IS lost at 4 bits (docs/notebook/signal-preregistration.md, its reading committed before any run).
# A, the mechanism at nvfp4 and ~215 tokens: on-policy MiniRL vs no IS, at the long set's rate
# stepping on every mini-batch (the long-length runs' own configuration: seeds 0-2 repeat them), and
# at the next rate down of the long calibration grid with optim.skip_empty_steps.
SIGNAL_LOW_LR = 1e-4
_SIGNAL_ARMS = {
    "lr2e-4": [f"optim.lr={LONG_LR}"],
    "lr1e-4_skip": [f"optim.lr={SIGNAL_LOW_LR}", "optim.skip_empty_steps=true"],
}
_ON_PAIR = (("on_minirl", []), ("on_no_is", NO_IS))
_SIGNAL_MECHANISM = {f"{arm}/{name}": v + alg for arm, v in _SIGNAL_ARMS.items() for name, alg in _ON_PAIR}
# B, a mismatch the learner cannot learn around: an fp32 engine whose only mismatch is weight noise
# of a paper-like dose (k1 ~ 1e-3 per token on the ~100-token cold start: the size below, checked with
# benchmarks/dose_axis.py --weight-noise before any run), a fixed pattern vs one re-drawn at every
# weight sync; MiniRL vs no IS. Steps without signal take no optimizer step (the default), so
# what A may find about them cannot decide B.
SIGNAL_NOISE = 0.05
_SIGNAL_NOISE = {
    f"{kind}/{name}": [f"rollout.weight_noise_redraw={'true' if kind == 'redrawn' else 'false'}"] + alg
    for kind in ("fixed", "redrawn")
    for name, alg in _ON_PAIR
}

EXPERIMENTS: dict[str, dict] = {
    "calibration": {
        "title": "Calibration: the recommended recipes (on-policy MiniRL; N = 8 MiniRL + R3) over learning rates",
        "base": COMMON,
        "variants": _CAL,
        "rows": {f"lr {lr:g}": [v for v in _CAL if v.startswith(f"lr{lr:g}/")] for lr in CALIBRATION_LRS},
        "seed_offset": 100,  # calibration seeds are never reported seeds
        "in_all": False,
    },
    "on-policy": {
        "title": "On-policy (N = 1): MiniRL, + length normalization, without IS, each with and without R3; "
        "GRPO and CISPO",
        "base": COMMON + schedule(1),
        "variants": {
            "minirl": [],
            "minirl_r3": R3,
            "minirl_lennorm": LEN_NORM,
            "minirl_lennorm_r3": LEN_NORM + R3,
            "minirl_no_is": NO_IS,
            "minirl_no_is_r3": NO_IS + R3,
            "grpo": GRPO,
            "cispo": CISPO,
        },
    },
    "off-policy": {
        "title": "Off-policy, fixed mini-batch: N = 2, 4, 8; clipping x routing replay",
        "base": COMMON,
        "variants": _OFF,
        "rows": {f"N = {n}": [v for v in _OFF if v.startswith(f"n{n}_")] for n in (2, 4, 8)},
    },
    "cold-start": {
        "title": "Cold start: three teacher styles, then the paper's recipe (N = 2, MiniRL + R2)",
        "base": COMMON + schedule(2, opt_steps=2 * OPT_STEPS) + R2,
        "variants": {
            "teacher_steps": ["task.style=steps"],
            "teacher_direct": ["task.style=direct"],
            "teacher_noisy": ["task.style=noisy"],
        },
    },
    "staleness": {
        "title": "Staleness from lag: the default run at eta = 0, 1, 2, 4; "
        "decoupled (recompute pi_old) vs bypass (pi_old = mu)",
        "base": [*STEP_ALWAYS, "log.progress=false", "checkpoint.keep_last=1", "eval.every=100"],
        "variants": _STALE,
        "reference": "eta0",  # paired per-seed differences against the synchronous run (report paired.md)
        "rows": {
            f"eta = {eta}": [v for v in _STALE if v in (f"eta{eta}", f"eta{eta}_bypass")] for eta in STALENESS_ETAS
        },
        "in_all": False,
    },
    "dose-response": {
        "title": f"Dose-response: engine discrepancy vs on-policy IS / R3 and off-policy (N = {DOSE_N}) replay",
        "base": COMMON,
        "variants": _DOSE,
        "rows": {level: [v for v in _DOSE if v.startswith(f"{level}/")] for level in DOSE_LEVELS},
    },
    "long-calibration": {
        "title": "The next set's learning rate: on-policy MiniRL, fp8_w8a8 engine, long-reasoning task",
        "base": LONG_COMMON,
        "variants": _LONG_CAL,
        "seed_offset": 100,
        "in_all": False,
        "preregistered": True,  # readings.md: C1 decides (the run is its own reference)
    },
    "long-dose": {
        "title": f"The next set, experiment 1: the numerics ladder vs on-policy IS / R3 and N = {DOSE_N} replay",
        "base": [*LONG_COMMON, f"optim.lr={LONG_LR}"],
        "variants": _LONG_DOSE,
        # the pre-registered readings, within each rung: IS (no IS vs MiniRL), R3 on-policy, and
        # replay at N = 4 (R2, R3 vs no replay)
        "reference": {
            "on_no_is": "on_minirl",
            "on_r3": "on_minirl",
            "off_r2": "off_noreplay",
            "off_r3": "off_noreplay",
        },
        "rows": {rung: [v for v in _LONG_DOSE if v.startswith(f"{rung}/")] for rung in LADDER},
        "in_all": False,
        # readings.md: C3 compares each run's entropy with the same seed and rung's on-policy MiniRL
        "preregistered": True,
        "c3_reference": "on_minirl",
    },
    "long-length": {
        "title": "The next set, experiment 2: the numerics ladder vs on-policy IS at twice the length (~200 tokens)",
        "base": [*LONG2_COMMON, f"optim.lr={LONG_LR}"],
        "variants": _LONG_LENGTH,
        "reference": {"on_no_is": "on_minirl"},
        "rows": {rung: [v for v in _LONG_LENGTH if v.startswith(f"{rung}/")] for rung in LADDER},
        "in_all": False,
        "preregistered": True,
        "c3_reference": "on_minirl",
    },
    "long-offpolicy": {
        "title": "The next set, experiment 3: off-policy by mini-batches (N = 2, 4, 8), at one rung",
        "base": [*LONG_COMMON, f"optim.lr={LONG_LR}"],
        "variants": _LONG_OFF,
        "reference": {name: "noclip_noreplay" for name in _OFF_FOUR if name != "noclip_noreplay"},
        "rows": {
            f"{rung} N={n}": [v for v in _LONG_OFF if v.startswith(f"{rung}/n{n}/")] for rung in LADDER for n in OFF_NS
        },
        "in_all": False,
        # C3's reference is experiment 1's run (same seed and rung, on-policy MiniRL)
        "preregistered": True,
        "c3_reference": "on_minirl",
        "c3_from": "long-dose",
    },
    "signal-mechanism": {
        "title": "Why IS lost at 4 bits, A: nvfp4 at ~215 tokens, MiniRL vs no IS, at lr 2e-4 stepping on every "
        "mini-batch and at lr 1e-4 skipping steps without signal",
        "base": [*LONG2_COMMON, "rollout.precision=nvfp4", *long_schedule(1)],
        "variants": _SIGNAL_MECHANISM,
        "reference": {"on_no_is": "on_minirl"},
        "rows": {arm: [v for v in _SIGNAL_MECHANISM if v.startswith(f"{arm}/")] for arm in _SIGNAL_ARMS},
        "in_all": False,
        "preregistered": True,
        "c3_reference": "on_minirl",
    },
    "signal-noise": {
        "title": "Why IS lost at 4 bits, B: fixed vs re-drawn weight noise (fp32 engine, ~100 tokens), MiniRL vs no IS",
        "base": [
            *LONG_COMMON,
            f"optim.lr={LONG_LR}",
            "optim.skip_empty_steps=true",
            "rollout.precision=fp32",
            f"rollout.weight_noise={SIGNAL_NOISE}",
            *long_schedule(1),
        ],
        "variants": _SIGNAL_NOISE,
        "reference": {"on_no_is": "on_minirl"},
        "rows": {kind: [v for v in _SIGNAL_NOISE if v.startswith(f"{kind}/")] for kind in ("fixed", "redrawn")},
        "in_all": False,
        "preregistered": True,
        "c3_reference": "on_minirl",
    },
    "long-lag": {
        "title": "The next set, experiment 4: off-policy by lag (eta = 1, 2, 4), decoupled and bypass, at one rung",
        "base": [*LONG_COMMON, f"optim.lr={LONG_LR}"],
        "variants": _LONG_LAG,
        "reference": {name: "noclip_noreplay" for name in [*_OFF_FOUR, "clip_r3_bypass"] if name != "noclip_noreplay"}
        | {"noclip_noreplay_bypass": "noclip_noreplay"},
        # Amendment 6's second comparison of the bypass: against its decoupled twin
        "also_compare": {"clip_r3_bypass": "clip_r3"},
        "rows": {
            f"{rung} eta={eta}": [v for v in _LONG_LAG if v.startswith(f"{rung}/eta{eta}/")]
            for rung in LADDER
            for eta in LAG_ETAS
        },
        "in_all": False,
        "preregistered": True,
        "c3_reference": "on_minirl",
        "c3_from": "long-dose",
    },
}


def reference_of(variant: str, reference: str | dict[str, str]) -> str | None:
    """The variant ``variant`` is compared with: ``reference`` itself (one reference for all), or,
    given a mapping of variant names within a row (``"rung/name"``), the same row's
    ``reference[name]`` (None: not compared)."""
    if isinstance(reference, str):
        return None if variant == reference else reference
    row, _, name = variant.rpartition("/")
    if name not in reference:
        return None
    return f"{row}/{reference[name]}" if row else reference[name]
