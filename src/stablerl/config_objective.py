"""Config sections of the objective: the loss, sampling and the exact first-order lab, and the
strict base every config section derives from (stablerl.config gathers them all)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
