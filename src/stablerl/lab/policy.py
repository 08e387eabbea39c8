"""An autoregressive toy policy small enough to enumerate every response.

Tokens: 0 is EOS, 1..K are content tokens. A response ends at EOS or after ``max_len`` tokens,
so the response space is {c EOS : |c| < L} u {c : |c| = L} with c over {1..K}: for K = 5, L = 5,
3906 responses. The policy is a one-hidden-layer MLP over a one-hot encoding of the prefix, so
its parameters are shared across prefixes like a real LM's (a tabular policy would make every
prefix's gradient independent and hide how staleness at one prefix moves the others).

Reward: 1 iff the response ends with EOS and its content tokens sum to ``target_sum``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from stablerl.precision import cast_weight, compute_dtype

EOS = 0


@dataclass(frozen=True)
class ResponseSpace:
    """Every response, padded: ``tokens`` ``[N, L]`` (pad = -1), ``mask`` ``[N, L]``, ``reward`` ``[N]``."""

    tokens: torch.Tensor
    mask: torch.Tensor
    reward: torch.Tensor
    features: torch.Tensor  # [N, L, F] one-hot prefix encoding at every position
    num_content_tokens: int

    @property
    def vocab_size(self) -> int:
        return self.num_content_tokens + 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)


def enumerate_responses(num_content_tokens: int, max_len: int, target_sum: int) -> ResponseSpace:
    K, L = num_content_tokens, max_len
    rows: list[list[int]] = []
    for n in range(L + 1):
        for content in itertools.product(range(1, K + 1), repeat=n):
            rows.append(list(content) + ([EOS] if n < L else []))
    N = len(rows)
    tokens = torch.full((N, L), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    mask = tokens >= 0
    ends_with_eos = (tokens == EOS).any(-1)
    content_sum = torch.where(tokens > 0, tokens, torch.zeros_like(tokens)).sum(-1)
    reward = (ends_with_eos & (content_sum == target_sum)).double()
    return ResponseSpace(tokens, mask, reward, _prefix_features(tokens, K), K)


def _prefix_features(tokens: torch.Tensor, K: int) -> torch.Tensor:
    """Position t sees slots 0..L-2: slot j holds one-hot(token j) if j < t else the 'empty' symbol.

    Prefixes never contain EOS (it ends a response), so a slot has K + 1 symbols: 1..K and empty.
    """
    N, L = tokens.shape
    slots = L - 1
    pos = torch.arange(L)[:, None]  # [L, 1]  position t
    j = torch.arange(slots)[None, :]  # [1, S]  slot j
    sym = tokens[:, None, :slots].expand(N, L, slots)  # token in slot j
    sym = torch.where((j < pos)[None], sym - 1, torch.full_like(sym, K))  # 0..K-1 content, K empty
    sym = sym.clamp(min=0)  # slots past a short response's end are masked out anyway
    return nn.functional.one_hot(sym, K + 1).reshape(N, L, slots * (K + 1)).double()


class EnumerablePolicy(nn.Module):
    """logits(prefix) = W2 tanh(W1 onehot(prefix) + b1) + b2, in float64 for exact enumeration."""

    def __init__(self, num_content_tokens: int, max_len: int, hidden: int, init_scale: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n_in = (max_len - 1) * (num_content_tokens + 1)
        V = num_content_tokens + 1
        self.w1 = nn.Parameter(torch.randn(hidden, n_in, generator=g, dtype=torch.float64) / max_len**0.5)
        self.b1 = nn.Parameter(0.1 * torch.randn(hidden, generator=g, dtype=torch.float64))
        self.w2 = nn.Parameter(init_scale * torch.randn(V, hidden, generator=g, dtype=torch.float64) / hidden**0.5)
        self.b2 = nn.Parameter(torch.zeros(V, dtype=torch.float64))

    def logits(self, features: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Logits ``[N, L, V]``; ``precision`` emulates an inference engine (weights and compute)."""
        if precision == "fp32":
            h = torch.tanh(features @ self.w1.T + self.b1)
            return h @ self.w2.T + self.b2
        dt = compute_dtype(precision)
        w1, w2 = cast_weight(self.w1, precision).to(dt), cast_weight(self.w2, precision).to(dt)
        h = torch.tanh(features.to(dt) @ w1.T + self.b1.detach().to(dt))
        return (h @ w2.T + self.b2.detach().to(dt)).double()


def token_logp(policy: EnumerablePolicy, space: ResponseSpace, precision: str = "fp32") -> torch.Tensor:
    """log pi(y_t | y_<t) of every response token, ``[N, L]`` (0 at padding)."""
    return logp_from_logits(policy.logits(space.features, precision), space)


def logp_from_logits(logits: torch.Tensor, space: ResponseSpace) -> torch.Tensor:
    # log_softmax in float64 even for low-precision logits, so every policy sums to exactly 1
    logp_all = torch.log_softmax(logits.double(), dim=-1)
    picked = logp_all.gather(-1, space.tokens.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(space.mask, picked, torch.zeros_like(picked))


def token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, weight: torch.Tensor, space: ResponseSpace) -> float:
    """Exact per-token KL(p || q) of the next-token distributions, averaged over the response
    tokens of responses drawn from ``weight`` (a distribution over responses)."""
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)  # [N, L]
    m = space.mask.double()
    return float((weight[:, None] * kl * m).sum() / (weight[:, None] * m).sum())
