"""Validated configuration models: the one place where every config key is defined and documented.

A bad value fails at construction with a message naming the key and what is allowed
(`pydantic.ValidationError` is a `ValueError`).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Algorithm = Literal["minirl", "grpo", "cispo", "gspo", "reinforce"]
ISMode = Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
Aggregation = Literal["token_sum", "token_mean", "seq_mean_token_mean"]

# what an inference engine computes in (docs/rollout.md): fp32 reproduces training; bf16 casts
# weights and compute; fp8 stores matrices as float8 e4m3 (weight-only); fp8_w8a8 also quantizes
# activations to float8 per token at run time, as FP8 serving does
Precision = Literal["fp32", "bf16", "fp8", "fp8_w8a8"]

ALGORITHMS: tuple[str, ...] = Algorithm.__args__
IS_MODES: tuple[str, ...] = ISMode.__args__
AGGREGATIONS: tuple[str, ...] = Aggregation.__args__
PRECISIONS: tuple[str, ...] = Precision.__args__


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors, values are re-validated on assignment, and
    no float may be inf or NaN (a learning rate or timeout of inf is a typo, never a setting)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


class LossConfig(StrictModel):
    """The policy objective (docs/formulation.md sections 4 and 6).

    Ratios: w = pi_old / mu_old (training-inference discrepancy, always stop-gradient) and
    r = pi_theta / pi_old (policy staleness).
    """

    algorithm: Algorithm = Field(
        "minirl",
        description="minirl: sum_t M*w*r*A (docs/formulation.md s.6); grpo: w*min(rA, clip(r)A); "
        "cispo: sg[clip(r)]*w*A*log pi; gspo: sequence (geometric-mean) ratio with clipping; "
        "reinforce: sg[w]*A*log pi.",
    )
    is_mode: ISMode = Field(
        "token_truncate",
        description="IS correction on w = pi_old/mu_old: none | token_truncate (min(w, is_cap)) | "
        "token_mask (drop tokens with w outside [is_low, is_cap]) | sequence_truncate | "
        "sequence_mask (one weight per response: geometric mean of its token ratios).",
    )
    is_cap: float = Field(5.0, gt=0, description="Upper bound C of the IS weight (truncate or mask); the paper "
                          "truncates at 5.")
    is_low: float = Field(0.5, ge=0, description="Lower bound of the IS weight for the *_mask modes.")
    eps_low: float = Field(0.2, ge=0, lt=1, description="Clip bound: r < 1 - eps_low stops A<0 tokens.")
    eps_high: float = Field(0.27, ge=0, description="Clip bound: r > 1 + eps_high stops A>0 tokens (the paper: 0.27).")
    clip: bool = Field(True, description="Apply the clip bounds (minirl, grpo, cispo, gspo).")
    aggregation: Aggregation = Field(
        "token_sum",
        description="token_sum: sum of token terms / a constant for the whole batch (MiniRL; "
        "default constant = responses x max response length); token_mean: / number of response "
        "tokens in the batch; seq_mean_token_mean: mean over responses of each response's own "
        "token mean (per-response length normalization, as GRPO).",
    )

    std_normalize: bool = Field(False, description="Advantages: divide R - mean_group(R) by the group's std "
                                "(GRPO's definition); MiniRL: false.")

    @model_validator(mode="after")
    def _check_bounds(self) -> "LossConfig":
        if self.is_mode.endswith("_mask") and not self.is_low < self.is_cap:
            raise ValueError(
                f"is_low ({self.is_low}) must be < is_cap ({self.is_cap}) for is_mode={self.is_mode}"
            )
        if not math.isfinite(self.eps_high):
            raise ValueError("eps_high must be finite; set clip=false to disable clipping")
        return self


class SamplingConfig(StrictModel):
    """How an engine samples one call's responses. The rollout log-prob of a token is taken under
    the distribution it was actually sampled from (after temperature, top-k and top-p): that is
    mu_old, which the IS correction compares with pi_old (docs/rollout.md). Seeds are per request,
    given to ``generate`` (request i gets seed i when none are given)."""

    temperature: float = Field(1.0, ge=0, description="Softmax temperature; 0 = greedy (log-prob 0).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1 = off).")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens (0 = off).")
    max_new_tokens: int = Field(32, ge=1, description="Response length limit.")


class LabConfig(StrictModel):
    """The exact first-order lab (stablerl.lab): an enumerable autoregressive toy policy."""

    num_content_tokens: int = Field(5, ge=2, le=9, description="Content tokens 1..K (token 0 is EOS).")
    max_len: int = Field(5, ge=2, le=7, description="Horizon L: a response ends at EOS or after L tokens.")
    target_sum: int = Field(7, ge=1, description="Reward 1 iff the response ends with EOS and its tokens sum to this.")
    hidden: int = Field(32, ge=4, le=512, description="Hidden width of the MLP policy.")
    init_scale: float = Field(1.5, gt=0, description="Std of the initial output logits (peakier policy).")
    seed: int = Field(0, description="Seed of the policy init and the numeric perturbations.")
    warm_start_reward: float = Field(
        0.3, ge=0, lt=1,
        description="Cold start: Adam ascent on the exact objective until the expected reward "
        "reaches this (0 = stay at the random init), so RL starts from partial accuracy.",
    )
    discrepancy_noise: list[float] = Field(
        [0.0, 0.02, 0.05, 0.1, 0.2, 0.4],
        description="Relative weight-noise sizes that turn pi_old into the sampling policy mu_old.",
    )
    staleness_steps: list[int] = Field(
        [0, 1, 2, 4, 8, 16, 32], description="Optimizer steps theta is moved away from theta_old."
    )
    staleness_lr: float = Field(0.002, gt=0, description="Adam learning rate of the staleness steps.")
    casts: list[Literal["bf16", "fp8"]] = Field(
        ["bf16", "fp8"], description="Low-precision inference casts evaluated as extra discrepancy points."
    )

    @model_validator(mode="after")
    def _check_sweeps(self) -> "LabConfig":
        if sorted(self.discrepancy_noise) != self.discrepancy_noise or self.discrepancy_noise[0] != 0:
            raise ValueError("discrepancy_noise must be ascending and start at 0.0")
        if sorted(self.staleness_steps) != self.staleness_steps or self.staleness_steps[0] != 0:
            raise ValueError("staleness_steps must be ascending and start at 0")
        if any(x < 0 for x in self.discrepancy_noise):
            raise ValueError("discrepancy_noise values must be >= 0")
        n_seq = sum(self.num_content_tokens**l for l in range(self.max_len + 1))
        if n_seq > 200_000:
            raise ValueError(
                f"num_content_tokens={self.num_content_tokens}, max_len={self.max_len} gives {n_seq} "
                "sequences; the lab enumerates all of them, keep it <= 200000"
            )
        return self


# --------------------------------------------------------------------------------------------
# The training run (`stablerl train` / `stablerl sft`).
# --------------------------------------------------------------------------------------------
class ModelConfig(StrictModel):
    path: str | None = Field(None, description="HF checkpoint dir (model + tokenizer) to start from; "
                             "none = the default tiny Qwen3-MoE, cold-started by SFT.")
    hidden_size: int = Field(96, ge=16, description="Default model only: hidden size (also expert size).")
    num_layers: int = Field(4, ge=1, description="Default model only: decoder layers.")
    num_experts: int = Field(8, ge=2, description="Default model only: routed experts per MoE layer.")
    top_k: int = Field(2, ge=1, description="Default model only: experts per token.")
    init_seed: int = Field(0, description="Default model only: initialization seed.")

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        return self


class TaskConfig(StrictModel):
    name: Literal["arithmetic", "math_file"] = Field("arithmetic", description="Built-in task or local files.")
    levels: list[int] = Field([1, 2, 3], description="arithmetic: difficulty levels (level L adds L+1 numbers).")
    style: Literal["steps", "direct", "noisy"] = Field(
        "noisy", description="arithmetic: teacher solution style for SFT (noisy: 30% of worked solutions carry "
        "one slip, so the cold start is imperfect and RL has something to fix).")
    eval_size: int = Field(500, ge=1, description="Held-out problems.")
    seed: int = Field(0, description="Task seed (problem stream and held-out split).")
    train_file: str | None = Field(None, description="math_file: JSONL or Parquet training problems.")
    eval_file: str | None = Field(None, description="math_file: held-out file (default: a slice of train_file).")
    question_field: str = Field("question", description="math_file: question column.")
    answer_field: str = Field("answer", description="math_file: answer column.")
    solution_field: str | None = Field(None, description="math_file: teacher-solution column (for SFT).")
    prompt_template: str = Field("{question}\n", description="math_file: prompt text around the question.")
    reward_fns: list[str] | None = Field(None, description="Reward functions 'package.module:function' or "
                                         "'path/to/file.py:function', each called as fn(prompt, completion, "
                                         "**row_fields) -> float (docs/your-task.md); none = the task's verifier.")
    reward_weights: list[float] | None = Field(None, description="One weight per reward function (default 1 each); "
                                               "the reward is their weighted sum.")
    reward_timeout_s: float = Field(10.0, gt=0, description="Hard limit per reward call: a verifier still running "
                                    "is killed (its worker process replaced) and the response gets reward 0.")
    reward_workers: int = Field(2, ge=1, le=256, description="Worker processes that run the reward functions "
                                "(in parallel across responses; each call in a worker's main thread).")
    reward_memory_mb: int | None = Field(4096, ge=256, description="Address-space cap of each reward worker: "
                                         "a verifier that allocates more gets MemoryError, i.e. reward 0 "
                                         "(none = no cap).")

    @model_validator(mode="after")
    def _check(self) -> "TaskConfig":
        if self.name == "math_file" and not self.train_file:
            raise ValueError("task.train_file is required when task.name is math_file")
        if self.reward_fns is not None and not self.reward_fns:
            raise ValueError("task.reward_fns must name at least one function (or be null for the task's verifier)")
        n_fns = len(self.reward_fns) if self.reward_fns else 1
        if self.reward_weights is not None and len(self.reward_weights) != n_fns:
            raise ValueError(f"task.reward_weights has {len(self.reward_weights)} weights for {n_fns} reward functions")
        return self


class SFTConfig(StrictModel):
    steps: int = Field(900, ge=1, description="Cold-start SFT optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Teacher solutions per SFT step.")
    lr: float = Field(3e-3, gt=0, description="Peak SFT learning rate (warm-up, cosine to 10%).")
    seed: int = Field(0, description="SFT seed.")
    output_dir: str | None = Field(None, description="Where the cold-start checkpoint lives; none = "
                                   "runs/sft/<hash of model, task and SFT settings> (reused if present).")


class VllmConfig(StrictModel):
    """Options of the vLLM engine (``rollout.engine=vllm``; docs/rollout.md)."""

    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="Fraction of the GPU's memory vLLM may "
                                          "take (weights + KV cache); the trainer shares the GPU. On CPU: the "
                                          "KV cache is sized by vllm.kv_cache_gb instead.")
    kv_cache_gb: float = Field(1.0, gt=0, description="CPU only: KV-cache space in GiB.")
    max_num_seqs: int = Field(256, ge=1, description="Most sequences vLLM runs at once.")
    enforce_eager: bool = Field(True, description="No CUDA graphs (faster start-up, slower decoding).")


class RolloutConfig(SamplingConfig):
    """The inference engine that samples the rollouts (mu_old) and how it samples: the sampling
    keys are ``SamplingConfig``'s (defined once, there)."""

    engine: Literal["local", "vllm"] = Field("local", description="local: stablerl's PyTorch engine (any HF "
                                             "causal LM, emulated precisions); vllm: a colocated vLLM instance "
                                             "(pip install 'stablerl[vllm]'; docs/rollout.md).")
    precision: Precision = Field("bf16", description="Inference numerics (mu_old): fp32 | bf16 | fp8 (weight-only "
                                 "e4m3, per-channel) | fp8_w8a8 (+ activations in e4m3 per token).")
    max_new_tokens: int = Field(40, ge=1, description="Response length limit.")
    weight_noise: float = Field(0.0, ge=0, le=1, description="A controlled extra discrepancy: every weight matrix "
                                "of the engine's copy (never the trained weights) gets Gaussian noise of this "
                                "size relative to its rows' RMS, a fixed pattern (docs/results.md dose-response).")
    vllm: VllmConfig = VllmConfig()

    def sampling(self) -> SamplingConfig:
        """The sampling keys alone, as the engines take them."""
        return SamplingConfig(**{k: getattr(self, k) for k in SamplingConfig.model_fields})

    @model_validator(mode="after")
    def _check_rollout(self) -> "RolloutConfig":
        if self.temperature == 0:
            raise ValueError("rollout.temperature must be > 0: RL samples its rollouts (greedy decoding gives "
                             "every response of a group the same tokens and log-prob 0)")
        return self


