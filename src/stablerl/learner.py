"""The learner: the training policy pi, its optimizer, and the N-mini-batch update.

This is the only training code that knows the model may be sharded (FSDP2, ``distributed/``).
The maths it calls (``objectives``, ``advantages``, ``diagnostics``) is rank-blind; what makes a
K-rank update equal to the 1-rank update of the same rollout batch is decided here:

- every rank holds whole groups (advantages are local) and a contiguous slice of the global
  rollout batch; the N mini-batches are mini-batches of the *global* batch (one global, seeded
  shuffle), each rank holding its rows of each;
- the aggregation normalizer of a mini-batch is a sum over its rows, all-reduced, so every rank's
  loss is its share of one global objective and gradients are summed over ranks;
- every rank runs the same number of micro-batches per mini-batch (padding with a zero-weight
  one where it holds fewer rows), so FSDP's collectives line up;
- metrics are reduced with their own rule (sums, token-weighted means, min, max, counts).

Per step (docs/training.md "The loop"): pi_old is the current policy; with N = 1 its log-probs
are ``sg[logp]`` of the gradient forward, with N > 1 one no-grad forward first (it also records
the training routes R2 replays; under R3 it replays the rollout routes). Then one AdamW step per
mini-batch; micro-batches only accumulate gradients.
"""

from __future__ import annotations

import hashlib
import math

import torch

from stablerl import distributed as D
from stablerl.advantages import group_advantages
from stablerl.checkpoint import check_finite
from stablerl.config import RunConfig
from stablerl.diagnostics import first_order_gap, route_agreement_counts, route_agreement_from_counts
from stablerl.distributed.fsdp import full_state_dict, is_sharded, iter_full_tensors, set_gradient_sync, shard_model
from stablerl.forward import response_logp
from stablerl.objectives import aggregation_normalizer, policy_loss
from stablerl.rollout import RolloutBatch
from stablerl.routing import is_moe

# how each per-micro-batch metric combines over micro-batches and ranks (default: token-weighted mean)
MIN_KEYS = {"is_weight_min"}
MAX_KEYS = {"is_weight_max", "ratio_max"}
SUM_KEYS = {"n_tokens", "n_tokens_contrib", "loss"}


def derive_seed(seed: int, *parts: int) -> int:
    """A seed for (run seed, step, purpose, ...): the same on every rank and on every resume."""
    return int(hashlib.sha256(repr((seed, *parts)).encode()).hexdigest()[:15], 16)


def _can_fuse(model: torch.nn.Module) -> bool:
    # the fused AdamW kernel (one pass over all tensors) is ~3x faster than the per-tensor loop on
    # CPU for the tiny default model; it needs plain float params on CPU or CUDA
    return not is_sharded(model) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())


