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


class SamplingConfig(StrictModel):
    """How the rollout engine samples. The rollout log-prob of a token is taken under the
    distribution it was actually sampled from (after temperature, top-k and top-p): that is
    mu_old, which the IS correction compares with pi_old (see docs/rollout.md)."""

    temperature: float = Field(1.0, ge=0, description="Softmax temperature; 0 = greedy (log-prob 0).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1 = off).")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens (0 = off).")
    max_new_tokens: int = Field(32, ge=1, description="Response length limit.")
    seed: int = Field(0, description="Base seed; request i uses seed + i unless seeds are given.")


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
# Loading: a YAML/TOML file plus dotted command-line overrides (``loss.eps_high=0.28``).
# --------------------------------------------------------------------------------------------
def load_file(path: str) -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into a dict."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {path!r} does not exist")
    text = p.read_text()
    if p.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path!r} must hold a mapping at the top level")
        return data
    raise ValueError(f"config file {path!r}: allowed extensions are .yaml, .yml, .toml")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a nested dict (values parsed as YAML scalars/lists)."""
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
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return out


def build_config(model: type[BaseModel], path: str | None, overrides: list[str]) -> BaseModel:
    """File + overrides -> validated config; errors name the key and what is allowed."""
    from pydantic import ValidationError

    data = apply_overrides(load_file(path) if path else {}, overrides)
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
            problems.append(f"  {loc}: {msg}")
        raise ValueError(f"invalid {model.__name__}:\n" + "\n".join(problems)) from None


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