class TrainConfig(StrictModel):
    """The RL run: how long, its seed, and how the training forward routes MoE tokens."""

    steps: int = Field(600, ge=1, description="RL steps (one rollout batch each).")
    seed: int = Field(0, description="Seed of sampling and mini-batch order.")
    routing_replay: Literal["none", "R2", "R3"] = Field("none", description="MoE routing replay (docs/routing.md): "
                                                        "R2 replays pi_old's routes, R3 the rollout's.")
    max_nonfinite_steps: int = Field(3, ge=1, description="Stop after this many non-finite steps in a row.")


class BatchConfig(StrictModel):
    """The batch hierarchy (docs/design.md): the rollout batch of prompts_per_step x group_size
    responses is split into N mini-batches (one optimizer step each; N = 1 is on-policy); a
    mini-batch is processed in micro-batches (memory only: the result does not depend on them)."""

    prompts_per_step: int = Field(16, ge=1, description="Prompts sampled per step (the whole rollout batch, "
                                  "over all ranks).")
    group_size: int = Field(8, ge=2, description="Responses per prompt (the group of the advantage baseline).")
    minibatches_per_step: int = Field(1, ge=1, description="N: optimizer steps per rollout batch (1 = on-policy).")
    micro_batch_size: int = Field(128, ge=1, description="Responses per forward/backward (memory only).")

    @property
    def rollout_batch(self) -> int:
        return self.prompts_per_step * self.group_size

    @model_validator(mode="after")
    def _check(self) -> "BatchConfig":
        if self.minibatches_per_step > self.rollout_batch:
            raise ValueError(f"batch.minibatches_per_step ({self.minibatches_per_step}) exceeds the rollout batch "
                             f"(batch.prompts_per_step x batch.group_size = {self.rollout_batch})")
        return self