class Learner:
    def __init__(self, model: torch.nn.Module, cfg: RunConfig, world: D.World | None = None):
        self.cfg, self.world = cfg, world or D.World()
        self.moe = is_moe(model)
        model = model.to(self.world.device)
        if self.world.distributed:
            dist_cfg = cfg.distributed
            param_dtype = dist_cfg.param_dtype
            if param_dtype == "auto":
                param_dtype = "bf16" if self.world.device.type == "cuda" else "fp32"
            model = shard_model(model, param_dtype, dist_cfg.reduce_dtype)
        self.model = model
        self.model.train()
        opt = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opt.lr, betas=(0.9, 0.99),
                                           weight_decay=opt.weight_decay, fused=_can_fuse(self.model))
        self.optimizer_steps = 0

    def lr(self, optimizer_step: int) -> float:
        warm = self.cfg.optim.warmup_steps
        return self.cfg.optim.lr * (min(1.0, (optimizer_step + 1) / warm) if warm else 1.0)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights for exports (a collective when sharded)."""
        return full_state_dict(self.model) if is_sharded(self.model) else self.model.state_dict()

    def full_weights(self):
        """Full weights for an engine's ``load_weights``, streamed one tensor at a time (a
        collective when sharded: every rank consumes it to the end)."""
        return iter_full_tensors(self.model)

    # ---------------------------------------------------------------------------------------
    def update(self, step: int, batch: RolloutBatch, first_row: int) -> dict:
        """One RL step's update on this rank's rows ``first_row ..`` of the global rollout batch.

        Returns the step's metrics, already reduced over ranks (identical on every rank), with
        ``nonfinite: True`` when the update was skipped.
        """
        cfg = self.cfg
        N, mode, T = cfg.batch.minibatches_per_step, cfg.train.routing_replay, cfg.rollout.temperature
        B_local, K = len(batch), self.world.size
        B = B_local * K
        adv = group_advantages(batch.rewards, batch.group_ids, std_normalize=cfg.loss.std_normalize)
        acc: dict[str, list] = {}
        routes_ti = routes_stale = None  # summed route-agreement counts (train vs infer, current vs old)

        old_logp = train_routes = None
        self.model.eval()  # no dropout in the tiny models; eval() also keeps HF MoE jitter off
        with torch.no_grad():
            if N > 1:  # pi_old before any update (replayed under R3: its policy has the rollout routes)
                old = response_logp(self.model, batch, capture=self.moe and mode != "R3",
                                    replay=batch.routes if mode == "R3" else None, temperature=T)
                old_logp, train_routes = old["logp"], old.get("routes")
            if self.moe and mode == "R3":  # live training routes, for the agreement diagnostic only
                train_routes = response_logp(self.model, batch, capture=True, temperature=T)["routes"]
        if self.moe and train_routes is not None:
            routes_ti = route_agreement_counts(train_routes, batch.routes)

        order = torch.randperm(B, generator=torch.Generator().manual_seed(derive_seed(cfg.train.seed, step, 1) % 2**62))
        train_tokens = int(batch.attention_mask.sum()) * (N > 1 or (self.moe and mode == "R3"))
        skipped = False
        for k, chunk in enumerate(torch.tensor_split(order, N)):
            mine = (chunk >= first_row) & (chunk < first_row + B_local)
            rows = chunk[mine] - first_row
            micro = cfg.batch.micro_batch_size
            # every rank runs as many micro-batches as the rank holding the most rows of this mini-batch
            per_rank = torch.bincount(torch.div(chunk, B_local, rounding_mode="floor"), minlength=K)
            n_micro = max(1, max(math.ceil(int(c) / micro) for c in per_rank))
            norm = float(D.all_reduce_sum([aggregation_normalizer(
                batch.response_mask[rows], cfg.loss.aggregation, max_response_len=cfg.rollout.max_new_tokens)])[0])
            self.optimizer.zero_grad(set_to_none=True)
            bad = False
            pieces = list(rows.split(micro))
            for j in range(n_micro):
                set_gradient_sync(self.model, j == n_micro - 1)
                real = j < len(pieces)
                idx = pieces[j] if real else torch.zeros(1, dtype=torch.long)  # a zero-weight stand-in
                mb = batch.select(idx).trim()
                W = mb.input_ids.shape[1]
                replay = {"R2": None if train_routes is None else train_routes[idx][:, :W], "R3": mb.routes}.get(mode)
                capture = self.moe and replay is None and (train_routes is None or k > 0)
                out = response_logp(self.model, mb, replay=replay, capture=capture, temperature=T, with_entropy=True)
                logp, mask = out["logp"], mb.response_mask
                old = logp.detach() if old_logp is None else old_logp[idx][:, : mask.shape[1]]
                loss, m = logp.sum() * 0.0, None  # what a bad micro-batch backpropagates (no update follows)
                if not bool(torch.isfinite(logp.detach()[mask]).all()):
                    bad = True
                else:
                    try:
                        loss, m = policy_loss(logp, old, mb.rollout_logp, adv[idx], mask, cfg.loss,
                                              normalizer=max(norm, 1.0))
                    except FloatingPointError:  # the ratio overflowed: this mini-batch is skipped on every rank
                        bad = True
                # the backward runs even for a bad or stand-in micro-batch: FSDP's collectives must line up
                (loss if real else loss * 0.0).backward()
                if not real or m is None:
                    continue
                m["entropy"] = float(out["entropy"][mask].mean())
                m[f"staleness_kl/mb{k}"] = m["staleness_kl"]
                for key, v in m.items():
                    acc.setdefault(key, []).append((v, m["n_tokens"]))
                gap = first_order_gap(logp.detach(), mb.rollout_logp, mask)[mask.any(-1)]
                acc.setdefault("first_order_gap", []).append((float(gap.mean()), float(len(gap))))
                if capture and train_routes is None:  # N = 1: this forward's routes are pi_old's
                    c = route_agreement_counts(out["routes"], mb.routes)
                    routes_ti = c if routes_ti is None else routes_ti + c
                elif capture:  # a later mini-batch, routed live: current vs old training routes
                    c = route_agreement_counts(out["routes"], train_routes[idx][:, :W])
                    routes_stale = c if routes_stale is None else routes_stale + c
                train_tokens += int(mb.attention_mask.sum())
            grad_norm = self._clip_grad_norm()
            if D.any_true(bad) or not math.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                skipped = True
                break
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr(self.optimizer_steps)
            self.optimizer.step()
            self.optimizer_steps += 1
            acc.setdefault("grad_norm", []).append((grad_norm, 1.0))
        self.model.train()
        if not skipped:
            check_finite(self.model, self.optimizer)  # NonFiniteState: finite loss and gradient, broken weights
        metrics = reduce_metrics(D.all_gather_objects(acc))
        for prefix, counts in (("route_agreement/train_infer", routes_ti), ("route_agreement/stale", routes_stale)):
            if self.moe and (counts is not None or self.world.distributed):
                total = D.all_reduce_sum(counts if counts is not None else torch.zeros(2, _moe_layers(batch)))
                if total[1].sum() > 0:
                    metrics.update(route_agreement_from_counts(total, prefix))
        metrics["lr"] = self.lr(self.optimizer_steps)
        metrics["train_tokens"] = int(D.all_reduce_sum([train_tokens])[0])
        if skipped:
            metrics["nonfinite"] = True
        return metrics

    def _clip_grad_norm(self) -> float:
        """Clip the global gradient norm (over every shard on every rank); return it before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if hasattr(total, "full_tensor"):  # a DTensor: the norm of the sharded gradients, reduced
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, self.cfg.optim.grad_clip, total)
        return float(total)


def _moe_layers(batch: RolloutBatch) -> int:
    return int(batch.routes.shape[2]) if batch.routes is not None else 0


def reduce_metrics(parts: list[dict[str, list]]) -> dict[str, float]:
    """Combine ``{key: [(value, weight), ...]}`` from every rank (the same rule as within one rank)."""
    merged: dict[str, list] = {}
    for part in parts:
        for key, values in part.items():
            merged.setdefault(key, []).extend(values)
    out = {}
    for key, values in merged.items():
        if key in MIN_KEYS:
            out[key] = min(v for v, _ in values)
        elif key in MAX_KEYS:
            out[key] = max(v for v, _ in values)
        elif key in SUM_KEYS:
            out[key] = sum(v for v, _ in values)
        elif key == "grad_norm":  # the same on every rank: its mean over mini-batches
            own = parts[0].get(key, [])
            out[key] = sum(v for v, _ in own) / len(own) if own else float("nan")
        else:  # weighted mean (NaN-free entries only)
            values = [(v, w) for v, w in values if v == v]
            total = sum(w for _, w in values)
            out[key] = sum(v * w for v, w in values) / total if total else float("nan")
    return out
