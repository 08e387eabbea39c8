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

ALGORITHMS: tuple[str, ...] = Algorithm.__args__
IS_MODES: tuple[str, ...] = ISMode.__args__
AGGREGATIONS: tuple[str, ...] = Aggregation.__args__


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class LossConfig(StrictModel):
    """The policy objective (PAPER.md sections 4 and 6).

    Ratios: w = pi_old / mu_old (training-inference discrepancy, always stop-gradient) and
    r = pi_theta / pi_old (policy staleness).
    """

    algorithm: Algorithm = Field(
        "minirl",
        description="minirl: sum_t M*w*r*A (PAPER.md s.6); grpo: w*min(rA, clip(r)A); "
        "cispo: sg[clip(r)]*w*A*log pi; gspo: sequence (geometric-mean) ratio with clipping; "
        "reinforce: sg[w]*A*log pi.",
    )
    is_mode: ISMode = Field(
        "token_truncate",
        description="IS correction on w = pi_old/mu_old: none | token_truncate (min(w, is_cap)) | "
        "token_mask (drop tokens with w outside [is_low, is_cap]) | sequence_truncate | "
        "sequence_mask (one weight per response: geometric mean of its token ratios).",
    )
    is_cap: float = Field(2.0, gt=0, description="Upper bound C of the IS weight (truncate or mask).")
    is_low: float = Field(0.5, ge=0, description="Lower bound of the IS weight for the *_mask modes.")
    eps_low: float = Field(0.2, ge=0, lt=1, description="Clip bound: r < 1 - eps_low stops A<0 tokens.")
    eps_high: float = Field(0.28, ge=0, description="Clip bound: r > 1 + eps_high stops A>0 tokens.")
    clip: bool = Field(True, description="Apply the clip bounds (minirl, grpo, cispo, gspo).")
    aggregation: Aggregation = Field(
        "token_sum",
        description="token_sum: sum of token terms / a constant for the whole batch (MiniRL; "
        "default constant = responses x max response length); token_mean: / number of response "
        "tokens in the batch; seq_mean_token_mean: mean over responses of each response's own "
        "token mean (per-response length normalization, as GRPO).",
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> "LossConfig":
        if self.is_mode.endswith("_mask") and not self.is_low < self.is_cap:
            raise ValueError(
                f"is_low ({self.is_low}) must be < is_cap ({self.is_cap}) for is_mode={self.is_mode}"
            )
        if not math.isfinite(self.eps_high):
            raise ValueError("eps_high must be finite; set clip=false to disable clipping")
        return self


class LabConfig(StrictModel):
    """The exact first-order lab (stablerl.lab): an enumerable autoregressive toy policy."""

    num_content_tokens: int = Field(5, ge=2, le=9, description="Content tokens 1..K (token 0 is EOS).")
    max_len: int = Field(5, ge=2, le=7, description="Horizon L: a response ends at EOS or after L tokens.")
    target_sum: int = Field(7, ge=1, description="Reward 1 iff the response ends with EOS and its tokens sum to this.")
    hidden: int = Field(32, ge=4, le=512, description="Hidden width of the MLP policy.")
    init_scale: float = Field(1.5, gt=0, description="Std of the initial output logits (peakier policy).")
    seed: int = Field(0, description="Seed of the policy init and the numeric perturbations.")
    discrepancy_noise: list[float] = Field(
        [0.0, 0.02, 0.05, 0.1, 0.2, 0.4],
        description="Relative weight-noise sizes that turn pi_old into the sampling policy mu_old.",
    )
    staleness_steps: list[int] = Field(
        [0, 1, 2, 4, 8, 16], description="Optimizer steps theta is moved away from theta_old."
    )
    staleness_lr: float = Field(0.03, gt=0, description="Adam learning rate of the staleness steps.")
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
