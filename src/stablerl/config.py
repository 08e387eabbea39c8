"""Validated configuration models: the one place where every config key is defined and documented.

A bad value fails at construction with a message naming the key and what is allowed
(`pydantic.ValidationError` is a `ValueError`).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stablerl.replay import RoutingPlan

Algorithm = Literal["minirl", "grpo", "cispo", "gspo", "reinforce", "dppo"]
ISMode = Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
Aggregation = Literal["token_sum", "token_mean", "seq_mean_token_mean"]

# what an inference engine computes in (docs/rollout.md): fp32 reproduces training; bf16 and fp16
# cast weights and compute; fp8 stores matrices as float8 e4m3 (weight-only); fp8_w8a8 also quantizes
# activations to float8 per token at run time, as FP8 serving does; nvfp4 / nvfp4_w4a4 the same with
# NVIDIA's 4-bit format (e2m1 values, an e4m3 scale per 16 elements)
Precision = Literal["fp32", "bf16", "fp16", "fp8", "fp8_w8a8", "nvfp4", "nvfp4_w4a4"]

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
        "reinforce: sg[w]*A*log pi; dppo: M*sg[w]*r*A with DPPO's trust-region mask on the probability "
        "difference pi_theta - mu (or its binary KL) in the advantage's direction instead of the ratio clip "
        "(prime-rl's default loss; loss.dppo_*).",
    )
    is_mode: ISMode = Field(
        "token_truncate",
        description="IS correction on w = pi_old/mu_old: none | token_truncate (min(w, is_cap)) | "
        "token_mask (drop tokens with w outside [is_low, is_cap]) | sequence_truncate | "
        "sequence_mask (one weight per response: geometric mean of its token ratios).",
    )
    is_cap: float = Field(
        5.0, gt=0, description="Upper bound C of the IS weight (truncate or mask); the paper truncates at 5."
    )
    is_low: float = Field(0.5, ge=0, description="Lower bound of the IS weight for the *_mask modes.")
    eps_low: float = Field(0.2, ge=0, lt=1, description="Clip bound: r < 1 - eps_low stops A<0 tokens.")
    eps_high: float = Field(0.27, ge=0, description="Clip bound: r > 1 + eps_high stops A>0 tokens (the paper: 0.27).")
    clip: bool = Field(True, description="Apply the clip bounds (minirl, grpo, cispo, gspo; dppo masks by its own).")
    dppo_divergence: Literal["tv", "binary_kl"] = Field(
        "tv",
        description="loss.algorithm=dppo's divergence of a sampled token between pi_theta and mu (the engine): "
        "tv = the probability difference pi_theta - mu; binary_kl = the KL between Bernoulli(mu) and "
        "Bernoulli(pi_theta) of that token, signed by the difference.",
    )
    dppo_delta_low: float = Field(
        0.2,
        gt=0,
        description="dppo: a token with A < 0 is masked once its divergence moved past this downwards "
        "(pi_theta - mu < -delta for tv); prime-rl's default 0.2. On binary_kl's scale (a KL) the DPPO paper "
        "uses ~0.05.",
    )
    dppo_delta_high: float = Field(
        0.2,
        gt=0,
        description="dppo: a token with A > 0 is masked once its divergence moved past this upwards "
        "(pi_theta - mu > delta for tv); prime-rl's default 0.2.",
    )
    aggregation: Aggregation = Field(
        "token_sum",
        description="token_sum: sum of token terms / a constant for the whole batch (MiniRL; "
        "default constant = responses x max response length); token_mean: / number of response "
        "tokens in the batch; seq_mean_token_mean: mean over responses of each response's own "
        "token mean (per-response length normalization, as GRPO).",
    )

    std_normalize: bool = Field(
        False, description="Advantages: divide R - mean_group(R) by the group's std (GRPO's definition); MiniRL: false."
    )

    proximal: Literal["recompute", "rollout"] = Field(
        "recompute",
        description="pi_old, the proximal policy of the IS weight and the clip: recompute (the learner's "
        "weights before the step: w = pi_old/mu carries the engine discrepancy and any lag, the clip bounds "
        "pi_theta/pi_old) | rollout (bypass: pi_old := mu, no recompute; w = 1 and the clip bounds pi_theta/mu; "
        "cheaper; cannot go with routing replay R2, which replays the recompute's routes).",
    )
    kl_beta: float = Field(
        0.0,
        ge=0,
        description="Weight of a KL penalty to a frozen reference policy (the "
        "run's starting weights): loss += kl_beta x the aggregated per-token estimate (0 = off, "
        "the paper's recipe; on, it costs one more model copy and forward per rank).",
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k3",
        description="Per-token KL(pi_theta || pi_ref) estimate on "
        "the sampled tokens: k1 = log pi - log ref, k2 = (log pi - log "
        "ref)^2 / 2, k3 = ref/pi - 1 - log(ref/pi) (GRPO's).",
    )

    # -- corrections that drop tokens or responses, composed with every is_mode and algorithm
    # (docs/objectives.md "Rejection, OPSM, M2PO")
    reject: Literal["none", "sequence_geo"] = Field(
        "none",
        description="Rejection sampling as its own axis: sequence_geo drops a response (every token weight "
        "0) whose geometric-mean IS weight exp(mean_t log w_t) is outside [reject_low, reject_high]; kept "
        "responses keep the weight is_mode gives them (verl's rollout_rs, NeMo-RL's seq-mask-tis).",
    )
    reject_low: float = Field(0.95, ge=0, description="Lower bound of loss.reject=sequence_geo.")
    reject_high: float = Field(1.05, gt=0, description="Upper bound of loss.reject=sequence_geo.")
    opsm_delta: float | None = Field(
        None,
        ge=0,
        description="Off-policy sequence masking (DeepSeek-V3.2): drop a "
        "response with A < 0 whose mean_t (log mu_old - log pi_theta) exceeds this "
        "(null = off).",
    )
    m2_threshold: float | None = Field(
        None,
        gt=0,
        description="M2PO's second-moment mask: in each mini-batch, "
        "mask the tokens with the largest (log pi_theta - log mu_old)^2 until the "
        "mean over the rest is <= this (null = off).",
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> LossConfig:
        if self.is_mode.endswith("_mask") and not self.is_low < self.is_cap:
            raise ValueError(f"is_low ({self.is_low}) must be < is_cap ({self.is_cap}) for is_mode={self.is_mode}")
        if not self.reject_low < self.reject_high:
            raise ValueError(f"reject_low ({self.reject_low}) must be < reject_high ({self.reject_high})")
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
        0.3,
        ge=0,
        lt=1,
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
    casts: list[Literal["bf16", "fp16", "fp8"]] = Field(
        ["bf16", "fp16", "fp8"], description="Low-precision inference casts evaluated as extra discrepancy points."
    )

    @model_validator(mode="after")
    def _check_sweeps(self) -> LabConfig:
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
# the default tiny model's context; a cold start of this context leaves the context out of its cache
# key, so the cold starts already trained keep their cache directories (stablerl.sft._sft_key)
DEFAULT_CONTEXT = 256


class LoraConfig(StrictModel):
    """LoRA adapters through `peft` (docs/lora.md): the base model frozen in ``train.dtype``, only the
    adapters trained and in the optimizer, the checkpoints and the weight syncs."""

    enabled: bool = Field(False, description="Train LoRA adapters on a frozen base instead of every weight.")
    rank: int = Field(16, ge=1, description="r: the adapters' rank (per expert for the experts' adapters).")
    alpha: float = Field(32.0, gt=0, description="The adapters' output is scaled by alpha / rank.")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the adapters' input (attention and dense MLP projections only: peft's "
        "adapters on packed expert weights take none, so > 0 needs model.lora.experts=false on a MoE).",
    )
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Linear layers adapted, by their last name: the attention projections and the dense "
        "MLPs' (a dense model's MLP, Qwen2-MoE's shared expert) in every supported family; a name the "
        "model lacks is skipped, one that matches nothing at all is an error.",
    )
    experts: bool = Field(
        True,
        description="MoE models: also adapt every routed expert's packed gate_up_proj and down_proj "
        "(peft's target_parameters: one rank-r adapter per expert).",
    )
    train_router: bool = Field(
        False,
        description="MoE models: also train the routers' weights in full (they are small, [experts, hidden] "
        "per layer); frozen by default, so the base's routing changes only through the adapted hidden states.",
    )
    export_merged: bool = Field(
        False,
        description="Exports also write the merged model (base + adapters, an HF checkpoint that plain "
        "transformers loads) beside the peft adapter.",
    )


class ModelConfig(StrictModel):
    path: str | None = Field(
        None,
        description="HF checkpoint dir (model + tokenizer) to start from; "
        "none = the default tiny Qwen3-MoE, cold-started by SFT.",
    )
    family: str = Field(
        "qwen3_moe",
        description="Default model only: its Mixture-of-Experts family, a tiny random model of any family "
        "routing replay supports (docs/routing.md): qwen3_moe, qwen2_moe, olmoe, mixtral, qwen3_5_moe, "
        "qwen3_next, deepseek_v3, glm4_moe, gpt_oss.",
    )
    hidden_size: int = Field(96, ge=16, description="Default model only: hidden size (4 attention heads).")
    expert_size: int | None = Field(
        None, ge=8, description="Default model only: each expert's intermediate size (none = hidden_size)."
    )
    num_layers: int = Field(4, ge=1, description="Default model only: decoder layers.")
    num_experts: int = Field(8, ge=2, description="Default model only: routed experts per MoE layer.")
    top_k: int = Field(2, ge=1, description="Default model only: experts per token.")
    init_seed: int = Field(0, description="Default model only: initialization seed.")
    max_positions: int = Field(
        DEFAULT_CONTEXT,
        ge=16,
        description="Default model only: its context in tokens "
        "(the longest prompt + response it accepts). Rotary positions have no weights, so "
        "a longer context changes no number, only what fits.",
    )
    lora: LoraConfig = LoraConfig()

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        from stablerl.families import check_tiny_family

        check_tiny_family(self.family, self.num_experts, self.top_k)
        return self


class ColumnsConfig(StrictModel):
    """Which dataset column holds what (every column of a row also reaches the reward functions)."""

    question: str = Field("question", description="The text task.prompt_template places in the prompt.")
    answer: str | None = Field(
        "answer",
        description="The reference answer (the built-in math verifier needs "
        "it; null when your reward functions do not).",
    )
    solution: str | None = Field(None, description="A teacher solution per row, for the cold-start SFT.")


class TaskConfig(StrictModel):
    name: Literal["arithmetic", "dataset"] = Field(
        "arithmetic", description="arithmetic: the built-in task; dataset: your data (task.dataset; docs/your-task.md)."
    )
    levels: list[int] = Field([1, 2, 3], description="arithmetic: difficulty levels (level L adds L+1 numbers).")
    style: Literal["steps", "direct", "noisy", "columns", "noisy_columns"] = Field(
        "noisy",
        description="arithmetic: teacher solution style for SFT (noisy: 30% of worked solutions carry "
        "one slip, so the cold start is imperfect and RL has something to fix; columns / noisy_columns: digit-by-"
        "digit column addition with carries, the long-reasoning styles).",
    )
    max_operand: int = Field(
        99,
        ge=9,
        le=10**18,
        description="arithmetic: the largest number in a problem "
        "(99: two digits; level 5 with 999999 and a column style gives 109-token solutions; "
        "level 2 with 18 nines, ~200).",
    )
    eval_size: int = Field(500, ge=1, description="Held-out problems.")
    seed: int = Field(0, description="Task seed (problem stream and held-out split).")
    dataset: str | None = Field(
        None,
        description="dataset: what datasets.load_dataset reads: a local file "
        "(.jsonl .json .parquet .csv .arrow), a local directory, or a hub id (network).",
    )
    dataset_config: str | None = Field(None, description="dataset: the hub dataset's configuration name.")
    split: str = Field("train", description="dataset: the split to train on (a local file is one split, train).")
    eval_dataset: str | None = Field(
        None, description="dataset: the held-out set (default: a seeded slice of at most a fifth of task.dataset)."
    )
    eval_split: str = Field("train", description="dataset: the split of task.eval_dataset.")
    columns: ColumnsConfig = ColumnsConfig()
    prompt_template: str = Field("{question}\n", description="dataset: prompt text around the question.")
    chat_template: bool = Field(
        False,
        description="Format each prompt with the tokenizer's chat template (a user "
        "turn, then the assistant's), as instruct models were trained.",
    )
    system_prompt: str | None = Field(None, description="With task.chat_template: a system turn before the user's.")
    reward_fns: list[str] | None = Field(
        None,
        description="Reward functions 'package.module:function' or "
        "'path/to/file.py:function', each called as fn(prompt, completion, "
        "**row_fields) -> float (docs/your-task.md); none = the task's verifier.",
    )
    reward_weights: list[float] | None = Field(
        None, description="One weight per reward function (default 1 each); the reward is their weighted sum."
    )
    reward_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Hard limit per reward call: a verifier still running "
        "is killed (its worker process replaced) and the response gets reward 0.",
    )
    reward_fail_fast: bool = Field(
        True,
        description="Stop at the first step when a reward function failed on "
        "every response (it would contribute nothing but zeros); false: go on, with 0 "
        "for each failed call.",
    )
    reward_workers: int = Field(
        2,
        ge=1,
        le=256,
        description="Worker processes that run the reward functions "
        "(in parallel across responses; each call in a worker's main thread).",
    )
    max_prompt_tokens: int = Field(
        1024,
        ge=1,
        description="Longest prompt (in tokens, chat template included) "
        "a run accepts; the model's context (prompt + rollout.max_new_tokens) is the "
        "hard limit. Checked for every row at start-up.",
    )
    long_prompts: Literal["error", "skip"] = Field(
        "error",
        description="A prompt over task.max_prompt_tokens: "
        "error (stop at start-up, naming the row) or skip (drop the "
        "row, counted and reported).",
    )
    reward_memory_mb: int | None = Field(
        4096,
        ge=256,
        description="Address-space cap of each reward worker: "
        "a verifier that allocates more gets MemoryError, i.e. reward 0 "
        "(none = no cap).",
    )

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if self.name == "dataset" and not self.dataset:
            raise ValueError("task.dataset is required when task.name is dataset (a file, a directory or a hub id)")
        if self.reward_fns is not None and not self.reward_fns:
            raise ValueError("task.reward_fns must name at least one function (or be null for the task's verifier)")
        n_fns = len(self.reward_fns) if self.reward_fns else 1
        if self.reward_weights is not None and len(self.reward_weights) != n_fns:
            raise ValueError(f"task.reward_weights has {len(self.reward_weights)} weights for {n_fns} reward functions")
        if self.name == "dataset" and not self.reward_fns and self.columns.answer is None:
            raise ValueError(
                "task.columns.answer is null, but the default reward (math-verify) compares with the "
                "answer column: name it, or set task.reward_fns"
            )
        return self


class SFTConfig(StrictModel):
    steps: int = Field(900, ge=1, description="Cold-start SFT optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Teacher solutions per SFT step.")
    lr: float = Field(3e-3, gt=0, description="Peak SFT learning rate (warm-up, cosine to 10%).")
    seed: int = Field(0, description="SFT seed.")
    output_dir: str | None = Field(
        None,
        description="Where the cold-start checkpoint lives; none = "
        "runs/sft/<hash of model, task and SFT settings> (reused if present).",
    )
    checkpoint_every: int = Field(
        100,
        ge=0,
        description="Save the cold start's partial state (weights, "
        "optimizer, schedule) every this many steps next to its directory "
        "(<dir>.partial.pt), so a killed cold start resumes where it stopped "
        "with the same result; 0 = never.",
    )


class VllmConfig(StrictModel):
    """Options of the vLLM engines (``rollout.engine=vllm`` in the trainer's processes,
    ``rollout.engine=vllm_server`` as separate servers; docs/rollout.md)."""

    gpu_memory_utilization: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Fraction of each GPU's memory vLLM may take (weights + KV cache). Colocated, "
        "it must fit beside the trainer's resident shards and optimizer state, and sleep mode hands "
        "it back during the update (the memory plan: docs/distributed.md); a server with GPUs of "
        "its own can take 0.9. On CPU the KV cache is sized by vllm.kv_cache_gb instead.",
    )
    kv_cache_gb: float = Field(1.0, gt=0, description="CPU only: KV-cache space in GiB.")
    max_num_seqs: int = Field(256, ge=1, description="Most sequences vLLM runs at once.")
    enforce_eager: bool | None = Field(
        None,
        description="No CUDA graphs / compilation (faster start-up, slower decoding). Default: "
        "CUDA graphs on a GPU; eager on CPU, where vLLM's compilation takes minutes at start-up.",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="GPUs one vLLM instance spans. Colocated: that many consecutive torchrun ranks "
        "form one instance (vLLM's external_launcher), sample their prompts together and each keeps "
        "its own rows; must divide the learner ranks. Server mode: GPUs per server.",
    )
    sleep_level: Literal[0, 1, 2] | None = Field(
        None,
        description="Colocated on GPUs: vLLM sleeps while the trainer updates, and wakes to take "
        "the new weights. 1 moves its weights to CPU memory and frees the KV cache; 2 frees both "
        "(the weight sync that follows refills them); 0 keeps everything on the GPU. Default: 1 on "
        "a GPU, 0 on CPU (vLLM's CPU build has no sleep mode).",
    )
    servers: int = Field(
        1,
        ge=1,
        le=64,
        description="rollout.engine=vllm_server: how many vLLM servers stablerl starts (each "
        "tensor_parallel_size GPUs); requests are spread over them. Ignored when vllm.urls is set.",
    )
    server_gpus: list[int] = Field(
        [],
        description="rollout.engine=vllm_server: the GPU indices the started servers use, "
        "tensor_parallel_size each, in order (they may share the trainer's GPUs, with "
        "gpu_memory_utilization leaving the trainer its part). Default: the node's GPUs after the "
        "trainer's ranks.",
    )
    urls: list[str] = Field(
        [],
        description="rollout.engine=vllm_server: attach to servers already running at these base "
        "URLs (http://host:port) instead of starting them; each must run stablerl's model with "
        "VLLM_SERVER_DEV_MODE=1 and a weight-transfer backend (docs/rollout.md).",
    )
    weight_transfer: Literal["auto", "nccl", "gloo"] = Field(
        "auto",
        description="rollout.engine=vllm_server: how trained weights reach the servers, through "
        "vLLM's weight-transfer protocol. nccl: vLLM's NCCL engine (GPUs); gloo: stablerl's engine "
        "over torch.distributed gloo (CPU, or GPUs without NCCL between trainer and servers); "
        "auto: nccl on a GPU, gloo on CPU.",
    )
    server_start_timeout_s: float = Field(
        600.0,
        gt=0,
        description="rollout.engine=vllm_server: how long a server may take to become ready "
        "(model load, compilation, CUDA graphs) before the run ends naming it.",
    )

    @model_validator(mode="after")
    def _check_vllm(self) -> VllmConfig:
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"rollout.vllm.urls: {url!r} is not a base URL like http://host:8000")
        return self


class RolloutConfig(SamplingConfig):
    """The inference engine that samples the rollouts (mu_old) and how it samples: the sampling
    keys are ``SamplingConfig``'s (defined once, there)."""

    engine: Literal["local", "vllm", "vllm_server"] = Field(
        "local",
        description="local: stablerl's PyTorch engine (any HF "
        "causal LM, emulated precisions); vllm: a colocated vLLM instance in each trainer "
        "process; vllm_server: vLLM OpenAI servers, started by stablerl or given by "
        "rollout.vllm.urls, synced through vLLM's weight-transfer protocol "
        "(pip install 'stablerl[vllm]'; docs/rollout.md).",
    )
    precision: Precision = Field(
        "bf16",
        description="Inference numerics (mu_old): fp32 | bf16 | fp16 | fp8 (weight-only "
        "e4m3, per-channel) | fp8_w8a8 (+ activations in e4m3 per token) | nvfp4 (weight-only "
        "e2m1, an e4m3 scale per 16 inputs) | nvfp4_w4a4 (+ activations in nvfp4 per token).",
    )
    max_new_tokens: int = Field(40, ge=1, description="Response length limit.")
    drop_finished: bool = Field(
        False,
        description="local engine: ended responses leave the decode (their cache rows "
        "are cut away), which pays on long responses of uneven length (docs/performance.md). The same tokens, "
        "but mu then differs at float round-off (~1e-6) with the batch's composition, so runs "
        "with other rank or worker layouts stop being equal to the last digit.",
    )
    compile: bool = Field(
        False,
        description="local engine (qwen3_moe's fast decoder): the prefill and the decode "
        "step each compiled whole by torch.compile with static shapes (prompt widths bucketed to 8, "
        "the cache's length to 64, the experts in layouts of fixed shape), once per batch size, "
        "width and length (tens of seconds; the gain is in docs/performance.md); "
        "sums in other orders, so mu differs from the eager "
        "decode's at round-off. Needs a C++ compiler; not with drop_finished.",
    )
    workers: int = Field(
        0,
        ge=0,
        le=64,
        description="Rollout worker processes: the last R ranks of the torchrun "
        "job only sample (torchrun --nproc_per_node=learners+R), overlapping sampling with training "
        "when rollout.max_staleness >= 1; 0 = the learners sample. The same config gives the same "
        'metrics either way (docs/training.md "Staleness").',
    )
    max_staleness: int = Field(
        0,
        ge=0,
        description="eta: the batch trained at step s is sampled by the policy of "
        "version max(0, s - 1 - eta) — a fixed lag, as an asynchronous pipeline has "
        "(0 = synchronous). With rollout.workers=0 the learner's own engine loads weights eta "
        "steps late; with workers, they sample with them (eta extra weight copies on the CPU; "
        'docs/training.md "Staleness").',
    )
    weight_noise: float = Field(
        0.0,
        ge=0,
        le=1,
        description="A controlled extra discrepancy: every weight matrix "
        "of the engine's copy (never the trained weights) gets Gaussian noise of this "
        "size relative to its rows' RMS, a fixed pattern (docs/notebook/first-set.md, dose-response).",
    )
    weight_noise_redraw: bool = Field(
        False,
        description="Draw rollout.weight_noise's pattern anew at every weight sync, seeded by (train.seed, "
        "policy version) (the same on every rank, worker and resume): a mismatch that moves with every "
        "version and that the learner cannot learn around, unlike a fixed pattern or a deterministic "
        "quantizer (a labelled control; docs/rollout.md).",
    )
    vllm: VllmConfig = VllmConfig()

    def sampling(self) -> SamplingConfig:
        """The sampling keys alone, as the engines take them."""
        return SamplingConfig(**{k: getattr(self, k) for k in SamplingConfig.model_fields})

    @model_validator(mode="after")
    def _check_rollout(self) -> RolloutConfig:
        if self.weight_noise_redraw and not self.weight_noise:
            raise ValueError(
                "rollout.weight_noise_redraw re-draws rollout.weight_noise's pattern, which is 0: set "
                "rollout.weight_noise (e.g. 0.05) or rollout.weight_noise_redraw=false"
            )
        if self.temperature == 0:
            raise ValueError(
                "rollout.temperature must be > 0: RL samples its rollouts (greedy decoding gives "
                "every response of a group the same tokens and log-prob 0)"
            )
        if self.engine == "vllm" and self.vllm.sleep_level == 2 and self.max_staleness:
            raise ValueError(
                "rollout.vllm.sleep_level=2 discards vLLM's weights at every sleep, but with "
                f"rollout.max_staleness={self.max_staleness} the engine keeps a version across steps "
                "without a sync to refill them; use sleep_level=1"
            )
        if self.compile and self.engine != "local":
            raise ValueError(
                "rollout.compile compiles the local engine's decode step; vLLM compiles its own "
                "(set rollout.compile=false, or rollout.engine=local)"
            )
        if self.compile and self.drop_finished:
            raise ValueError(
                "rollout.compile and rollout.drop_finished cannot be combined: a compiled decode step "
                "has a fixed batch, and dropping rows would compile a new one at every batch size "
                "(choose one)"
            )
        return self


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
        return self


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