class OptimConfig(StrictModel):
    """AdamW on the training policy."""

    lr: float = Field(5e-5, gt=0, description="Learning rate (constant after warm-up).")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up, in optimizer steps.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")


class EvalConfig(StrictModel):
    every: int = Field(50, ge=1, description="Evaluate the held-out split every this many steps (and at start/end).")
    greedy: bool = Field(True, description="Report greedy accuracy.")
    sampled: bool = Field(True, description="Report sampled accuracy (rollout temperature).")
    samples: int = Field(4, ge=1, description="Samples per held-out problem for the sampled accuracy "
                         "(its mean over samples: pass@1 with less noise).")
    precision: Precision = Field("fp32", description="Precision of the evaluation engine.")


class CheckpointConfig(StrictModel):
    every: int = Field(1, ge=1, description="Checkpoint every this many steps (1: a kill loses at most one step).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept.")
    export_every: int = Field(0, ge=0, description="Also write an HF export (RUN_DIR/export/step_N, loadable with "
                              "from_pretrained) every this many steps; 0 = only at the end.")


class DistributedConfig(StrictModel):
    """Data-parallel training under torchrun (docs/distributed.md); ignored in a single process."""

    timeout_s: float = Field(1800.0, gt=0, description="Collective timeout: a rank that dies or hangs ends the run "
                             "after this long instead of hanging the others.")
    param_dtype: Literal["fp32", "bf16"] = Field("fp32", description="FSDP2 compute dtype of the sharded "
                                                 "parameters (bf16 on GPUs; fp32 on CPU).")
    reduce_dtype: Literal["fp32", "bf16"] = Field("fp32", description="FSDP2 gradient reduce-scatter dtype.")
    threads: int | None = Field(None, ge=1, description="CPU threads per rank (default: cores / ranks per node; "
                                "torchrun itself would set 1).")


