"""Verifiable tasks: the built-in arithmetic family and math problems from local files."""

from stablerl.tasks.arithmetic import ArithmeticTask
from stablerl.tasks.base import Problem, Task
from stablerl.tasks.math_file import MalformedDataError, MathFileTask
from stablerl.tasks.reward import RewardStats, compute_rewards

__all__ = ["ArithmeticTask", "MathFileTask", "MalformedDataError", "Problem", "Task", "RewardStats",
           "compute_rewards", "build_task"]


def build_task(cfg):
    """A task from a ``stablerl.config.TaskConfig``."""
    if cfg.name == "arithmetic":
        return ArithmeticTask(levels=cfg.levels, style=cfg.style, eval_size=cfg.eval_size, seed=cfg.seed)
    return MathFileTask(cfg.train_file, cfg.eval_file, cfg.question_field, cfg.answer_field, cfg.solution_field,
                        cfg.eval_size, cfg.seed, cfg.prompt_template)
