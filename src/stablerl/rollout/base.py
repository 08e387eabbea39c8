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
    ``token_version`` ``[B, R]``, only from an engine that took weights while it sampled
    (rollout.vllm.in_flight_updates): the policy version that sampled each response token
    (``version``, the oldest, elsewhere; 0 at padding). None means every token is ``version``'s.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_width: int
    response_mask: torch.Tensor  # [B, R] bool
    rollout_logp: torch.Tensor  # [B, R] float32, log mu_old of each sampled token, 0 at padding
    finished: torch.Tensor  # [B] bool: ended with EOS (else cut at max_new_tokens)
    version: int  # policy version of the engine's weights (the oldest, when token_version is set)
    routes: torch.Tensor | None = None
    token_version: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    sampling: SamplingConfig | None = None  # how it was sampled (temperature, length limit, ...)
    extras: dict = field(default_factory=dict)

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width :]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, rows: torch.Tensor | list[int]) -> RolloutBatch:
        """The rollouts at ``rows`` (a mini- or micro-batch), every per-row field sliced alike."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return replace(
            self,
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            response_mask=self.response_mask[rows],
            rollout_logp=self.rollout_logp[rows],
            finished=self.finished[rows],
            routes=pick(self.routes),
            token_version=pick(self.token_version),
            group_ids=pick(self.group_ids),
            rewards=pick(self.rewards),
            extras=dict(self.extras),
        )

    def trim(self) -> RolloutBatch:
        """Drop trailing response columns that are padding in every row (cheaper forwards)."""
        R = int(self.response_mask.sum(-1).max())
        end = self.prompt_width + R
        return replace(
            self,
            input_ids=self.input_ids[:, :end],
            attention_mask=self.attention_mask[:, :end],
            response_mask=self.response_mask[:, :R],
            rollout_logp=self.rollout_logp[:, :R],
            routes=None if self.routes is None else self.routes[:, :end],
            token_version=None if self.token_version is None else self.token_version[:, :R],
            extras=dict(self.extras),
        )


def concat(batches: list[RolloutBatch], pad_token_id: int = 0) -> RolloutBatch:
    """The rows of several batches as one, in order (prompts left-padded and responses right-padded
    to the widest; routes -1 where padded). Pieces sampled by different engine calls (rollout
    workers) become one learner batch."""
    if len(batches) == 1:
        return batches[0]
    P = max(b.prompt_width for b in batches)
    R = max(b.response_ids.shape[1] for b in batches)

    def widen(t: torch.Tensor, left: int, right: int, value) -> torch.Tensor:  # along the last dim
        if t.dtype == torch.bool:
            return torch.nn.functional.pad(t.to(torch.uint8), [left, right], value=int(value)).bool()
        return torch.nn.functional.pad(t, [left, right], value=value)

    def sequence(b: RolloutBatch, t: torch.Tensor, value) -> torch.Tensor:
        """``t`` ``[B, P_b + R_b, ...]``: its prompt part left-padded to P, its response part right-padded to R."""
        x = t.movedim(1, -1)
        prompt, response = x[..., : b.prompt_width], x[..., b.prompt_width :]
        return torch.cat(
            [widen(prompt, P - b.prompt_width, 0, value), widen(response, 0, R - response.shape[-1], value)], -1
        ).movedim(-1, 1)

    def responses(attr: str, value) -> torch.Tensor:
        return torch.cat([widen(getattr(b, attr), 0, R - b.response_ids.shape[1], value) for b in batches])

    def rows(attr: str):
        return None if getattr(batches[0], attr) is None else torch.cat([getattr(b, attr) for b in batches])

    routes = None
    if all(b.routes is not None for b in batches):
        routes = torch.cat([sequence(b, b.routes, -1) for b in batches])
    token_version = None
    if any(b.token_version is not None for b in batches):  # a piece without one is all its version
        per_token = [
            b.token_version if b.token_version is not None else (b.response_mask.long() * b.version) for b in batches
        ]
        token_version = torch.cat([widen(t, 0, R - t.shape[1], 0) for t in per_token])
    return RolloutBatch(
        input_ids=torch.cat([sequence(b, b.input_ids, pad_token_id) for b in batches]),
        attention_mask=torch.cat([sequence(b, b.attention_mask, 0) for b in batches]),
        prompt_width=P,
        response_mask=responses("response_mask", False),
        rollout_logp=responses("rollout_logp", 0.0),
        finished=rows("finished"),
        version=min(b.version for b in batches),
        routes=routes,
        token_version=token_version,
        group_ids=rows("group_ids"),
        rewards=rows("rewards"),
        sampling=batches[0].sampling,
    )


def checked_request(prompts: list[list[int]], seeds: list[int] | None, vocab_size: int) -> list[int]:
    """The seeds of a ``generate`` call (one per prompt; 0..n-1 when not given), after checking the
    prompts are non-empty lists of token ids in the vocabulary."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    flat = [t for p in prompts for t in p]
    if min(flat) < 0 or max(flat) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    seeds = list(range(len(prompts))) if seeds is None else seeds
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    return seeds


class RolloutEngine(Protocol):
    """An inference policy mu: its own weights and numerics, sampling many responses at once."""

    version: int

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        *,
        seeds: list[int] | None = None,
        capture_routes: bool = True,
    ) -> RolloutBatch:
        """Sample one response per prompt (repeat a prompt G times for a group)."""
        ...

    def load_weights(self, weights, version: int | None = None) -> None:
        """Sync trained weights in (cast/quantized to the engine's precision); set the version.
        ``weights``: a state dict, or an iterable of ``(name, full tensor)`` streamed one at a time."""
        ...
