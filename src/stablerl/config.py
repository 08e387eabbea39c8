"""Validated configuration models: the one place where every config key is defined and documented.

A bad value fails at construction with a message naming the key and what is allowed
(`pydantic.ValidationError` is a `ValueError`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stablerl.config_data import (
    DEFAULT_CONTEXT,
    ColumnsConfig,
    LoraConfig,
    ModelConfig,
    SFTConfig,
    TaskConfig,
)
from stablerl.config_objective import (
    AGGREGATIONS,
    ALGORITHMS,
    IS_MODES,
    PRECISIONS,
    Aggregation,
    Algorithm,
    ISMode,
    LabConfig,
    LossConfig,
    Precision,
    SamplingConfig,
    StrictModel,
)
from stablerl.config_rollout import RolloutConfig, VllmConfig
from stablerl.replay import RoutingPlan

__all__ = [
    "AGGREGATIONS",
    "ALGORITHMS",
    "Aggregation",
    "Algorithm",
    "BatchConfig",
    "CheckpointConfig",
    "ColumnsConfig",
    "DEFAULT_CONTEXT",
    "DistributedConfig",
    "EvalConfig",
    "EvalSetConfig",
    "ISMode",
    "IS_MODES",
    "LabConfig",
    "LogConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PRECISIONS",
    "Precision",
    "RESUMABLE_KEYS",
    "RolloutConfig",
    "RunConfig",
    "SFTConfig",
    "SamplingConfig",
    "StrictModel",
    "TaskConfig",
    "TrainConfig",
    "VllmConfig",
]


class TrainConfig(StrictModel):
    """The RL run: how long, its seed, and how the training forward routes MoE tokens."""

    steps: int = Field(600, ge=1, description="RL steps (one rollout batch each).")
    seed: int = Field(0, description="Seed of sampling and mini-batch order.")
    routing_replay: Literal["none", "R2", "R3"] = Field(
        "none", description="MoE routing replay (docs/routing.md): R2 replays pi_old's routes, R3 the rollout's."
    )
    max_nonfinite_steps: int = Field(3, ge=1, description="Stop after this many non-finite steps in a row.")
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's forward in the "
        "backward instead of keeping its activations (less memory, ~1 more "
        "forward of compute; routing replay holds in the recompute). Never "
        "changes the result.",
    )
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="The training forward/backward's compute "
        "dtype: bf16 computes in bfloat16 (autocast on one rank, FSDP2's "
        "param_dtype on several) with fp32 master weights, optimizer state "
        "and gradients; auto: bf16 on CUDA, fp32 on CPU.",
    )
    compile: bool = Field(
        False,
        description="torch.compile (dynamic shapes) each decoder layer's parts that hold no "
        "MoE router (attention, norms, experts, a dense MLP; routers stay eager for routing "
        "replay's hooks): a faster training forward/backward after a one-off compile at the "
        "run's first steps (docs/performance.md). Equal to eager up to float round-off.",
    )


class BatchConfig(StrictModel):
    """The batch hierarchy (docs/design.md): the rollout batch of prompts_per_step x group_size
    responses is split into N mini-batches (one optimizer step each; N = 1 is on-policy); a
    mini-batch is processed in micro-batches (memory only: the result does not depend on them)."""

    prompts_per_step: int = Field(
        16, ge=1, description="Prompts sampled per step (the whole rollout batch, over all ranks)."
    )
    group_size: int = Field(8, ge=2, description="Responses per prompt (the group of the advantage baseline).")
    minibatches_per_step: int = Field(1, ge=1, description="N: optimizer steps per rollout batch (1 = on-policy).")
    micro_batch_size: int = Field(128, ge=1, description="Responses per forward/backward (memory only).")
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        description="Also cap a micro-batch by tokens: "
        "responses (longest first, so similar lengths share one: less "
        "padding) join a micro-batch while its "
        "padded size, rows x longest prompt+response, stays within this "
        "(a longer single response goes alone); none = by "
        "micro_batch_size only. Memory only: never changes the result.",
    )
    packing: bool = Field(
        False,
        description="Training forwards without padding: each micro-batch's prompts and "
        "responses laid end to end in one sequence (positions restart per response, attention "
        "confined to each, routes replayed per packed position); micro-batches are then cut by real "
        "tokens. Needs batch.max_tokens_per_micro_batch (the packed length: attention over it is "
        "quadratic). Equal to the padded forward up to float round-off.",
    )
    filter_groups: bool = Field(
        False,
        description="Dynamic sampling (DAPO): drop the groups whose rewards are all equal (zero advantages) "
        "and sample more prompts from the stream until prompts_per_step groups with signal are in hand, "
        "at most batch.filter_max_rounds extra rounds; then the batch is filled up with groups without "
        "signal (counted as filter/groups_short). Costs the extra rounds' sampling; the reward metrics "
        'describe the first round (docs/training.md "Dynamic sampling").',
    )
    filter_max_rounds: int = Field(
        4,
        ge=0,
        description="batch.filter_groups: extra sampling rounds (each prompts_per_step prompts) a step may take.",
    )

    @property
    def rollout_batch(self) -> int:
        return self.prompts_per_step * self.group_size

    @model_validator(mode="after")
    def _check(self) -> BatchConfig:
        if self.minibatches_per_step > self.rollout_batch:
            raise ValueError(
                f"batch.minibatches_per_step ({self.minibatches_per_step}) exceeds the rollout batch "
                f"(batch.prompts_per_step x batch.group_size = {self.rollout_batch})"
            )
        if self.packing and self.max_tokens_per_micro_batch is None:
            raise ValueError(
                "batch.packing=true needs batch.max_tokens_per_micro_batch: it is the length of each packed "
                "sequence, and attention over one is quadratic in it (e.g. 4096)"
            )
        return self


class OptimConfig(StrictModel):
    """AdamW on the training policy."""

    lr: float = Field(5e-5, gt=0, description="Peak learning rate (reached after the warm-up).")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up, in optimizer steps.")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="After the warm-up: constant; linear or cosine decay to optim.min_lr_ratio x lr at "
        "the last optimizer step (train.steps x batch.minibatches_per_step).",
    )
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="The decayed schedules' final learning rate, as a fraction of optim.lr."
    )
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    skip_empty_steps: bool = Field(
        True,
        description="A mini-batch without learning signal (every advantage zero on its response tokens, over "
        "all ranks, and no KL penalty) takes no optimizer step: its gradient is exactly zero, yet an AdamW step "
        "would still move every weight (Adam's first step is lr x sign(g) and its momentum keeps moving "
        "weights after g = 0) and decay the moments. Counted per step as steps_skipped. The learning-rate "
        "schedule counts mini-batches, taken or skipped, so it follows the run's progress; Adam's bias "
        "correction counts the steps it took. false: step on every mini-batch.",
    )


class EvalSetConfig(StrictModel):
    """One more held-out set, with its own data and (optionally) its own reward functions;
    reported as the mean reward over ``samples`` samples per problem (avg@k, the paper's avg@32)
    and pass@k (a problem passes when one of its samples reaches ``pass_threshold``)."""

    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9_.-]+$", description="Metric prefix: eval/NAME/avg@k, eval/NAME/pass@k."
    )
    dataset: str = Field(..., description="A file, a directory or a hub id, as task.dataset.")
    dataset_config: str | None = Field(None, description="The hub dataset's configuration name.")
    split: str = Field("train", description="Its split (a local file is one split, train).")
    columns: ColumnsConfig | None = Field(None, description="Its columns (default: task.columns).")
    prompt_template: str | None = Field(None, description="Its prompt template (default: task.prompt_template).")
    reward_fns: list[str] | None = Field(None, description="Its reward functions (default: the task's).")
    reward_weights: list[float] | None = Field(None, description="Their weights (default 1 each).")
    samples: int = Field(4, ge=1, description="k: samples per problem, at the rollout temperature.")
    pass_threshold: float = Field(1.0, description="A sample counts as a pass when its reward is >= this.")
    max_problems: int | None = Field(None, ge=1, description="Evaluate only the first this many problems.")


class EvalConfig(StrictModel):
    every: int = Field(50, ge=1, description="Evaluate the held-out split every this many steps (and at start/end).")
    greedy: bool = Field(True, description="Report greedy accuracy.")
    sampled: bool = Field(True, description="Report sampled accuracy (rollout temperature).")
    samples: int = Field(
        4,
        ge=1,
        description="Samples per held-out problem for the sampled accuracy "
        "(its mean over samples: pass@1 with less noise).",
    )
    precision: Precision = Field("fp32", description="Precision of the evaluation engine.")
    sets: list[EvalSetConfig] = Field(
        [],
        description="More held-out sets, each with avg@k and pass@k "
        "(docs/your-task.md), e.g. [{name: test, dataset: data/test.jsonl}].",
    )

    @model_validator(mode="after")
    def _check_sets(self) -> EvalConfig:
        names = [s.name for s in self.sets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.sets: names must be unique, got {names}")
        return self


class CheckpointConfig(StrictModel):
    every: int = Field(1, ge=1, description="Checkpoint every this many steps (1: a kill loses at most one step).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept.")
    export_every: int = Field(
        0,
        ge=0,
        description="Also write an HF export (RUN_DIR/export/step_N, loadable with "
        "from_pretrained) every this many steps; 0 = only at the end.",
    )


class DistributedConfig(StrictModel):
    """Data-parallel training under torchrun (docs/distributed.md); ignored in a single process."""

    timeout_s: float = Field(
        1800.0,
        gt=0,
        description="Collective timeout: a rank that dies or hangs ends the run "
        "after this long instead of hanging the others.",
    )
    reduce_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="FSDP2 gradient reduce-scatter dtype (fp32: exact sums of bf16 gradients)."
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads per rank (default: cores / ranks per node; torchrun itself would set 1)."
    )


class LogConfig(StrictModel):
    tensorboard: bool = Field(True, description="Also write TensorBoard events to RUN_DIR/tb.")
    progress: bool = Field(
        True,
        description="Progress on the console: a live bar on a terminal; when the "
        "console is not a terminal (nohup, Slurm, CI) a plain line every log.print_every steps.",
    )
    print_every: int = Field(10, ge=1, description="Steps between plain progress lines (console not a terminal).")
    rollouts: bool = Field(
        False,
        description="Write every sampled response (prompt, completion, reward) to "
        "RUN_DIR/rollouts.jsonl, one line per step.",
    )
    lag_kl: bool = Field(
        False,
        description="With rollout.max_staleness >= 1: split the training-inference KL into "
        "the engine's part, KL(mu || pi of the sampler's version), and the lag's (k1: the rest) — "
        'one more model copy and a no-grad forward per step (docs/training.md "Staleness").',
    )
    collapse_window: int = Field(
        30,
        ge=1,
        description="Steps of history (at most) whose median is the baseline "
        "of the collapse warning; it works from the first steps on.",
    )
    collapse_sustain: int = Field(3, ge=1, description="Consecutive steps a jump must last to warn.")
    collapse_factor: float = Field(
        3.0,
        gt=1,
        description="Warn when entropy moves beyond factor x (or 1/factor x) "
        "its baseline, the train-infer KL rises beyond factor x, or the reward falls "
        "below 1/factor x (docs/training.md).",
    )
    wandb: bool = Field(
        False,
        description="Also log to Weights & Biases (pip install 'stablerl[wandb]'), with the "
        "resolved config attached; a resumed run continues the same W&B run.",
    )
    wandb_project: str = Field("stablerl", description="W&B project.")
    wandb_run_name: str | None = Field(None, description="W&B run name (default: the run directory's name).")
    wandb_mode: Literal["online", "offline"] = Field(
        "online", description="offline: write RUN_DIR/wandb/ only (sync later with `wandb sync`); needs no network."
    )


class RunConfig(StrictModel):
    """Everything `stablerl train` needs; sections are set with dotted keys (loss.eps_high=0.28)."""

    run_dir: str | None = Field(None, description="Run directory; none = runs/<timestamp>.")
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    sft: SFTConfig = SFTConfig()
    rollout: RolloutConfig = RolloutConfig()
    train: TrainConfig = TrainConfig()
    batch: BatchConfig = BatchConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        # distributed.param_dtype (FSDP only) became train.dtype (every layout): configs and run
        # directories written before keep loading
        dist = data.get("distributed") if isinstance(data, dict) else None
        if isinstance(dist, dict) and "param_dtype" in dist:
            dist = dict(dist)
            value = dist.pop("param_dtype")
            train = dict(data.get("train") or {})
            if "dtype" in train and train["dtype"] != value:
                raise ValueError(
                    f"distributed.param_dtype={value} and train.dtype={train['dtype']}: "
                    "distributed.param_dtype is now train.dtype; set only train.dtype"
                )
            train["dtype"] = value
            data = {**data, "distributed": dist, "train": train}
        return data

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        if self.task.name == "arithmetic" and self.task.style.endswith("columns") and self.model.path is None:
            # the default tokenizer is character-level: a worked solution is this many tokens (+ EOS)
            d, L = len(str(self.task.max_operand)), max(self.task.levels)
            longest = d * (2 * L + 6) + (d - 1) + 1 + (d + 1) + 1
            if longest > self.rollout.max_new_tokens:
                raise ValueError(
                    f"task.style={self.task.style} with task.levels up to {L} and task.max_operand="
                    f"{self.task.max_operand} has worked solutions of up to {longest} tokens, more than "
                    f"rollout.max_new_tokens={self.rollout.max_new_tokens}: every response would be cut "
                    f"before its answer; set rollout.max_new_tokens>={longest}"
                )
        if self.model.lora.enabled and self.rollout.engine != "local":
            raise ValueError(
                f"model.lora.enabled with rollout.engine={self.rollout.engine}: adapter-only syncs to vLLM are "
                "not supported "
                "(vLLM's CPU build cannot run LoRA on MoE models: its fused-MoE LoRA kernels are Triton's); "
                "use rollout.engine=local, which samples with the merged weights"
            )
        RoutingPlan(self.train.routing_replay, True, self.batch.minibatches_per_step, self.loss.proximal == "rollout")
        eta, steps = self.rollout.max_staleness, self.train.steps
        if eta and eta >= steps:  # the lag is never reached, and every version would be kept for it
            raise ValueError(
                f"rollout.max_staleness={eta} is not below train.steps={steps}: step s is sampled by "
                f"version max(0, s - 1 - eta), so every step would be sampled by the starting policy; "
                f"use a lag below train.steps (at most {steps - 1})"
            )
        if self.rollout.vllm.in_flight_updates:
            self._check_in_flight()
        return self

    def _check_in_flight(self) -> None:
        """What in-flight weight updates cannot be combined with: both read one version per batch."""
        if self.batch.filter_groups:
            raise ValueError(
                "rollout.vllm.in_flight_updates with batch.filter_groups: a step's extra sampling rounds "
                "are asked for on the channel the in-flight versions arrive on; choose one"
            )
        if self.log.lag_kl:
            raise ValueError(
                "rollout.vllm.in_flight_updates with log.lag_kl: the lag split evaluates one sampling "
                "version per batch, and in-flight batches mix versions; set log.lag_kl=false"
            )


# What may change when a run is resumed: keys that do not change what has been computed so far or
# the maths of the steps to come, plus the recovery knobs a stopped run's message suggests (a
# lower learning rate, a tighter gradient clip). Everything else — the model, the task, the batch,
# the loss, the rollout numerics, the seeds — is fixed for the life of a run.
RESUMABLE_KEYS = (
    "run_dir",
    "train.steps",
    "train.max_nonfinite_steps",
    "optim.lr",
    "optim.warmup_steps",
    "optim.schedule",
    "optim.min_lr_ratio",
    "optim.grad_clip",
    "batch.micro_batch_size",
    "batch.max_tokens_per_micro_batch",
    "batch.packing",
    "train.activation_checkpointing",
    "task.reward_timeout_s",
    "task.reward_workers",
    "task.reward_memory_mb",
    "task.reward_fail_fast",
    "rollout.vllm.",
    "rollout.workers",
    "eval.",
    "checkpoint.",
    "log.",
    "distributed.timeout_s",
    "distributed.threads",
    "sft.checkpoint_every",
    "model.lora.export_merged",
)
