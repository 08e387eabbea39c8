"""Verifiable tasks: the built-in arithmetic family and math problems from local files."""

from stablerl.tasks.arithmetic import ArithmeticTask
from stablerl.tasks.base import Problem, Task
from stablerl.tasks.math_file import MalformedDataError, MathFileTask
from stablerl.tasks.reward import RewardPool, RewardResult, RewardStats

__all__ = ["ArithmeticTask", "MathFileTask", "MalformedDataError", "Problem", "Task", "RewardPool", "RewardResult",
           "RewardStats", "build_task", "reward_pool"]


def build_task(cfg):
    """A task from a ``stablerl.config.TaskConfig``."""
    if cfg.name == "arithmetic":
        return ArithmeticTask(levels=cfg.levels, style=cfg.style, eval_size=cfg.eval_size, seed=cfg.seed)
    return MathFileTask(cfg.train_file, cfg.eval_file, cfg.question_field, cfg.answer_field, cfg.solution_field,
                        cfg.eval_size, cfg.seed, cfg.prompt_template, eval_size_set="eval_size" in cfg.model_fields_set)


def reward_pool(task, cfg) -> RewardPool:
    """The worker-process pool that scores ``task``'s responses (``cfg`` is a TaskConfig)."""
    try:
        return RewardPool(cfg.reward_fns or task.reward_fns, cfg.reward_weights, workers=cfg.reward_workers,
                          timeout_s=cfg.reward_timeout_s, memory_mb=cfg.reward_memory_mb)
    except ValueError as e:
        raise ValueError(f"task.reward_fns: {e}") from None
