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
- metrics are reduced with the rule their producer declares (``stablerl.metrics.Reduce``).

One step's update, in the order ``Learner.update`` runs it (docs/training.md "The loop"):

1. ``_old_pass``: pi_old's log-probs before any update (N > 1; with N = 1 they are ``sg[logp]``
   of the gradient forward) and the routes the routing plan records (``replay.RoutingPlan``);
2. ``_minibatches``: the seeded split of the rollout batch into N mini-batches;
3. per mini-batch, ``_micro_step`` over its micro-batches (forward, loss, backward: gradients
   accumulate), then ``_optimizer_step`` (clip, learning rate, AdamW) — or nothing, on every
   rank, when any rank saw a non-finite loss or gradient, or (``optim.skip_empty_steps``) when no
   rank holds a non-zero advantage in the mini-batch.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from stablerl import distributed as D
from stablerl import metrics as M
from stablerl.advantages import group_advantages
from stablerl.checkpoint import check_finite
from stablerl.config import RunConfig
from stablerl.corrections import m2_tokens
from stablerl.diagnostics import first_order_gap, route_agreement_counts, route_agreement_from_counts
from stablerl.distributed.fsdp import (
    full_state_dict,
    is_sharded,
    iter_full_tensors,
    set_gradient_sync,
    shard_from_rank0,
)
from stablerl.forward import compile_router_free_parts, enable_activation_checkpointing, micro_batches, response_logp
from stablerl.learning_signal import has_signal
from stablerl.lora import adapters_off, is_lora, lora_policy, merged_weights, trainable_parameters
from stablerl.models import build_model, is_moe
from stablerl.objectives import METRIC_REDUCTION, aggregation_normalizer, policy_loss
from stablerl.optimizer import adamw, learning_rate
from stablerl.replay import RoutingPlan
from stablerl.rollout import RolloutBatch
from stablerl.seeds import shuffle_seed

# the learner's own metrics (policy_loss declares its own: objectives.METRIC_REDUCTION)
REDUCTION = {**METRIC_REDUCTION, M.GRAD_NORM: M.Reduce.SAME}


@dataclass
class OldPolicy:
    """pi_old of one step: its log-probs (None: the gradient forward of mini-batch 0 gives them,
    N = 1) and the training routes it took (R2 replays them; diagnostics compare with them)."""

    logp: torch.Tensor | None = None
    routes: torch.Tensor | None = None


@dataclass
class MiniBatch:
    k: int  # 0-based index in the step
    rows: torch.Tensor  # this rank's rows of it (indices into its slice of the rollout batch)
    first_row: int  # this rank's first row in the global rollout batch
    pieces: list[torch.Tensor]  # this rank's micro-batches of it (row indices, as ``rows``)
    n_micro: int  # micro-batches every rank runs for it (the most any rank needs)
    normalizer: float  # the aggregation's denominator over the whole mini-batch, all ranks


@dataclass
class StepRecord:
    """What one step's update measured, before reduction over ranks."""

    values: dict[str, list] = field(default_factory=dict)  # key -> [(value, weight), ...]
    routes: dict[str, torch.Tensor] = field(default_factory=dict)  # "train_infer"/"stale" -> counts
    train_tokens: int = 0
    seq_log_w: list[float] = field(default_factory=list)  # per response: sum_t log pi_old - log mu

    def add(self, key: str, value: float, weight: float) -> None:
        self.values.setdefault(key, []).append((value, weight))

    def add_routes(self, which: str, counts: torch.Tensor) -> None:
        self.routes[which] = counts if which not in self.routes else self.routes[which] + counts


