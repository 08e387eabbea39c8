"""Token sampling with per-request random streams, shared by every local engine path.

Sampling is Gumbel-max over the filtered, tempered logits: ``argmax(logits / T + g)`` with
``g ~ Gumbel(0, 1)`` draws exactly from ``softmax(logits / T)`` restricted to the kept tokens.
The noise of request i comes from its own generator, so a request's samples depend only on its
seed and its logits, never on the other requests in the batch.
"""

from __future__ import annotations

import torch

from stablerl.config import SamplingConfig


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Tempered logits ``[B, V]`` (float32) with tokens outside top-k / top-p set to -inf."""
    logits = logits.float()
    if cfg.temperature not in (0.0, 1.0):
        logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass *before* it already reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class GumbelNoise:
    """Per-request Gumbel noise, drawn in chunks of steps from one generator per request."""

    def __init__(self, seeds: list[int], vocab_size: int, max_chunk: int = 16):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        # bound the block to ~16M floats so real vocabularies (150k) stay cheap in memory
        self.vocab_size = vocab_size
        self.chunk = max(1, min(max_chunk, 16_000_000 // max(1, len(seeds) * vocab_size)))
        self._block: torch.Tensor | None = None
        self._start = 0

    def step(self, s: int) -> torch.Tensor:
        if self._block is None or not self._start <= s < self._start + self.chunk:
            self._start = s - s % self.chunk
            u = torch.stack([torch.rand(self.chunk, self.vocab_size, generator=g) for g in self.generators])
            self._block = -torch.log(-torch.log(u.clamp(min=1e-20)))
        return self._block[:, s - self._start]


def sample(
    logits: torch.Tensor, cfg: SamplingConfig, noise: GumbelNoise, step: int, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled tokens ``[B]`` and their log-probs under the distribution sampled from ``[B]``;
    ``rows``: which requests of ``noise`` the B logits rows are (default: all, in order)."""
    gumbel = noise.step(step) if cfg.temperature != 0 else None
    if gumbel is not None and rows is not None:
        gumbel = gumbel[rows]
    return _draw(filter_logits(logits, cfg), cfg, gumbel)


def _draw(
    filtered: torch.Tensor, cfg: SamplingConfig, gumbel: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if cfg.temperature == 0:
        tokens = filtered.argmax(-1)
        return tokens, torch.zeros(tokens.shape, dtype=torch.float32)
    tokens = (filtered + gumbel).argmax(-1)
    logp = filtered.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logp


def sample_next(
    logits: torch.Tensor,
    gumbel: torch.Tensor | None,
    finished: torch.Tensor,
    cfg,
    eos_ids: torch.Tensor,
    pad_token_id: int,
):
    """One decode step's sampling and bookkeeping over every row, in tensor operations only (no
    value read back, no shape that depends on data), so that the compiled decode (rollout.compile)
    runs it inside its step's graph: the tokens ``[B]`` (pad on rows that had finished), their
    log-probs (0 there), the rows still active before these tokens, and the rows finished after
    them (an EOS among ``eos_ids``). ``gumbel``: this step's noise rows (``GumbelNoise.step``; None
    at temperature 0); ``cfg``: anything with ``temperature``, ``top_k`` and ``top_p``."""
    tokens, logp = _draw(filter_logits(logits, cfg), cfg, gumbel)
    return mark_ended(tokens, logp, finished, eos_ids, pad_token_id)


def mark_ended(
    tokens: torch.Tensor, logp: torch.Tensor, finished: torch.Tensor, eos_ids: torch.Tensor, pad_token_id: int
):
    """A decode step's bookkeeping on its sampled ``tokens`` / ``logp`` ``[B]``: rows that had
    finished get the pad token and log-prob 0; returns them, the rows active before this step, and
    the rows finished after it (an EOS among ``eos_ids``). Selections only: no value is rounded."""
    active = ~finished
    tokens = torch.where(active, tokens, pad_token_id)
    logp = torch.where(active, logp, 0.0)
    return tokens, logp, active, finished | (active & (tokens[:, None] == eos_ids).any(-1))
