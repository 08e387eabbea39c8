"""Config sections of what a run starts from: the model (and its LoRA adapters), the task and its
columns, and the cold start (stablerl.config gathers them all)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stablerl.config_objective import StrictModel

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