class LogConfig(StrictModel):
    tensorboard: bool = Field(True, description="Also write TensorBoard events to RUN_DIR/tb.")
    progress: bool = Field(True, description="Live progress bar on the console.")
    rollouts: bool = Field(False, description="Write every sampled response (prompt, completion, reward) to "
                           "RUN_DIR/rollouts.jsonl, one line per step.")
    collapse_window: int = Field(30, ge=1, description="Steps of history (at most) whose median is the baseline "
                                 "of the collapse warning; it works from the first steps on.")
    collapse_sustain: int = Field(3, ge=1, description="Consecutive steps a jump must last to warn.")
    collapse_factor: float = Field(3.0, gt=1, description="Warn when entropy moves beyond factor x (or 1/factor x) "
                                   "its baseline, the train-infer KL rises beyond factor x, or the reward falls "
                                   "below 1/factor x (docs/training.md).")


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


# --------------------------------------------------------------------------------------------
# Loading: a YAML/TOML file plus dotted command-line overrides (``loss.eps_high=0.28``).
# --------------------------------------------------------------------------------------------
def load_file(path: str) -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into a dict."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {path!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ValueError(f"config file {path!r}: line {line} is not valid UTF-8") from None
    if p.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {path!r} is not valid TOML: {e}") from None
        return data
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path!r} is not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path!r} must hold a mapping at the top level")
        return data
    raise ValueError(f"config file {path!r}: allowed extensions are .yaml, .yml, .toml")


