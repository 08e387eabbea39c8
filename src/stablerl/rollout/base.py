"""What every rollout engine returns, and the protocol it implements."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from stablerl.config import SamplingConfig


@dataclass
class RolloutBatch:
    """Sampled responses and everything later stages need.

    Layout: ``input_ids`` ``[B, P + R]`` is the left-padded prompt (width P) followed by the
    right-padded response (width R); ``attention_mask`` marks real tokens. ``routes``, when the
    model is MoE, is ``[B, P + R, layers, top_k]`` aligned with ``input_ids`` in the layout of
    ``stablerl.routing.capture_routes``: -1 at padding, and at a token sampled in the engine's
    final step (it was never fed back through the model; a training forward routes it live).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_width: int
    response_mask: torch.Tensor          # [B, R] bool
    rollout_logp: torch.Tensor           # [B, R] float32, log mu_old of each sampled token, 0 at padding
    finished: torch.Tensor               # [B] bool: ended with EOS (else cut at max_new_tokens)
    version: int                         # policy version of the engine's weights
    routes: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    sampling: SamplingConfig | None = None   # how it was sampled (temperature, length limit, ...)
    extras: dict = field(default_factory=dict)

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width:]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, rows: torch.Tensor | list[int]) -> "RolloutBatch":
        """The rollouts at ``rows`` (a mini- or micro-batch), every per-row field sliced alike."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return replace(
            self, input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows],
            response_mask=self.response_mask[rows], rollout_logp=self.rollout_logp[rows],
            finished=self.finished[rows], routes=pick(self.routes), group_ids=pick(self.group_ids),
            rewards=pick(self.rewards), extras=dict(self.extras),
        )

    def trim(self) -> "RolloutBatch":
        """Drop trailing response columns that are padding in every row (cheaper forwards)."""
        R = int(self.response_mask.sum(-1).max())
        end = self.prompt_width + R
        return replace(
            self, input_ids=self.input_ids[:, :end], attention_mask=self.attention_mask[:, :end],
            response_mask=self.response_mask[:, :R], rollout_logp=self.rollout_logp[:, :R],
            routes=None if self.routes is None else self.routes[:, :end], extras=dict(self.extras),
        )


class RolloutEngine(Protocol):
    """An inference policy mu: its own weights and numerics, sampling many responses at once."""

    version: int

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, *, seeds: list[int] | None = None,
                 capture_routes: bool = True) -> RolloutBatch:
        """Sample one response per prompt (repeat a prompt G times for a group)."""
        ...

    def load_weights(self, weights, version: int | None = None) -> None:
        """Sync trained weights in (cast/quantized to the engine's precision); set the version.
        ``weights``: a state dict, or an iterable of ``(name, full tensor)`` streamed one at a time."""
        ...