class Learner:
    def __init__(
        self,
        model: torch.nn.Module,
        cfg: RunConfig,
        world: D.World | None = None,
        reference: torch.nn.Module | None = None,
    ):
        self.cfg, self.world = cfg, world or D.World()
        self.moe = is_moe(model)
        self.plan = RoutingPlan.of(cfg, self.moe)
        self.model_config = model.config
        dtype = cfg.train.dtype
        self.dtype = ("bf16" if self.world.device.type == "cuda" else "fp32") if dtype == "auto" else dtype
        self.base_digest = None  # model.lora: the frozen base's fingerprint (checkpoints name it)
        if cfg.model.lora.enabled:
            model, self.base_digest = lora_policy(model, cfg.model.lora, cfg.train.seed, self.dtype)
        if cfg.train.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.model = self._place(model)
        if cfg.train.compile:
            compile_router_free_parts(self.model)
        self.model.train()
        # the frozen reference of the KL penalty (loss.kl_beta): one more model copy, sharded alike;
        # with LoRA the base itself, adapters off (no copy)
        self.lora = is_lora(model)
        self.reference = None
        if cfg.loss.kl_beta > 0 and not self.lora:
            if reference is None:
                raise ValueError("loss.kl_beta > 0 needs the reference policy (the run's starting weights)")
            self.reference = self._place(reference.eval().requires_grad_(False))
        self.optimizer = adamw(trainable_parameters(self.model), cfg.optim, fused=not is_sharded(self.model))
        self.optimizer_steps = 0
        self.steps_skipped = 0  # mini-batches of the current step that took no optimizer step

    def _place(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` on this rank's device, sharded over the learner ranks when there are several."""
        if not self.world.distributed:
            return model.to(self.world.device)
        # several ranks: FSDP2 computes in the unsharded parameters' dtype and keeps fp32 shards.
        # Only learner rank 0 holds the weights (the others pass a meta-device skeleton) and
        # sends each rank its shards
        if self.world.is_main:
            model = model.to(self.world.device)
        return shard_from_rank0(model, self.dtype, self.cfg.distributed.reduce_dtype, self.world.device)

    def _logp(self, model: torch.nn.Module, part: RolloutBatch, **kwargs) -> dict[str, torch.Tensor]:
        """``forward.response_logp`` in the training dtype: bf16 on one rank is autocast (fp32
        weights, bf16 matmuls; the log-softmax stays fp32), on several FSDP2's param_dtype."""
        bf16 = self.dtype == "bf16" and not is_sharded(model)
        with torch.autocast(self.world.device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            if not self.cfg.batch.packing:
                return response_logp(model, part, **kwargs)
            return self._packed_logp(model, part, **kwargs)

    def _packed_logp(
        self, model: torch.nn.Module, part: RolloutBatch, replay: torch.Tensor | None = None, **kwargs
    ) -> dict[str, torch.Tensor]:
        """Packed forwards of at most ``batch.max_tokens_per_micro_batch`` real tokens each: a
        gradient forward is one micro-batch already; a no-grad pass over a whole batch (pi_old,
        the diagnostics) is cut the same way and its outputs put back in row order."""
        pieces = micro_batches(
            torch.arange(len(part)),
            part.response_lengths,
            part.prompt_width,
            len(part),
            self.cfg.batch.max_tokens_per_micro_batch,
            prompt_lengths=_prompt_lengths(part),
        )
        if len(pieces) == 1:
            return response_logp(model, part, replay=replay, packed=True, **kwargs)
        outs = [
            response_logp(
                model, part.select(rows), replay=None if replay is None else replay[rows], packed=True, **kwargs
            )
            for rows in pieces
        ]
        return {key: torch.cat([o[key] for o in outs]) for key in outs[0]}

    def lr(self, optimizer_step: int) -> float:
        return learning_rate(optimizer_step, self.cfg.optim, self.cfg.train.steps * self.cfg.batch.minibatches_per_step)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights for exports (a collective when sharded)."""
        return full_state_dict(self.model) if is_sharded(self.model) else self.model.state_dict()

    def full_weights(self):
        """Full weights for an engine's ``load_weights``, streamed one tensor at a time (a
        collective when sharded: every rank consumes it to the end)."""
        stream = iter_full_tensors(self.model)
        return merged_weights(self.model, stream) if self.lora else stream

    def export_model(self) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        """An unsharded model object to call ``save_pretrained`` on, and the full weights to save
        with it (a collective when sharded)."""
        weights = self.full_state_dict()
        if self.lora:  # the LoRA model's own tensors: lora.export_lora writes the adapter from them
            return self.model, weights
        return (build_model(self.model_config) if is_sharded(self.model) else self.model), weights

    # ---------------------------------------------------------------------------------------
    def update(self, step: int, batch: RolloutBatch, first_row: int) -> dict:
        """One RL step's update on this rank's rows ``first_row ..`` of the global rollout batch.

        Returns the step's metrics, already reduced over ranks (identical on every rank), with
        ``nonfinite: True`` when the update was skipped.
        """
        if batch.sampling is None:
            raise ValueError(
                "the rollout batch does not say how it was sampled (RolloutBatch.sampling); sample "
                "it with stablerl.generation.sample_and_score"
            )
        adv = group_advantages(batch.rewards, batch.group_ids, std_normalize=self.cfg.loss.std_normalize)
        record = StepRecord()
        self.steps_skipped = 0
        self.model.eval()  # no dropout in the tiny models; eval() also keeps HF MoE jitter off
        old = self._old_pass(batch, record)
        skipped = False
        for mb in self._minibatches(step, batch, first_row):
            if not self._minibatch(mb, batch, adv, old, record):
                skipped = True  # on every rank: the others saw the same flag
                break
        self.model.train()
        if not skipped:
            check_finite(self.model, self.optimizer)  # NonFiniteState: finite loss and gradient, broken weights
        return self._step_metrics(record, batch, skipped)

    def _old_pass(self, batch: RolloutBatch, record: StepRecord) -> OldPolicy:
        """pi_old before any update, as the routing plan says (no gradient)."""
        old = OldPolicy()
        temperature = batch.sampling.temperature
        plan = self.plan.old_pass()
        with torch.no_grad():
            if plan is not None:
                out = self._logp(
                    self.model,
                    batch,
                    capture=plan.capture is not None,
                    replay=plan.routes(None, None, batch.routes, batch.input_ids.shape[1]),
                    temperature=temperature,
                )
                old.logp, old.routes = out["logp"], out.get("routes")
            if self.plan.diagnostic_pass:
                old.routes = self._logp(self.model, batch, capture=True, temperature=temperature)["routes"]
        if self.moe and old.routes is not None:
            record.add_routes("train_infer", route_agreement_counts(old.routes, batch.routes))
        if plan is not None or self.plan.diagnostic_pass:
            record.train_tokens += int(batch.attention_mask.sum())
        return old

    def _minibatches(self, step: int, batch: RolloutBatch, first_row: int):
        """The N mini-batches of the global rollout batch (one seeded shuffle, the same on every
        rank), each as this rank's rows of it."""
        B_local, K, N = len(batch), self.world.size, self.cfg.batch.minibatches_per_step
        micro, max_tokens = self.cfg.batch.micro_batch_size, self.cfg.batch.max_tokens_per_micro_batch
        order = torch.randperm(
            B_local * K, generator=torch.Generator().manual_seed(shuffle_seed(self.cfg.train.seed, step))
        )
        lengths = batch.response_lengths
        prompt_lengths = _prompt_lengths(batch) if self.cfg.batch.packing else None
        for k, chunk in enumerate(torch.tensor_split(order, N)):
            rows = chunk[(chunk >= first_row) & (chunk < first_row + B_local)] - first_row
            if max_tokens is not None:  # similar lengths share a micro-batch: less padding (same update)
                rows = rows[torch.argsort(lengths[rows], descending=True, stable=True)]
            pieces = micro_batches(rows, lengths, batch.prompt_width, micro, max_tokens, prompt_lengths=prompt_lengths)
            # every rank runs as many micro-batches as the rank that needs the most for this mini-batch
            if max_tokens is None:  # known without asking: it follows from the global shuffle
                per_rank = torch.bincount(torch.div(chunk, B_local, rounding_mode="floor"), minlength=K)
                n_micro = max(1, max(math.ceil(int(c) / micro) for c in per_rank))
            else:
                n_micro = max(1, int(D.all_reduce_max([len(pieces)])[0]))
            norm = float(
                D.all_reduce_sum(
                    [
                        aggregation_normalizer(
                            batch.response_mask[rows],
                            self.cfg.loss.aggregation,
                            max_response_len=batch.sampling.max_new_tokens,
                        )
                    ]
                )[0]
            )
            yield MiniBatch(k, rows, first_row, pieces, n_micro, norm)

    def _minibatch(
        self, mb: MiniBatch, batch: RolloutBatch, adv: torch.Tensor, old: OldPolicy, record: StepRecord
    ) -> bool:
        """Accumulate the mini-batch's gradient over its micro-batches, then one optimizer step;
        False (and no step) when any rank saw a non-finite loss or gradient."""
        m2 = self._m2_mask(mb, batch, old) if self.cfg.loss.m2_threshold is not None else None
        self.optimizer.zero_grad(set_to_none=True)
        bad = False
        for j in range(mb.n_micro):
            set_gradient_sync(self.model, j == mb.n_micro - 1)
            real = j < len(mb.pieces)
            idx = mb.pieces[j] if real else torch.zeros(1, dtype=torch.long)  # a zero-weight stand-in
            bad |= not self._micro_step(mb, idx, real, batch, adv, old, record, m2)
        grad_norm = self._clip_grad_norm()
        if D.any_true(bad) or not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        record.add(M.GRAD_NORM, grad_norm, 1.0)
        if self._without_signal(mb, batch, adv):
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer_steps += 1  # the schedule counts mini-batches, taken or skipped
            self.steps_skipped += 1
            return True
        self._optimizer_step()
        return True

    def _without_signal(self, mb: MiniBatch, batch: RolloutBatch, adv: torch.Tensor) -> bool:
        """``optim.skip_empty_steps``: no rank holds a non-zero advantage in the mini-batch (a
        gradient of exactly zero) and no KL penalty pulls the weights: the same answer on every rank."""
        if not self.cfg.optim.skip_empty_steps or self.cfg.loss.kl_beta > 0:
            return False
        return not D.any_true(has_signal(adv[mb.rows], batch.response_mask[mb.rows]))

    def _m2_mask(self, mb: MiniBatch, batch: RolloutBatch, old: OldPolicy) -> torch.Tensor:
        """M2PO's token mask ``[B_local, R]`` for this rank's rows of mini-batch ``mb``, decided over
        the whole mini-batch on every rank (``corrections.m2_tokens`` on the rows in global order),
        so it depends on neither the micro-batch size nor the rank count. pi_theta is the policy at
        the start of the mini-batch's step: pi_old's log-probs at k = 0 when the pi_old pass made
        them, else one no-grad forward routed as the gradient forward will be."""
        R = batch.response_mask.shape[1]
        if mb.k == 0 and old.logp is not None:
            logp = old.logp[mb.rows]
        else:
            part = batch.select(mb.rows).trim()
            replay = self.plan.minibatch(mb.k).routes(old.routes, mb.rows, part.routes, part.input_ids.shape[1])
            with torch.no_grad():
                logp = self._logp(self.model, part, replay=replay, temperature=batch.sampling.temperature)["logp"]
            logp = torch.nn.functional.pad(logp, (0, R - logp.shape[1]))
        parts = D.all_gather_objects(
            (mb.rows + mb.first_row, logp, batch.rollout_logp[mb.rows], batch.response_mask[mb.rows])
        )
        width = max(p[1].shape[1] for p in parts)
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
        rows = torch.cat([p[0] for p in parts])
        order = torch.argsort(rows)
        drop = m2_tokens(
            torch.cat([pad(p[1]) for p in parts])[order],
            torch.cat([pad(p[2]) for p in parts])[order],
            torch.cat([pad(p[3]) for p in parts])[order],
            self.cfg.loss.m2_threshold,
        )
        mine = drop[torch.argsort(order)][torch.isin(rows, mb.rows + mb.first_row)]  # back to this rank's order
        full = torch.zeros_like(batch.response_mask)
        full[mb.rows] = mine[:, :R]
        return full

    def _micro_step(
        self,
        mb: MiniBatch,
        idx: torch.Tensor,
        real: bool,
        batch: RolloutBatch,
        adv: torch.Tensor,
        old: OldPolicy,
        record: StepRecord,
        m2: torch.Tensor | None = None,
    ) -> bool:
        """Forward, loss and backward of the rows ``idx``; False when the loss was not finite.

        The backward runs even for a bad or stand-in micro-batch (with a zero loss): FSDP's
        collectives must line up on every rank."""
        micro = batch.select(idx).trim()
        plan = self.plan.minibatch(mb.k)
        replay = plan.routes(old.routes, idx, micro.routes, micro.input_ids.shape[1])
        out = self._logp(
            self.model,
            micro,
            replay=replay,
            capture=plan.capture is not None,
            temperature=batch.sampling.temperature,
            with_entropy=True,
        )
        logp, mask = out["logp"], micro.response_mask
        if self.cfg.loss.proximal == "rollout":  # the bypass: pi_old := mu
            old_logp = micro.rollout_logp
        else:
            old_logp = logp.detach() if old.logp is None else old.logp[idx][:, : mask.shape[1]]
        ref_logp = None
        if self.reference is not None or (self.lora and self.cfg.loss.kl_beta > 0):
            # the reference routes live: it is the starting policy as it was
            with torch.no_grad(), adapters_off(self.model) if self.lora else nullcontext():
                reference = self.model if self.lora else self.reference
                ref_logp = self._logp(reference, micro, temperature=batch.sampling.temperature)["logp"]
        loss, m = logp.sum() * 0.0, None  # what a bad micro-batch backpropagates (no update follows)
        finite = bool(torch.isfinite(logp.detach()[mask]).all())
        if finite:
            try:
                loss, m = policy_loss(
                    logp,
                    old_logp,
                    micro.rollout_logp,
                    adv[idx],
                    mask,
                    self.cfg.loss,
                    normalizer=max(mb.normalizer, 1.0),
                    m2_mask=None if m2 is None else m2[idx][:, : mask.shape[1]],
                    ref_logp=ref_logp,
                )
            except FloatingPointError:  # the ratio overflowed: this mini-batch is skipped on every rank
                finite = False
        (loss if real else loss * 0.0).backward()
        if real and finite:  # every response is in exactly one mini-batch: recorded once per step
            record.seq_log_w += ((old_logp.detach() - micro.rollout_logp) * mask).sum(-1).tolist()
        if real and m is not None:
            self._record(mb, micro, out, m, plan.capture, old.routes, idx, record)
        return finite

    def _record(
        self,
        mb: MiniBatch,
        micro: RolloutBatch,
        out: dict,
        m: dict,
        capture: str | None,
        old_routes: torch.Tensor | None,
        idx: torch.Tensor,
        record: StepRecord,
    ) -> None:
        mask = micro.response_mask
        m[M.ENTROPY] = float(out["entropy"][mask].mean())
        m[f"{M.STALENESS_KL}/mb{mb.k}"] = m[M.STALENESS_KL]
        for key, v in m.items():  # each value weighted by what it was measured on
            record.add(key, v, m["n_responses"] if REDUCTION.get(key) is M.Reduce.RESPONSE_MEAN else m["n_tokens"])
        gap = first_order_gap(out["logp"].detach(), micro.rollout_logp, mask)[mask.any(-1)]
        record.add(M.FIRST_ORDER_GAP, float(gap.mean()), float(len(gap)))
        if capture == "train_infer":  # this forward's routes are pi_old's (N = 1)
            record.add_routes("train_infer", route_agreement_counts(out["routes"], micro.routes))
        elif capture == "stale":  # a later mini-batch, routed live: current vs old training routes
            W = micro.input_ids.shape[1]
            record.add_routes("stale", route_agreement_counts(out["routes"], old_routes[idx][:, :W]))
        record.train_tokens += int(micro.attention_mask.sum())

    def _optimizer_step(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(self.optimizer_steps)
        self.optimizer.step()
        self.optimizer_steps += 1

    def _step_metrics(self, record: StepRecord, batch: RolloutBatch, skipped: bool) -> dict:
        """The step's metrics, reduced over ranks by each metric's declared rule."""
        metrics = M.reduce_metrics(D.all_gather_objects(record.values), REDUCTION)
        for which, name in (("train_infer", M.ROUTE_TRAIN_INFER), ("stale", M.ROUTE_STALE)):
            counts = record.routes.get(which)
            if self.moe and (counts is not None or self.world.distributed):
                total = D.all_reduce_sum(counts if counts is not None else torch.zeros(2, _moe_layers(batch)))
                if total[1].sum() > 0:
                    metrics.update(route_agreement_from_counts(total, name))
        seq = torch.tensor([x for part in D.all_gather_objects(record.seq_log_w) for x in part], dtype=torch.float64)
        if len(seq):
            metrics.update(
                {
                    M.SEQ_LOG_W_MEAN: float(seq.mean()),
                    M.SEQ_LOG_W_P01: float(torch.quantile(seq, 0.01)),
                    M.SEQ_LOG_W_P05: float(torch.quantile(seq, 0.05)),
                    M.SEQ_LOG_W_MIN: float(seq.min()),
                }
            )
        metrics["lr"] = self.lr(self.optimizer_steps)
        metrics[M.STEPS_SKIPPED] = self.steps_skipped  # decided on every rank alike
        metrics[M.TRAIN_TOKENS] = int(D.all_reduce_sum([record.train_tokens])[0])
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


def _prompt_lengths(batch: RolloutBatch) -> torch.Tensor:
    """Each row's real prompt tokens (the prompt is left-padded to ``prompt_width``)."""
    return batch.attention_mask[:, : batch.prompt_width].sum(-1)


def _moe_layers(batch: RolloutBatch) -> int:
    return int(batch.routes.shape[2]) if batch.routes is not None else 0
