"""Held-out evaluation: the task's held-out split (greedy and sampled accuracy) and any number of
extra evaluation sets (``eval.sets``), each with its own data and reward functions, reported as
avg@k (mean reward over k samples per problem; the paper's avg@32) and pass@k.

Problems are split across ranks (contiguous slices) and the per-problem results gathered, so a
K-rank evaluation equals the 1-rank one. Sampling seeds come from the problem's global index.
"""

from __future__ import annotations

from dataclasses import replace

from stablerl import distributed as D
from stablerl.config import EvalSetConfig, RunConfig
from stablerl.generation import sample_and_score
from stablerl.models import model_skeleton
from stablerl.rollout import LocalEngine, RolloutEngine
from stablerl.tasks import Problem, RewardPool, RewardStats, columns_of, load_problems


def _sample_problems(
    engine,
    tokenizer,
    problems: list[Problem],
    rewards: RewardPool,
    cfg: RunConfig,
    n: int,
    temperature: float,
    seed_of,
    world: D.World,
) -> tuple[list[list[float]], RewardStats]:
    """``n`` responses per problem, this rank's slice of them; every rank's per-problem rewards,
    in problem order, and the reward failures over all ranks."""
    mine = D.share(world.rank, world.size, len(problems))
    scores: list[list[float]] = []
    stats = RewardStats()
    if len(mine):
        sampling = cfg.rollout.sampling().model_copy(update={"temperature": temperature})
        seeds = [seed_of(i * n + s) for i in mine for s in range(n)]
        scored = sample_and_score(engine, tokenizer, [problems[i] for i in mine], n, rewards, sampling, seeds, cfg.task)
        stats = scored.result.stats
        scores = [scored.result.total[j * n : (j + 1) * n] for j in range(len(mine))]
    scores = [x for part in D.all_gather_objects(scores) for x in part]
    return scores, RewardStats.merge(D.all_gather_objects(stats))


def evaluate(
    engine,
    tokenizer,
    task,
    rewards: RewardPool,
    cfg: RunConfig,
    seed_of,
    world: D.World | None = None,
    sets: list[EvalSet] = (),
) -> dict:
    """Held-out accuracy, greedy and sampled (mean over ``eval.samples`` per problem, by level when
    the task has levels), every evaluation set's avg@k and pass@k, and the reward failures."""
    world = world or D.World()
    problems = task.eval_problems()
    out: dict = {}
    failures = RewardStats()
    modes = [("greedy", 0.0, 1)] * cfg.eval.greedy + [
        ("sampled", cfg.rollout.temperature, cfg.eval.samples)
    ] * cfg.eval.sampled
    for name, temperature, n in modes:
        scores, stats = _sample_problems(engine, tokenizer, problems, rewards, cfg, n, temperature, seed_of, world)
        failures = RewardStats.merge([failures, stats])
        per_problem = [sum(s) / n for s in scores]
        out[f"eval/{name}_acc"] = sum(per_problem) / len(per_problem)
        levels = sorted({p.level for p in problems if p.level})
        for lv in levels if len(levels) > 1 else []:
            sel = [r for r, p in zip(per_problem, problems) if p.level == lv]
            out[f"eval/{name}_acc/level_{lv}"] = sum(sel) / len(sel)
    for k, eval_set in enumerate(sets):
        # each set's seeds are its own (index k + 1), distinct from the held-out split's
        scores, stats = _sample_problems(
            engine,
            tokenizer,
            eval_set.problems,
            eval_set.rewards,
            cfg,
            eval_set.cfg.samples,
            cfg.rollout.temperature,
            lambda *p, k=k: seed_of(1_000_000 * (k + 1), *p),
            world,
        )
        failures = RewardStats.merge([failures, stats])
        out.update(eval_set.metrics(scores))
    out["eval/reward_failures"] = failures.failures
    if failures.failures:
        out["eval/reward_failures_detail"] = failures.summary()
    return out


def pass_at_k(scores: list[list[float]], threshold: float) -> float:
    """The fraction of problems with at least one sample whose reward reaches ``threshold``."""
    return sum(any(s >= threshold for s in row) for row in scores) / len(scores)


class EvalSet:
    """One ``eval.sets`` entry: its problems and its reward pool (the task's pool when it names no
    reward functions of its own)."""

    def __init__(self, cfg: EvalSetConfig, task_cfg, task_rewards: RewardPool):
        self.cfg = cfg
        key = f"eval.sets[{cfg.name}].dataset"
        # an eval set is never fine-tuned on: it needs no teacher solutions, whatever the task's columns say
        columns = replace(columns_of(cfg.columns or task_cfg.columns), solution=None)
        if not cfg.reward_fns and not task_cfg.reward_fns and columns.answer is None:
            raise ValueError(f"eval.sets[{cfg.name}]: no answer column and no reward functions to score with")
        self.problems = load_problems(
            cfg.dataset,
            columns,
            cfg.prompt_template or task_cfg.prompt_template,
            cfg.split,
            cfg.dataset_config,
            key=key,
        )[: cfg.max_problems]
        self.own_rewards = None
        if cfg.reward_fns:
            try:
                self.own_rewards = RewardPool(
                    cfg.reward_fns,
                    cfg.reward_weights,
                    workers=task_cfg.reward_workers,
                    timeout_s=task_cfg.reward_timeout_s,
                    memory_mb=task_cfg.reward_memory_mb,
                )
            except ValueError as e:
                raise ValueError(f"eval.sets[{cfg.name}].reward_fns: {e}") from None
        self.rewards = self.own_rewards or task_rewards

    def metrics(self, scores: list[list[float]]) -> dict[str, float]:
        k, name = self.cfg.samples, self.cfg.name
        return {
            f"eval/{name}/avg@{k}": sum(sum(s) / k for s in scores) / len(scores),
            f"eval/{name}/pass@{k}": pass_at_k(scores, self.cfg.pass_threshold),
        }

    def close(self) -> None:
        if self.own_rewards is not None:
            self.own_rewards.close()


def build_eval_sets(cfg: RunConfig, task_rewards: RewardPool) -> list[EvalSet]:
    """Every ``eval.sets`` entry, loaded and checked (before any training work)."""
    out: list[EvalSet] = []
    try:
        for s in cfg.eval.sets:
            out.append(EvalSet(s, cfg.task, task_rewards))
    except BaseException:
        for s in out:
            s.close()
        raise
    return out


class EvalEngine:
    """The engine held-out evaluation samples with: the rollout engine itself when it computes as
    ``eval.precision`` asks (its weights are current), else one cached engine in
    ``eval.precision`` synced to the policy. Evaluation never sees the rollout engine's
    ``weight_noise``, nor a lagged engine's old weights: it measures the current policy."""

    def __init__(self, cfg: RunConfig, model_config, tokenizer):
        self.cfg, self.model_config, self.tokenizer = cfg, model_config, tokenizer
        self.own: LocalEngine | None = None  # built on first use

    def get(self, rollout_engine: RolloutEngine | None, lagged: bool, weights, version: int) -> RolloutEngine:
        """``weights``: a callable streaming the current policy (only called when needed)."""
        r = self.cfg.rollout
        if rollout_engine is not None and self.cfg.eval.precision == r.precision and not r.weight_noise and not lagged:
            return rollout_engine
        if self.own is None:  # from a meta-device skeleton: the engine's copy is its only one
            self.own = LocalEngine(
                model_skeleton(self.model_config),
                self.cfg.eval.precision,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                weights=weights(),
                version=version,
            )
        else:
            self.own.load_weights(weights(), version=version)
        return self.own
