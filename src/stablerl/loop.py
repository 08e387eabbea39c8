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

import time
from pathlib import Path

from stablerl import build, checkpoint
from stablerl import distributed as D
from stablerl import metrics as M
from stablerl.config import RunConfig
from stablerl.errors import RankStopped, TrainingAborted
from stablerl.evaluation import EvalEngine, build_eval_sets, evaluate
from stablerl.learner import Learner
from stablerl.lora import check_base, export_lora, write_base_record
from stablerl.models import is_moe
from stablerl.pipeline import LagSplit, send_to_workers, start_workers
from stablerl.preflight import check_compiler, check_memory, check_prompts
from stablerl.rollout import RolloutBatch
from stablerl.rollouts import Rollouts, staleness
from stablerl.rundir import RunDir, RunLock, RunLocked, RunState, discard_unstarted, prepare
from stablerl.runlog import RunLogger, check_wandb, replay_history, write_summary
from stablerl.seeds import eval_seed
from stablerl.tasks import build_task, reward_pool

__all__ = ["RankStopped", "Trainer", "TrainingAborted"]


class Trainer:
    """One run in ``run_dir``: the loop above, checkpoints and resume, on every rank."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, log=print, world: D.World | None = None):
        self.cfg, self.run_dir, self.world = cfg, Path(run_dir), world or D.World()
        self.files = RunDir(run_dir)
        self.log = log if self.world.is_main else (lambda *_: None)
        build.check_layout(cfg, self.world)
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
        """Build the run once (build.py): the model, the learner, the lag, the engines."""
        cfg, world = self.cfg, self.world
        check_compiler(cfg, world.device)
        for w in getattr(self.task, "warnings", []):
            self.log(f"[warning] {w}")
        self.state = RunState()
        ckpt, self.changes = build.resume_point(cfg, self.files, resume, self.log)
        model, tokenizer, source = build.starting_policy(cfg, self.task, world, ckpt, self.log)
        for w in build.check_model(cfg, model):
            self.log(f"[warning] {w}")
        # every prompt encodes (chat template, BOS) and fits, and one step fits in memory: checked
        # here, before the engine or the learner allocates anything
        longest = check_prompts(self.task, self.eval_sets, tokenizer, cfg, model.config, self.log)
        check_memory(cfg, model.config, world.size, longest)
        self.tokenizer, self.model_config = tokenizer, model.config
        self.source = str(source)  # where a rollout worker reads the model from
        if ckpt is not None:
            self.state = checkpoint.load_state(ckpt)
        lora = cfg.model.lora.enabled  # the KL reference is then the base itself, adapters off
        reference = build.reference_policy(cfg, world, self.state) if cfg.loss.kl_beta > 0 and not lora else None
        self.learner = Learner(model, cfg, world, reference=reference)
        self.lag = build.fixed_lag(cfg)
        if ckpt is not None:
            if lora:
                check_base(ckpt, self.learner.base_digest, self.source)
            checkpoint.load(ckpt, self.learner.model, self.learner.optimizer)
        version, weights = build.first_weights(self.lag, self.state, ckpt, self.learner.full_weights)
        self.rollouts = Rollouts(cfg, world, self.task, self.rewards, tokenizer, self.files, self.log, is_moe(model))
        self.engine = self.rollouts.engine = build.rollout_engine(
            cfg, world, model, tokenizer, weights, version, log_dir=self.run_dir / "vllm_servers"
        )
        self.learner.optimizer_steps = self.state.step * cfg.batch.minibatches_per_step
        self.eval_engine = EvalEngine(cfg, self.model_config, tokenizer)
        replay_rollout = self.learner.plan.replays_rollout
        self.lag_split = LagSplit(self.model_config, replay_rollout, cfg.loss.proximal == "recompute")

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

    def rollout(self, step: int) -> tuple[RolloutBatch, dict]:
        """This rank's groups of step ``step``, sampled and scored; metrics over all ranks."""
        return self.rollouts.step(step, self.state)

    def evaluate(self, step: int) -> dict:
        engine = self.eval_engine.get(self.engine, self.lag is not None, self.learner.full_weights, self.state.step)
        seed = lambda *p: eval_seed(self.cfg.train.seed, step, *p)  # noqa: E731
        return evaluate(engine, self.tokenizer, self.task, self.rewards, self.cfg, seed, self.world, self.eval_sets)

    # ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, world = self.cfg, self.world
        logger, finished = None, False
        try:
            if world.is_main:
                prepare(self.files, cfg, self.state, self.changes, self.log)
                logger = RunLogger(self.run_dir, cfg.log, cfg.train.steps, self.state.step, cfg.model_dump(mode="json"))
                replay_history(logger, self.run_dir)
            D.barrier()
            start_workers(
                world,
                self.state.step,
                cfg.rollout.max_staleness,
                self.source,
                self.lag,
                self.state.extra_prompts,
                in_flight=cfg.rollout.vllm.in_flight_updates,
            )
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
        in_flight = cfg.rollout.vllm.in_flight_updates
        send_to_workers(
            world, step, cfg.rollout.max_staleness, cfg.train.steps, self.lag, trained=False, in_flight=in_flight
        )
        t1 = time.perf_counter()
        try:
            metrics.update(self.learner.update(step, batch, first_row=len(batch) * world.rank))
        except checkpoint.NonFiniteState as e:
            raise TrainingAborted(
                f"step {step}: {e} after a finite loss and gradient; stopping. {self._advice()}"
            ) from None
        t2 = time.perf_counter()
        if cfg.log.lag_kl:
            metrics.update(self.lag_split(self.lag, batch, metrics))
        skipped = metrics.pop("nonfinite", False)
        self.state.steps_skipped += metrics.get(M.STEPS_SKIPPED, 0)
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
                **staleness(step, batch),
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
        cfg, in_flight = self.cfg, self.cfg.rollout.vllm.in_flight_updates
        send_to_workers(
            self.world, step, cfg.rollout.max_staleness, cfg.train.steps, self.lag, trained=True, in_flight=in_flight
        )

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
                    summary = write_summary(self.run_dir, self.state)
                    if "no_signal_warning" in summary:
                        logger.print(f"[yellow]WARNING[/yellow] {summary['no_signal_warning']}")
        except Exception as e:  # noqa: BLE001 - the run's own error (if any) is the one to see
            self.log(f"[warning] could not write the summary of {self.run_dir}: {type(e).__name__}: {e}")
        finally:
            self.close()

    def _discard_run_dir(self) -> None:
        discard_unstarted(self.files, self.lock)
        self.lock = None

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
                extra=lambda d: self._checkpoint_extra(d, step),
            )
        except checkpoint.NonFiniteState as e:
            raise TrainingAborted(f"step {step}: {e}; not saved. {self._advice()}") from None
        except checkpoint.CheckpointWriteError as e:
            raise TrainingAborted(str(e)) from None

    def _checkpoint_extra(self, directory: Path, step: int) -> None:
        """More files of a checkpoint: the lag's pending weights, a LoRA run's base fingerprint."""
        if self.lag is not None:
            self.lag.save(directory, step)
        if self.learner.base_digest is not None:
            write_base_record(directory, self.learner.base_digest, self.cfg.model.lora, self.source)

    def export(self, step: int) -> Path:
        """An HF checkpoint of the current weights in RUN_DIR/export/step_N (from_pretrained loads it)."""
        model, weights = self.learner.export_model()
        path = self.files.export(step)
        error = ""
        if self.world.is_main:
            try:
                if self.learner.lora:  # the peft adapter (and, on request, the merged model)
                    export_lora(path, model, weights, self.tokenizer, self.cfg.model.lora.export_merged, self.source)
                else:
                    checkpoint.save_model_dir(path, model, self.tokenizer, weights)
            except checkpoint.CheckpointWriteError as e:
                error = str(e)
            except OSError as e:
                error = f"writing {path} failed: {e}"
        error = D.broadcast_object(error)
        if error:
            raise TrainingAborted(error)
        return path
