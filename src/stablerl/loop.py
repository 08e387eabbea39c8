"""The RL loop, one step top to bottom (docs/design.md "Data flow"):

    rollout -> reward -> advantages -> learner update -> weight sync -> evaluation -> log -> checkpoint

Per step s, on each of K ranks (K = 1 without torchrun):
  1. this rank's share of the step's prompts (indices s*P .. s*P+P-1 of the task stream, dealt to
     ranks in whole groups), each sampled group_size times by the rank's rollout engine, with a
     seed per response derived from (seed, s, global response index) — not from the rank;
  2. rewards from the reward pool (worker processes), advantages A = R - mean_group(R);
  3. the learner's N-mini-batch update (learner.py);
  4. the trained weights gathered and loaded into the engine (policy version s);
  5. held-out evaluation every ``eval.every`` steps, split across ranks;
  6. metrics reduced over ranks and written once, by rank 0; a checkpoint every
     ``checkpoint.every`` steps, an HF export every ``checkpoint.export_every`` and at the end.
Everything random is a function of (seed, step, global index), so a resumed run repeats an
uninterrupted one, and a K-rank run the 1-rank run, up to the order of floating-point sums.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from stablerl import checkpoint
from stablerl import distributed as D
from stablerl import metrics as M
from stablerl.config import RunConfig
from stablerl.diagnostics import k3
from stablerl.evaluation import build_eval_sets, evaluate
from stablerl.forward import response_logp
from stablerl.generation import sample_and_score
from stablerl.learner import Learner
from stablerl.models import build_model, is_moe, load_model, load_policy, model_skeleton
from stablerl.pipeline import LaggedWeights, initial_versions, send_version
from stablerl.preflight import check_compiler, check_memory, check_prompts
from stablerl.rollout import LocalEngine, RolloutBatch, RolloutEngine, build_engine, concat
from stablerl.rundir import RunDir, RunLock, RunLocked, RunState, append_line, record_config, saved_changes
from stablerl.runlog import RunLogger, check_wandb, replay_history, write_summary
from stablerl.seeds import eval_seed, rollout_seeds
from stablerl.sft import cold_start, sft_output_dir
from stablerl.tasks import build_task, reward_pool
from stablerl.tasks.reward import RewardStats


class TrainingAborted(RuntimeError):
    pass


class RankStopped(TrainingAborted):
    """A collective failed: a rank died, hung or was stopped. Every rank that sees it reports it
    (rank 0 may be the one that stopped)."""


def check_layout(cfg: RunConfig, world: D.World) -> None:
    """The rollout batch must deal out to the ranks in whole groups: fail before any work."""
    P, K, R = cfg.batch.prompts_per_step, world.size, cfg.rollout.workers
    if P % K:
        raise ValueError(
            f"batch.prompts_per_step={P} does not divide by the {K} ranks (the learner ranks: "
            "WORLD_SIZE less rollout.workers): each rank trains whole groups; use a multiple of them"
        )
    if R and P % R:
        raise ValueError(
            f"batch.prompts_per_step={P} does not divide by rollout.workers={R}: each worker samples "
            "whole groups; use a multiple of the number of workers"
        )


def check_model(cfg: RunConfig, model) -> list[str]:
    """Errors for settings that cannot work on this model; warnings for those that do nothing."""
    mode, warnings = cfg.train.routing_replay, []
    if mode != "none" and not is_moe(model):
        raise ValueError(
            f"train.routing_replay={mode} needs a Mixture-of-Experts model, but "
            f"{model.config.model_type!r} is dense; use train.routing_replay=none"
        )
    if mode == "R2" and cfg.batch.minibatches_per_step == 1:
        warnings.append(
            "train.routing_replay=R2 does nothing on-policy (batch.minibatches_per_step=1): it replays "
            "pi_old's routes, which the gradient forward takes anyway; use R3 to replay the rollout's"
        )
    return warnings


class Trainer:
    """One run in ``run_dir``: the loop above, checkpoints and resume, on every rank."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, log=print, world: D.World | None = None):
        self.cfg, self.run_dir, self.world = cfg, Path(run_dir), world or D.World()
        self.files = RunDir(run_dir)
        self.log = log if self.world.is_main else (lambda *_: None)
        check_layout(cfg, self.world)
        check_wandb(cfg.log)
        # the task and the reward functions first: bad data or a bad import path fails before
        # anything is written (not even the run directory)
        self.task = build_task(cfg.task)
        self.rewards = reward_pool(self.task, cfg.task)
        try:
            self.eval_sets = build_eval_sets(cfg, self.rewards)
        except BaseException:
            self.rewards.close()
            raise
        created = not self.run_dir.exists()
        try:
            self.lock = self._lock()
            self._setup(resume)
        except BaseException:
            if created and getattr(self, "lock", None) is not None:  # leave no empty run directory behind
                self._discard_run_dir()
            self.close()
            raise

    def _lock(self) -> RunLock | None:
        error, lock = "", None
        if self.world.is_main:
            try:
                lock = RunLock(self.run_dir).acquire()
            except RunLocked as e:
                error = str(e)
        error = D.broadcast_object(error)
        if error:
            raise RunLocked(error)
        return lock

    def _setup(self, resume: bool) -> None:
        cfg, world = self.cfg, self.world
        check_compiler(cfg, world.device)
        for w in getattr(self.task, "warnings", []):
            self.log(f"[warning] {w}")
        self.state = RunState()
        self.changes: dict = {}
        ckpt = None
        if resume:
            self.changes = saved_changes(self.run_dir, cfg)
            ckpt, damaged = checkpoint.latest_good(self.run_dir)
            for w in damaged:
                self.log(f"[warning] {w}")
            if ckpt is None and damaged:
                raise ValueError(
                    f"{self.run_dir}: every checkpoint is damaged ({damaged[0]}); remove "
                    f"{self.files.checkpoints} to start the run again from step 0"
                )
            if ckpt is None:
                self.log(f"[resume] {self.run_dir} has no complete checkpoint yet: starting it again from step 0")
        elif self.files.is_run():
            raise ValueError(
                f"run_dir {self.run_dir} already holds a run; resume it with --resume {self.run_dir} "
                "or pick another run_dir"
            )
        # with several learner ranks only rank 0 reads the weights; the others build a meta-device
        # skeleton and receive their shards from it (Learner._place): no full copy on them
        holds_weights = world.is_main or not world.distributed
        if ckpt is not None:
            from transformers import AutoConfig, AutoTokenizer

            config = AutoConfig.from_pretrained(ckpt)
            model = build_model(config) if holds_weights else model_skeleton(config)
            tokenizer = AutoTokenizer.from_pretrained(ckpt)
        else:
            source = None
            if cfg.model.path:
                source = Path(cfg.model.path)
            elif world.is_main:
                source = cold_start(cfg, self.task, self.log)
            # the others wait for rank 0's SFT, outside the collective timeout
            source = Path(D.broadcast_after_long_work(str(source) if source else ""))
            model, tokenizer = load_policy(source, weights=holds_weights)
        for w in check_model(cfg, model):
            self.log(f"[warning] {w}")
        # every prompt encodes (chat template, BOS) and fits, and one step fits in memory: checked
        # here, before the engine or the learner allocates anything
        longest = check_prompts(self.task, self.eval_sets, tokenizer, cfg, model.config, self.log)
        check_memory(cfg, model.config, world.size, longest)
        self.tokenizer, self.moe = tokenizer, is_moe(model)
        self.model_config = model.config
        self.source = str(ckpt if ckpt is not None else source)  # where a rollout worker reads the model from
        self.learner = Learner(model, cfg, world, reference=self._reference() if cfg.loss.kl_beta > 0 else None)
        # the fixed lag: the engine samples step s with version max(0, s - 1 - eta) (pipeline.py)
        # (with workers the learners keep the versions the workers still need, to send them)
        lagged = cfg.rollout.max_staleness or cfg.rollout.workers
        self.lag = LaggedWeights(cfg.rollout.max_staleness) if lagged else None
        if ckpt is not None:
            checkpoint.load(ckpt, self.learner.model, self.learner.optimizer)
            self.state = checkpoint.load_state(ckpt)
        # the weights that sample the next step, streamed from the learner one tensor at a time
        # (a collective when sharded) — once: into the lag's versions, or straight into the engine
        if self.lag is None:
            version, weights = self.state.step, self.learner.full_weights()
        elif ckpt is not None:
            self.lag.load(ckpt, self.state.step, self.learner.full_weights())
            version, weights = self.lag.advance(self.state.step)
        else:
            self.lag.keep(0, self.learner.full_weights())  # version 0 samples the first eta + 1 steps
            version, weights = 0, self.lag.versions[0]
        # with rollout workers the learners sample nothing: no engine here (evaluation builds its
        # own); when sharded, the model object is the learner's, so the engine reads a skeleton
        self.engine = None
        if not cfg.rollout.workers:
            structure = model_skeleton(self.model_config) if world.distributed else model
            self.engine = build_engine(
                cfg.rollout,
                structure,
                tokenizer,
                seed=cfg.train.seed,
                distributed=world.distributed,
                weights=weights,
                version=version,
                log_dir=self.run_dir / "vllm_servers",
                timeout_s=cfg.distributed.timeout_s,
            )
        self.learner.optimizer_steps = self.state.step * cfg.batch.minibatches_per_step
        self._eval: LocalEngine | None = None  # built on first use when eval.precision differs
        self._lag_model = None  # log.lag_kl: the training policy at the sampler's version
        self.sampling = cfg.rollout.sampling()

    def _reference(self):
        """The KL penalty's frozen reference: the run's starting weights (model.path, or the cold
        start), read again from where they came from — on a resume too."""
        path = Path(self.cfg.model.path) if self.cfg.model.path else sft_output_dir(self.cfg)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"loss.kl_beta > 0: the reference policy (the run's starting weights) is not at {path} "
                "any more; restore it there, or set loss.kl_beta=0"
            )
        if self.world.distributed and not self.world.is_main:  # rank 0 sends the shards (Learner._place)
            return load_policy(path, weights=False)[0]
        return load_model(path)

    def close(self) -> None:
        if hasattr(getattr(self, "engine", None), "close"):
            self.engine.close()
        for eval_set in getattr(self, "eval_sets", []):
            eval_set.close()
        if getattr(self, "rewards", None) is not None:
            self.rewards.close()
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None

    # ---------------------------------------------------------------------------------------
    def rollout(self, step: int) -> tuple[RolloutBatch, dict]:
        """This rank's groups of step ``step``, sampled and scored; metrics over all ranks."""
        P, G, K, r = self.cfg.batch.prompts_per_step, self.cfg.batch.group_size, self.world.size, self.world.rank
        mine = D.share(r, K, P)  # global prompt indices of this rank
        waits: dict = {}
        if self.world.workers:
            batch, texts, stats, per_fn, waits = self._receive_rollout()
        else:
            problems = [self.task.train_problem(step * P + i) for i in mine]
            seeds = rollout_seeds(self.cfg.train.seed, step, [i * G + g for i in mine for g in range(G)])
            scored = sample_and_score(
                self.engine,
                self.tokenizer,
                problems,
                G,
                self.rewards,
                self.sampling,
                seeds,
                self.cfg.task,
                capture_routes=self.moe,
            )
            batch, texts, stats, per_fn = scored.batch, scored.texts, scored.result.stats, scored.result.per_fn
        batch.group_ids = torch.tensor(list(mine)).repeat_interleave(G)
        # metrics over the global batch: every rank's rewards, lengths, finished flags and failures
        parts = D.all_gather_objects(
            (
                batch.rewards,
                batch.response_lengths,
                batch.finished,
                stats,
                per_fn,
                texts if self.cfg.log.rollouts else None,
            )
        )
        R = torch.cat([p[0] for p in parts])
        lengths, finished = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
        all_stats = RewardStats.merge([p[3] for p in parts])
        self.state.add_reward_failures(all_stats)
        if all_stats.failures:
            self.log(f"[reward] step {step}: {all_stats.summary()}")
        broken = [fn for fn, n in all_stats.by_fn.items() if n >= len(R) and fn in per_fn]
        if step == 1 and broken and self.cfg.task.reward_fail_fast:  # it would train on zeros
            raise TrainingAborted(
                f"reward function {broken[0]} failed on every response of the first step "
                f"({all_stats.first_error}); fix it before training on rewards of 0"
            )
        per_group = R.view(P, G)
        metrics = {
            M.REWARD_MEAN: float(R.mean()),
            "reward_std": float(R.std()),
            "groups_all_correct": float((per_group.min(1).values == 1).float().mean()),
            M.GROUPS_ALL_WRONG: float((per_group.max(1).values == 0).float().mean()),
            M.RESPONSE_LEN_MEAN: float(lengths.float().mean()),
            "finished_frac": float(finished.float().mean()),
            **all_stats.metrics(),
            **waits,
        }
        if len(per_fn) > 1:  # each reward function's own mean, beside the weighted total
            for name in per_fn:
                metrics[f"reward/{name}"] = sum(sum(p[4][name]) for p in parts) / len(R)
        if self.cfg.log.rollouts and self.world.is_main:
            all_problems = [self.task.train_problem(step * P + i) for i in range(P)]
            record = {
                "step": step,
                "prompts": [p.prompt for p in all_problems],
                "completions": [t for p in parts for t in p[5]],
                "rewards": R.tolist(),
            }
            append_line(self.files.rollouts, json.dumps(record))
        return batch, metrics

    def _receive_rollout(self):
        """This rank's groups of the step from every rollout worker (pipeline.run_worker), in order."""
        t0 = time.perf_counter()
        messages = []
        for w in range(self.world.workers):
            src = self.world.size + w
            try:
                messages.append(D.recv_object(src=src))
            except Exception as e:  # noqa: BLE001 - gloo reports a dead or silent peer many ways
                raise TrainingAborted(
                    f"rollout worker {w} (rank {src}) died or stopped responding within "
                    f"distributed.timeout_s={self.cfg.distributed.timeout_s:g} s "
                    f"({str(e).strip().splitlines()[0][:200]}); the last checkpoint is intact: "
                    f"resume with `stablerl train --resume {self.run_dir}`"
                ) from None
        learner_wait = time.perf_counter() - t0
        parts = [m["part"] for m in messages if m["part"] is not None]
        batch = concat([p["batch"] for p in parts], self.tokenizer.pad_token_id)
        texts = [t for p in parts for t in p["texts"]]
        per_fn = {name: [v for p in parts for v in p["per_fn"][name]] for name in parts[0]["per_fn"]}
        waits = {
            "pipeline/learner_wait_s": learner_wait,
            "pipeline/worker_wait_s": max(m["worker_wait_s"] for m in messages),
        }
        return batch, texts, RewardStats.merge([m["stats"] for m in messages]), per_fn, waits

    def _start_workers(self) -> None:
        """The handshake every rollout worker waits for: the model, the step to start after, the
        versions it needs first (learner rank 0 sends; pipeline.run_worker receives)."""
        if not self.world.workers or not self.world.is_main:
            return
        start, eta = self.state.step, self.cfg.rollout.max_staleness
        needed = initial_versions(start, eta)
        D.transfer_object({"source": self.source, "start_step": start, "initial": len(needed)}, long=True)
        for v in needed:
            send_version(v, self.lag.versions[v], self.world.device)

    # ---------------------------------------------------------------------------------------
    def _eval_engine(self) -> RolloutEngine:
        """The rollout engine itself when it computes as ``eval.precision`` asks (its weights are
        current), else one cached engine in ``eval.precision`` synced to the policy. Evaluation
        never sees the rollout engine's ``weight_noise``: it measures the policy."""
        if (
            self.engine is not None
            and self.cfg.eval.precision == self.cfg.rollout.precision
            and not self.cfg.rollout.weight_noise
            and self.lag is None
        ):
            return self.engine  # (a lagged engine holds old weights: evaluation measures the current ones)
        weights = self.learner.full_weights()
        if self._eval is None:  # from a meta-device skeleton: the engine's copy is its only one
            self._eval = LocalEngine(
                model_skeleton(self.model_config),
                self.cfg.eval.precision,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                weights=weights,
                version=self.state.step,
            )
        else:
            self._eval.load_weights(weights, version=self.state.step)
        return self._eval

    def evaluate(self, step: int) -> dict:
        return evaluate(
            self._eval_engine(),
            self.tokenizer,
            self.task,
            self.rewards,
            self.cfg,
            lambda *p: eval_seed(self.cfg.train.seed, step, *p),
            self.world,
            self.eval_sets,
        )

    # ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, world = self.cfg, self.world
        logger, finished = None, False
        try:
            if world.is_main:
                self._prepare_run_dir()
                logger = RunLogger(self.run_dir, cfg.log, cfg.train.steps, self.state.step, cfg.model_dump(mode="json"))
                replay_history(logger, self.run_dir)
            D.barrier()
            self._start_workers()
            if self.state.step == 0:
                self._log(logger, 0, self.evaluate(0))
            self.nonfinite_streak = 0
            while self.state.step < cfg.train.steps:
                self._step(self.state.step + 1, logger)
            finished = True
        except TrainingAborted as e:
            self.state.aborted = str(e)
            raise
        except KeyboardInterrupt:
            self.state.interrupted = True
            raise
        finally:
            self._finish(logger, finished)
        return self.state

    def _step(self, step: int, logger: RunLogger | None) -> None:
        """One step: rollout -> update -> weight sync -> evaluation -> log -> checkpoint / export."""
        cfg, world = self.cfg, self.world
        t0 = time.perf_counter()
        batch, metrics = self.rollout(step)
        if self.world.workers and cfg.rollout.max_staleness >= 1 and step >= 2 and world.is_main:
            send_version(step - 1, self.lag.versions[step - 1], world.device)  # the workers sample on meanwhile
        t1 = time.perf_counter()
        try:
            metrics.update(self.learner.update(step, batch, first_row=len(batch) * world.rank))
        except checkpoint.NonFiniteState as e:
            raise TrainingAborted(
                f"step {step}: {e} after a finite loss and gradient; stopping. {self._advice()}"
            ) from None
        t2 = time.perf_counter()
        if cfg.log.lag_kl:
            metrics.update(self._lag_split(batch, metrics))
        skipped = metrics.pop("nonfinite", False)
        self._count_nonfinite(step, skipped, logger)
        self._sync_weights(step)
        if step % cfg.eval.every == 0 or step == cfg.train.steps:
            metrics.update(self.evaluate(step))
        n_resp_tokens = int(D.all_reduce_sum([int(batch.response_mask.sum())])[0])
        metrics.update(
            {
                "nonfinite_total": self.state.nonfinite_total,
                "policy_version": step,
                # how many versions behind the learner's pi_old the batch's sampler was (the lag)
                "rollout_version": batch.version,
                M.STALENESS_MEAN: step - 1 - batch.version,
                M.STALENESS_MAX: step - 1 - batch.version,
                "step_time": time.perf_counter() - t0,
                "rollout_time": t1 - t0,
                "train_time": t2 - t1,
                "rollout_tokens_per_s": n_resp_tokens / max(t1 - t0, 1e-9),
                "train_tokens_per_s": metrics[M.TRAIN_TOKENS] / max(t2 - t1, 1e-9),
            }
        )
        self._log(logger, step, metrics)
        self.state.step = step
        # a skipped step is not checkpointed: the last checkpoint stays the last good state
        if not skipped and (step % cfg.checkpoint.every == 0 or step == cfg.train.steps):
            self.save(step)
        every = cfg.checkpoint.export_every
        if step == cfg.train.steps or (every and step % every == 0):
            self.export(step)

    def _count_nonfinite(self, step: int, skipped: bool, logger: RunLogger | None) -> None:
        if not skipped:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        self.state.nonfinite_total += 1
        if logger:
            logger.print(
                f"[yellow]step {step}: non-finite loss or gradient, update skipped "
                f"({self.nonfinite_streak} in a row)[/yellow]"
            )
        limit = self.cfg.train.max_nonfinite_steps
        if self.nonfinite_streak >= limit:
            raise TrainingAborted(
                f"{self.nonfinite_streak} non-finite steps in a row (train.max_nonfinite_steps="
                f"{limit}); stopping. {self._advice()}"
            )

    def _lag_split(self, batch: RolloutBatch, metrics: dict) -> dict:
        """The training-inference mismatch split (``log.lag_kl``): the engine's part, mu against
        the training policy of the version that sampled (pi_v, its weights kept for the lag), and
        the lag's, pi_v against pi_old. In k1 the split is exact on the same tokens:
        E_mu[log mu - log pi_old] = E_mu[log mu - log pi_v] + E_mu[log pi_v - log pi_old]. pi_v is
        routed as pi_old is (R3: the rollout's routes)."""
        weights = self.lag.versions.get(batch.version) if self.lag is not None else None
        if weights is None:
            return {}
        if self._lag_model is None:  # one more full copy of the weights, on every learner rank
            self._lag_model = build_model(self.model_config).eval().requires_grad_(False)
        self._lag_model.load_state_dict(weights)
        replay = batch.routes if self.cfg.train.routing_replay == "R3" else None
        with torch.no_grad():
            logp_v = response_logp(self._lag_model, batch, replay=replay, temperature=batch.sampling.temperature)[
                "logp"
            ]
        d = (logp_v - batch.rollout_logp)[batch.response_mask].double()
        k1_sum, k3_sum, n = D.all_reduce_sum([float(-d.sum()), float(k3(d).sum()), float(d.numel())]).tolist()
        out = {M.LAG_ENGINE_KL: k3_sum / max(n, 1.0), M.LAG_ENGINE_KL_K1: k1_sum / max(n, 1.0)}
        if self.cfg.loss.proximal == "recompute" and M.TRAIN_INFER_KL_K1 in metrics:
            out[M.LAG_KL_K1] = metrics[M.TRAIN_INFER_KL_K1] - out[M.LAG_ENGINE_KL_K1]
        return out

    def _sync_weights(self, step: int) -> None:
        """The trained weights (version ``step``) to whatever samples next: the engine at once, or
        with a lag the version that samples step + 1 (pipeline.py), and to the rollout workers."""
        if self.lag is None:
            self.engine.load_weights(self.learner.full_weights(), version=step)
            return
        self.lag.keep(step, self.learner.full_weights())
        version, weights = self.lag.advance(step)
        if self.engine is not None and version != self.engine.version:
            self.engine.load_weights(weights, version=version)
        if (
            self.world.workers
            and self.cfg.rollout.max_staleness == 0
            and step < self.cfg.train.steps
            and self.world.is_main
        ):
            send_version(step, self.lag.versions[step], self.world.device)

    def _finish(self, logger: RunLogger | None, finished: bool) -> None:
        """Close the logs and write the summary — or, for a run that failed before completing
        anything, remove what it wrote — without ever replacing the error that ended the run."""
        try:
            if logger is not None:
                logger.close()
                # an error or Ctrl-C before anything completed (an abort for non-finite steps is a
                # result, with a summary)
                unstarted = self.state.step == 0 and checkpoint.latest(self.run_dir) is None
                if not finished and self.state.aborted is None and unstarted:
                    self._discard_run_dir()
                else:
                    write_summary(self.run_dir, self.state)
        except Exception as e:  # noqa: BLE001 - the run's own error (if any) is the one to see
            self.log(f"[warning] could not write the summary of {self.run_dir}: {type(e).__name__}: {e}")
        finally:
            self.close()

    def _discard_run_dir(self) -> None:
        """Remove what this run wrote before completing anything while still holding the lock, then
        the lock file (only its holder ever removes it), then the directory if nothing else is in it."""
        self.files.remove_unstarted()
        if self.lock is not None:
            self.lock.release(remove=True)
            self.lock = None
        try:
            self.run_dir.rmdir()
        except OSError:
            pass

    def _prepare_run_dir(self) -> None:
        """Record the config (and any change a resume makes); a run without a checkpoint starts clean."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.state.step == 0:  # a fresh run, or a resumed one killed before its first checkpoint
            self.files.start_fresh()
        else:
            self.files.cut_logs_to(self.state)
        record_config(self.run_dir, self.cfg, self.state.step, self.changes)
        if self.changes:
            self.log(
                "[resume] config changes from step "
                + str(self.state.step + 1)
                + ": "
                + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in self.changes.items())
            )

    def _log(self, logger: RunLogger | None, step: int, metrics: dict) -> None:
        if logger is None:
            return
        self.state.collapse.extend(logger.log_step(step, metrics))
        self.state.metrics_lines += 1

    def _advice(self) -> str:
        last = checkpoint.latest(self.run_dir)
        if last is None:
            return (
                f"No checkpoint was written yet: lower optim.lr (or enable clipping), then `stablerl train "
                f"--resume {self.run_dir} optim.lr=...` starts it again from step 0."
            )
        return (
            f"The last good checkpoint is {last}; lower optim.lr (or enable clipping), then `stablerl train "
            f"--resume {self.run_dir} optim.lr=...` continues from it."
        )

    def save(self, step: int) -> None:
        try:
            checkpoint.save(
                self.run_dir,
                step,
                self.learner.model,
                self.tokenizer,
                self.learner.optimizer,
                self.state,
                self.cfg.checkpoint.keep_last,
                self.world,
                extra=None if self.lag is None else (lambda d: self.lag.save(d, step)),
            )
        except checkpoint.NonFiniteState as e:
            raise TrainingAborted(f"step {step}: {e}; not saved. {self._advice()}") from None
        except checkpoint.CheckpointWriteError as e:
            raise TrainingAborted(str(e)) from None

    def export(self, step: int) -> Path:
        """An HF checkpoint of the current weights in RUN_DIR/export/step_N (from_pretrained loads it)."""
        model, weights = self.learner.export_model()
        path = self.files.export(step)
        error = ""
        if self.world.is_main:
            try:
                checkpoint.save_model_dir(path, model, self.tokenizer, weights)
            except checkpoint.CheckpointWriteError as e:
                error = str(e)
        error = D.broadcast_object(error)
        if error:
            raise TrainingAborted(error)
        return path
