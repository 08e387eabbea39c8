"""Config sections of the rollout: the engine (local, vLLM in-process or as servers), its precision
and sampling (stablerl.config gathers them all)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stablerl.config_objective import Precision, SamplingConfig, StrictModel


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
    in_flight_updates: bool = Field(
        False,
        description="rollout.engine=vllm_server with one rollout worker and rollout.max_staleness "
        ">= 1: each version the learner finishes is loaded into the servers at once, even while "
        "they sample (vLLM's pause mode keep: requests in flight freeze, the weights change, their "
        "prefixes are recomputed with the new weights and they go on), so a step starts with the "
        "newest version there is (at most max_staleness behind) and later tokens of a response may "
        "come from newer ones. Each token's version is recorded; the IS correction uses each "
        "token's own log-prob, as always. Not deterministic: which token gets which version "
        "depends on timing "
        '(docs/rollout.md "In-flight weight updates").',
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

    def _check_in_flight(self) -> None:
        """What rollout.vllm.in_flight_updates needs of the layout."""
        if self.engine != "vllm_server":
            raise ValueError(
                f"rollout.vllm.in_flight_updates needs rollout.engine=vllm_server (not {self.engine}): only vLLM "
                "servers take weights while they sample"
            )
        if self.workers != 1:
            raise ValueError(
                f"rollout.vllm.in_flight_updates needs exactly one rollout worker (rollout.workers=1, not "
                f"{self.workers}): the servers' one client, which loads each version as it arrives"
            )
        if self.max_staleness < 1:
            raise ValueError(
                "rollout.vllm.in_flight_updates needs rollout.max_staleness >= 1: with 0 the learner waits for "
                "every step's samples, so no version ever arrives while the servers sample"
            )

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
        if self.vllm.in_flight_updates:
            self._check_in_flight()
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
