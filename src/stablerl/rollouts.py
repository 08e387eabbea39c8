"""One step's rollouts for this learner rank: sampled and scored here, or received from the
rollout workers (pipeline.py); then the step's rollout metrics over every rank's groups."""

from __future__ import annotations

import json
import time

import torch

from stablerl import distributed as D
from stablerl import metrics as M
from stablerl.config import RunConfig
from stablerl.errors import TrainingAborted
from stablerl.filtering import fill_batch
from stablerl.generation import sample_and_score
from stablerl.learning_signal import groups_without_signal
from stablerl.rollout import RolloutBatch, concat
from stablerl.rundir import RunDir, RunState, append_line
from stablerl.seeds import rollout_seeds
from stablerl.tasks.reward import RewardStats


class Rollouts:
    """The sampling side of the loop: step s's prompts, this rank's share, their scores."""

    def __init__(self, cfg: RunConfig, world: D.World, task, rewards, tokenizer, files: RunDir, log, moe: bool):
        self.cfg, self.world, self.task, self.rewards = cfg, world, task, rewards
        self.tokenizer, self.files, self.log, self.moe = tokenizer, files, log, moe
        self.engine = None  # the learner's own engine (None with rollout workers)
        self.sampling = cfg.rollout.sampling()

    def step(self, step: int, state: RunState) -> tuple[RolloutBatch, dict]:
        """This rank's groups of step ``step``, sampled and scored; metrics over all ranks."""
        P, G, K = self.cfg.batch.prompts_per_step, self.cfg.batch.group_size, self.world.size
        mine = D.share(self.world.rank, K, P)  # global prompt indices of this rank
        base = step * P + state.extra_prompts  # the stream's index of the step's first prompt
        batch, texts, stats, per_fn, waits = self._round(step, 0, base)
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
        metrics = {**self._metrics(step, parts, state, base), **waits}
        if self.cfg.batch.filter_groups:  # dynamic sampling: the metrics above are round 0's, as drawn
            batch, extra, filtered = fill_batch(
                batch,
                lambda rd: self._round(step, rd, base)[0],
                P,
                G,
                self.cfg.batch.filter_max_rounds,
                mine,
                self.tokenizer.pad_token_id,
                announce=D.transfer_object if self.world.workers and self.world.is_main else None,
            )
            batch.group_ids = torch.tensor(list(mine)).repeat_interleave(G)
            state.extra_prompts += extra * P
            metrics.update(filtered)
        return batch, metrics

    def _round(self, step: int, rd: int, base: int):
        """This rank's groups of sampling round ``rd`` of step ``step`` (round 0 is the step's own
        prompts; batch.filter_groups samples more): prompts ``base + rd*P ..`` of the stream, a seed
        per response by its index ``rd*P*G + ..`` in the step; or received from the workers."""
        if self.world.workers:
            return self._receive()
        P, G = self.cfg.batch.prompts_per_step, self.cfg.batch.group_size
        mine = D.share(self.world.rank, self.world.size, P)
        problems = [self.task.train_problem(base + rd * P + i) for i in mine]
        seeds = rollout_seeds(self.cfg.train.seed, step, [(rd * P + i) * G + g for i in mine for g in range(G)])
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
        return scored.batch, scored.texts, scored.result.stats, scored.result.per_fn, {}

    def _metrics(self, step: int, parts: list, state: RunState, base: int) -> dict:
        """The step's rollout metrics from every rank's part; reward failures counted into the
        run's state (a reward function failing on every response of step 1 stops the run)."""
        P, G = self.cfg.batch.prompts_per_step, self.cfg.batch.group_size
        R = torch.cat([p[0] for p in parts])
        lengths, finished = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
        all_stats = RewardStats.merge([p[3] for p in parts])
        per_fn = parts[0][4]
        state.add_reward_failures(all_stats)
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
            M.GROUPS_WITHOUT_SIGNAL: float(groups_without_signal(R, G).float().mean()),
            M.RESPONSE_LEN_MEAN: float(lengths.float().mean()),
            "finished_frac": float(finished.float().mean()),
            **all_stats.metrics(),
        }
        if len(per_fn) > 1:  # each reward function's own mean, beside the weighted total
            for name in per_fn:
                metrics[f"reward/{name}"] = sum(sum(p[4][name]) for p in parts) / len(R)
        if self.cfg.log.rollouts and self.world.is_main:
            self._record(step, parts, R, base)
        return metrics

    def _record(self, step: int, parts: list, R: torch.Tensor, base: int) -> None:
        """The step's prompts, completions and rewards (round 0's) as one line of rollouts.jsonl."""
        all_problems = [self.task.train_problem(base + i) for i in range(self.cfg.batch.prompts_per_step)]
        record = {
            "step": step,
            "prompts": [p.prompt for p in all_problems],
            "completions": [t for p in parts for t in p[5]],
            "rewards": R.tolist(),
        }
        append_line(self.files.rollouts, json.dumps(record))

    def _receive(self):
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
                    f"resume with `stablerl train --resume {self.files}`"
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


def staleness(step: int, batch: RolloutBatch) -> dict:
    """Policy versions between the sampler and pi_old (version step - 1): one number under a fixed
    lag; per token in flight (a batch with ``token_version``), reduced over every rank, with the
    share of tokens sampled by a version newer than the step's oldest, which is then the step's
    ``rollout_version``."""
    if batch.token_version is None:
        lag = step - 1 - batch.version
        return {M.STALENESS_MEAN: lag, M.STALENESS_MAX: lag}
    versions = batch.token_version[batch.response_mask]
    oldest = -int(D.all_reduce_max([-float(versions.min()) if versions.numel() else -float(batch.version)])[0])
    total, n, newer = D.all_reduce_sum(
        [float((step - 1 - versions).sum()), float(versions.numel()), float((versions > oldest).sum())]
    ).tolist()
    return {
        "rollout_version": oldest,
        M.STALENESS_MEAN: total / max(n, 1.0),
        M.STALENESS_MAX: step - 1 - oldest,
        M.IN_FLIGHT_TOKENS: newer / max(n, 1.0),
    }