def apply_overrides(data: dict, overrides: list[str], model: type[BaseModel] | None = None) -> dict:
    """Apply ``a.b.c=value`` overrides to a nested dict.

    Values are parsed as YAML (numbers, booleans, lists), except for keys that ``model`` declares
    as strings: those take the text as written, so ``task.prompt_template=Question: {question}``
    is the string it looks like (YAML would read it as a mapping).
    """
    import copy

    import yaml

    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value (e.g. loss.eps_high=0.28)")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        if raw == "":
            node[leaf] = ""
        elif model is not None and _is_text_field(model, key.split(".")) and raw.lower() not in ("null", "none", "~"):
            node[leaf] = raw
        else:
            try:
                node[leaf] = yaml.safe_load(raw)
            except yaml.YAMLError as e:
                raise ValueError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); "
                                 "quote it, e.g. key='text: with colon'") from None
    return out


def _is_text_field(model: type[BaseModel], path: list[str]) -> bool:
    """Whether the dotted key ``path`` of ``model`` is a str (or optional str) field."""
    import typing

    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        ann = field.annotation
        if i < len(path) - 1:
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return False
            model = ann
            continue
        args = typing.get_args(ann) or (ann,)
        return str in args and not any(a not in (str, type(None)) for a in args)
    return False


def _yaml_problem(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def build_config(model: type[BaseModel], path: str | None, overrides: list[str], base: dict | None = None) -> BaseModel:
    """(``base`` or file) + overrides -> validated config; errors name the key and what is allowed."""
    from pydantic import ValidationError

    data = base if base is not None else (load_file(path) if path else {})
    if base is not None and path:
        data = deep_merge(base, load_file(path))
    data = apply_overrides(data, overrides, model)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                allowed = _allowed_keys(model, err["loc"][:-1])
                msg = f"unknown key; allowed here: {', '.join(allowed)}"
            value = err.get("input")
            shown = f" (got {value!r})" if isinstance(value, (int, float, str)) and err["type"] != "extra_forbidden" else ""
            problems.append(f"{loc}: {msg}{shown}")
        # one line, however many problems: "invalid config: a.b: ... ; c.d: ..."
        raise ValueError("invalid config: " + "; ".join(problems)) from None


def deep_merge(base: dict, update: dict) -> dict:
    """``base`` with ``update``'s keys set, section by section."""
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(data: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# What may change when a run is resumed: keys that do not change what has been computed so far or
# the maths of the steps to come, plus the recovery knobs a stopped run's message suggests (a
# lower learning rate, a tighter gradient clip). Everything else — the model, the task, the batch,
# the loss, the rollout numerics, the seeds — is fixed for the life of a run.
RESUMABLE_KEYS = ("run_dir", "train.steps", "train.max_nonfinite_steps", "optim.lr", "optim.warmup_steps",
                  "optim.grad_clip", "batch.micro_batch_size", "task.reward_timeout_s", "task.reward_workers",
                  "task.reward_memory_mb", "rollout.vllm.", "eval.", "checkpoint.", "log.", "distributed.timeout_s",
                  "distributed.threads")


def resume_changes(saved: "RunConfig", new: "RunConfig") -> dict[str, tuple]:
    """``{key: (old, new)}`` of every changed key; ``ValueError`` naming those that may not change."""
    before, after = flatten(saved.model_dump(mode="json")), flatten(new.model_dump(mode="json"))
    changed = {k: (before.get(k), after.get(k)) for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}
    fixed = [k for k in changed if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUMABLE_KEYS)]
    if fixed:
        lines = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in fixed)
        raise ValueError(f"cannot change {lines} when resuming: it would contradict the checkpoint or change the "
                         f"maths mid-run. Allowed on resume: {', '.join(RESUMABLE_KEYS)}* (start a new run "
                         "for anything else)")
    return changed


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def describe(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per key (dotted), with default and description, for ``--help``."""
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines += describe(ann, f"{prefix}{name}.")
        else:
            lines.append(f"  {prefix}{name} = {field.default!r}\n      {field.description or ''}")
    return lines
