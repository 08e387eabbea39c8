"""The RL loop: rollouts from mu_old, rewards, group advantages, N mini-batch updates of pi,
weight sync, diagnostics, checkpoints (DESIGN.md "Data flow").

Per step s:
  1. prompts_per_step problems (indices s*P .. s*P+P-1 of the task stream), each sampled
     group_size times by the rollout engine (its own precision) with seeds derived from (seed, s);
  2. rewards from the verifier, advantages A = R - mean_group(R);
  3. pi_old: when N = 1 the current policy *is* pi_old, so old_logp = sg[logp] from the gradient
     forward (no extra pass); when N > 1 one no-grad forward first (it also records the training
     routes that R2 replays);
  4. the rollout batch is split into N mini-batches (seeded shuffle), one optimizer step each;
     micro-batches only accumulate gradients, with the mini-batch's constant normalizer;
  5. the trained weights are synced into the engine (policy version s).
Everything random is derived from (seed, step), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from stablerl import checkpoint
from stablerl.advantages import group_advantages
from stablerl.config import RunConfig, SamplingConfig
from stablerl.diagnostics import first_order_gap, route_agreement_metrics
from stablerl.forward import response_logp
from stablerl.models import build_model, build_tokenizer, default_model_config, load_model
from stablerl.objectives import aggregation_normalizer, policy_loss
from stablerl.rollout import LocalEngine, RolloutBatch
from stablerl.routing import is_moe
from stablerl.runlog import RunLogger
from stablerl.sft import encode_prompt, run_sft, save_checkpoint_dir
from stablerl.tasks import build_task, compute_rewards


class TrainingAborted(RuntimeError):
    pass


def sft_output_dir(cfg: RunConfig) -> Path:
    if cfg.sft.output_dir:
        return Path(cfg.sft.output_dir)
    key = json.dumps([cfg.model.model_dump(), cfg.task.model_dump(exclude={"eval_size", "reward_timeout_s"}),
                      cfg.sft.model_dump(exclude={"output_dir"})], sort_keys=True)
    return Path("runs") / "sft" / hashlib.sha256(key.encode()).hexdigest()[:12]


def cold_start(cfg: RunConfig, log=print) -> Path:
    """The SFT checkpoint for ``cfg`` (trained and saved the first time, reused afterwards)."""
    out = sft_output_dir(cfg)
    if (out / "config.json").is_file():
        log(f"[cold start] reusing {out}")
        return out
    tokenizer = build_tokenizer()
    m = cfg.model
    model = build_model(default_model_config(tokenizer, hidden_size=m.hidden_size, num_layers=m.num_layers,
                                             num_experts=m.num_experts, top_k=m.top_k, expert_size=m.hidden_size),
                        seed=m.init_seed)
    log(f"[cold start] SFT of the default tiny MoE ({sum(p.numel() for p in model.parameters()):,} parameters) "
        f"for {cfg.sft.steps} steps -> {out}")
    run_sft(model, tokenizer, build_task(cfg.task), steps=cfg.sft.steps, batch_size=cfg.sft.batch_size,
            lr=cfg.sft.lr, seed=cfg.sft.seed, log=log)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint_dir(model, tokenizer, out)


def _can_fuse(model: torch.nn.Module) -> bool:
    # the fused AdamW kernel (one pass over all tensors) is ~3x faster than the per-tensor loop on
    # CPU for the tiny default model; it needs float params on CPU or CUDA
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())


def load_policy(path: Path):
    model = load_model(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, log=print):
        self.cfg, self.run_dir, self.log = cfg, Path(run_dir), log
        self.task = build_task(cfg.task)
        self.state = {"nonfinite_total": 0, "metrics_lines": 0, "reward_errors": 0, "reward_timeouts": 0}
        ckpt = checkpoint.latest(self.run_dir) if resume else None
        if resume and ckpt is None:
            raise ValueError(f"--resume {run_dir}: no complete checkpoint in {self.run_dir / 'checkpoints'}")
        source = ckpt or (Path(cfg.model.path) if cfg.model.path else cold_start(cfg, log))
        self.model, self.tokenizer = load_policy(source)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.99),
                                           weight_decay=cfg.train.weight_decay, fused=_can_fuse(self.model))
        self.step = 0
        if ckpt is not None:
            checkpoint.load_optimizer(ckpt, self.optimizer)
            self.state.update(checkpoint.load_state(ckpt))
            self.step = self.state["step"]
            checkpoint.truncate_lines(self.run_dir / "metrics.jsonl", self.state["metrics_lines"])
        self.moe = is_moe(self.model)
        tok = self.tokenizer
        self.engine = LocalEngine(self.model, cfg.rollout.precision, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
        self.engine.version = self.step
        self._eval: LocalEngine | None = None  # built on first use when eval.precision differs
        self.sampling = SamplingConfig(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                       top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens)
        self.optimizer_steps = self.step * cfg.train.minibatches_per_step

    # ---------------------------------------------------------------------------------------
    def _seed(self, *parts: int) -> int:
        return int(hashlib.sha256(repr((self.cfg.train.seed, *parts)).encode()).hexdigest()[:15], 16)

    def decode(self, batch: RolloutBatch) -> list[str]:
        return [self.tokenizer.decode(batch.response_ids[i][batch.response_mask[i]], skip_special_tokens=True)
                for i in range(len(batch))]

    def rollout(self, step: int) -> tuple[RolloutBatch, dict]:
        P, G = self.cfg.train.prompts_per_step, self.cfg.train.group_size
        problems = [self.task.train_problem(step * P + i) for i in range(P)]
        prompts = [encode_prompt(self.tokenizer, p.prompt) for p in problems for _ in range(G)]
        base = self._seed(step, 0)
        batch = self.engine.generate(prompts, self.sampling, seeds=[(base + j) % 2**62 for j in range(P * G)],
                                     capture_routes=self.moe)
        rewards, stats = compute_rewards(self.task, self.decode(batch), [p for p in problems for _ in range(G)],
                                         timeout_s=self.cfg.task.reward_timeout_s)
        batch.rewards = torch.tensor(rewards)
        batch.group_ids = torch.arange(P).repeat_interleave(G)
        self.state["reward_errors"] += stats.errors
        self.state["reward_timeouts"] += stats.timeouts
        if stats.errors and stats.first_error:
            self.log(f"[reward] step {step}: {stats.errors} verifier errors (reward 0), e.g. {stats.first_error}")
        per_group = batch.rewards.view(P, G)
        metrics = {
            "reward_mean": float(batch.rewards.mean()), "reward_std": float(batch.rewards.std()),
            "groups_all_correct": float((per_group.min(1).values == 1).float().mean()),
            "groups_all_wrong": float((per_group.max(1).values == 0).float().mean()),
            "response_len_mean": float(batch.response_lengths.float().mean()),
            "finished_frac": float(batch.finished.float().mean()),
            "reward_errors": stats.errors, "reward_timeouts": stats.timeouts,
        }
        return batch, metrics

    # ---------------------------------------------------------------------------------------
    def update(self, step: int, batch: RolloutBatch) -> dict:
        cfg = self.cfg
        N, mode, T = cfg.train.minibatches_per_step, cfg.train.routing_replay, cfg.rollout.temperature
        adv = group_advantages(batch.rewards, batch.group_ids, std_normalize=cfg.train.std_normalize)
        metrics: dict = {}
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
            metrics.update(route_agreement_metrics(train_routes, batch.routes, "route_agreement/train_infer"))

        order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(self._seed(step, 1) % 2**62))
        acc: dict[str, list] = {}
        train_tokens = int(batch.attention_mask.sum()) * (N > 1 or (self.moe and mode == "R3"))
        for k, rows in enumerate(torch.tensor_split(order, N)):
            norm = aggregation_normalizer(batch.response_mask[rows], cfg.loss.aggregation,
                                          max_response_len=cfg.rollout.max_new_tokens)
            self.optimizer.zero_grad(set_to_none=True)
            finite = True
            for micro in rows.split(cfg.train.micro_batch_size):
                mb = batch.select(micro).trim()
                W = mb.input_ids.shape[1]
                replay = {"R2": None if train_routes is None else train_routes[micro][:, :W],
                          "R3": mb.routes}.get(mode)
                capture = self.moe and replay is None and (train_routes is None or k > 0)
                out = response_logp(self.model, mb, replay=replay, capture=capture, temperature=T, with_entropy=True)
                logp, mask = out["logp"], mb.response_mask
                if not bool(torch.isfinite(logp.detach()[mask]).all()):
                    finite = False
                    break
                old = logp.detach() if old_logp is None else old_logp[micro][:, : mask.shape[1]]
                try:
                    loss, m = policy_loss(logp, old, mb.rollout_logp, adv[micro], mask, cfg.loss, normalizer=norm)
                except FloatingPointError:
                    finite = False
                    break
                loss.backward()
                m["entropy"] = float(out["entropy"][mask].mean())
                m["first_order_gap"] = float(first_order_gap(logp.detach(), mb.rollout_logp, mask)[mask.any(-1)].mean())
                m[f"staleness_kl/mb{k}"] = m["staleness_kl"]
                if capture and train_routes is None:  # N = 1: this forward's routes are pi_old's
                    m.update(route_agreement_metrics(out["routes"], mb.routes, "route_agreement/train_infer"))
                elif capture:  # a later mini-batch, routed live: current vs old training routes
                    m.update(route_agreement_metrics(out["routes"], train_routes[micro][:, :W], "route_agreement/stale"))
                for key, v in m.items():
                    acc.setdefault(key, []).append((v, m["n_tokens"]))
                train_tokens += int(mb.attention_mask.sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
            if not finite or not bool(torch.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)
                metrics["nonfinite"] = True
                break
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr(self.optimizer_steps)
            self.optimizer.step()
            self.optimizer_steps += 1
            acc.setdefault("grad_norm", []).append((float(grad_norm), 1.0))
        self.model.train()
        for key, values in acc.items():
            if key in ("is_weight_min",):
                metrics[key] = min(v for v, _ in values)
            elif key in ("is_weight_max", "ratio_max"):
                metrics[key] = max(v for v, _ in values)
            elif key in ("n_tokens", "n_tokens_contrib", "loss"):
                metrics[key] = sum(v for v, _ in values)
            else:  # token-weighted mean over micro-batches (NaN-free entries only)
                values = [(v, w) for v, w in values if v == v]
                total = sum(w for _, w in values)
                metrics[key] = sum(v * w for v, w in values) / total if total else float("nan")
        metrics["lr"] = self.lr(self.optimizer_steps)
        metrics["train_tokens"] = train_tokens
        return metrics

    def lr(self, optimizer_step: int) -> float:
        warm = self.cfg.train.warmup_steps
        return self.cfg.train.lr * (min(1.0, (optimizer_step + 1) / warm) if warm else 1.0)

    def _eval_engine(self) -> LocalEngine:
        """The rollout engine itself when the precisions agree (its weights are current), else one
        cached engine in ``eval.precision`` synced to the policy: no weight copy built per eval."""
        if self.cfg.eval.precision == self.cfg.rollout.precision:
            return self.engine
        if self._eval is None:
            self._eval = LocalEngine(self.model, self.cfg.eval.precision, eos_token_id=self.tokenizer.eos_token_id,
                                     pad_token_id=self.tokenizer.pad_token_id)
        else:
            self._eval.load_weights(self.model.state_dict(), version=self.engine.version)
        return self._eval

    # ---------------------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict:
        """Held-out accuracy, greedy and sampled, with an engine in ``eval.precision``."""
        cfg = self.cfg
        problems = self.task.eval_problems()
        engine = self._eval_engine()
        prompts = [encode_prompt(self.tokenizer, p.prompt) for p in problems]
        out = {}
        modes = [("greedy", 0.0)] * cfg.eval.greedy + [("sampled", cfg.rollout.temperature)] * cfg.eval.sampled
        for name, temperature in modes:
            n = cfg.eval.samples if name == "sampled" else 1
            sampling = self.sampling.model_copy(update={"temperature": temperature})
            seeds = [self._seed(step, 2, i) % 2**62 for i in range(len(prompts) * n)]
            batch = engine.generate([p for p in prompts for _ in range(n)], sampling, seeds=seeds,
                                    capture_routes=False)
            rewards, _ = compute_rewards(self.task, self.decode(batch), [p for p in problems for _ in range(n)],
                                         timeout_s=cfg.task.reward_timeout_s)
            per_problem = [sum(rewards[i * n:(i + 1) * n]) / n for i in range(len(problems))]
            out[f"eval/{name}_acc"] = sum(per_problem) / len(per_problem)
            levels = sorted({p.level for p in problems if p.level})
            for lv in levels if len(levels) > 1 else []:
                sel = [r for r, p in zip(per_problem, problems) if p.level == lv]
                out[f"eval/{name}_acc/level_{lv}"] = sum(sel) / len(sel)
        return out

    # ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(cfg.model_dump_json(indent=1))
        logger = RunLogger(self.run_dir, cfg.log, cfg.train.steps, self.step)
        nonfinite_streak = 0
        try:
            if self.step == 0:
                initial = self.evaluate(0)
                self.state["initial_eval"] = initial
                logger.log_step(0, initial)
                self.state["metrics_lines"] += 1
            while self.step < cfg.train.steps:
                step = self.step + 1
                t0 = time.perf_counter()
                batch, metrics = self.rollout(step)
                t1 = time.perf_counter()
                metrics.update(self.update(step, batch))
                t2 = time.perf_counter()
                skipped = metrics.pop("nonfinite", False)
                if skipped:
                    nonfinite_streak += 1
                    self.state["nonfinite_total"] += 1
                    logger.print(f"[yellow]step {step}: non-finite loss or gradient, update skipped "
                                 f"({nonfinite_streak} in a row)[/yellow]")
                    if nonfinite_streak >= cfg.train.max_nonfinite_steps:
                        last = checkpoint.latest(self.run_dir)
                        raise TrainingAborted(
                            f"{nonfinite_streak} non-finite steps in a row (train.max_nonfinite_steps="
                            f"{cfg.train.max_nonfinite_steps}); stopping. The last good checkpoint is "
                            f"{last or '(none yet)'}; lower train.lr or enable clipping, then --resume.")
                else:
                    nonfinite_streak = 0
                self.engine.load_weights(self.model.state_dict(), version=step)
                if step % cfg.eval.every == 0 or step == cfg.train.steps:
                    metrics.update(self.evaluate(step))
                n_resp_tokens = int(batch.response_mask.sum())
                metrics.update({
                    "nonfinite_total": self.state["nonfinite_total"], "policy_version": step,
                    "step_time": time.perf_counter() - t0, "rollout_time": t1 - t0, "train_time": t2 - t1,
                    "rollout_tokens_per_s": n_resp_tokens / max(t1 - t0, 1e-9),
                    "train_tokens_per_s": metrics["train_tokens"] / max(t2 - t1, 1e-9),
                })
                logger.log_step(step, metrics)
                self.state["metrics_lines"] += 1
                self.step = step
                # a skipped step is not checkpointed: the last checkpoint stays the last good state
                if not skipped and (step % cfg.checkpoint.every == 0 or step == cfg.train.steps):
                    checkpoint.save(self.run_dir, step, self.model, self.tokenizer, self.optimizer, self.state,
                                    cfg.checkpoint.keep_last)
        finally:
            logger.close()
        return self.state


def summarize(run_dir: Path) -> dict:
    from stablerl.runlog import read_metrics

    rows = read_metrics(run_dir)
    evals = [r for r in rows if "eval/greedy_acc" in r or "eval/sampled_acc" in r]
    first, last = evals[0], evals[-1]
    out = {"run_dir": str(run_dir), "steps": rows[-1]["step"]}
    for mode in ("greedy", "sampled"):
        key = f"eval/{mode}_acc"
        if key in first and key in last:
            out[f"{mode}_before"], out[f"{mode}_after"] = first[key], last[key]
    return out


def fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x == x and not math.isinf(x) else "n/a"
