"""Verifiable tasks: the built-in arithmetic family and problems from a dataset (docs/your-task.md)."""

from stablerl.tasks.arithmetic import ArithmeticTask
from stablerl.tasks.base import Problem, Task
from stablerl.tasks.dataset import Columns, DatasetTask, MalformedDataError, load_problems
from stablerl.tasks.reward import RewardPool, RewardResult, RewardStats

__all__ = [
    "ArithmeticTask",
    "Columns",
    "DatasetTask",
    "MalformedDataError",
    "load_problems",
    "Problem",
    "Task",
    "RewardPool",
    "RewardResult",
    "RewardStats",
    "build_task",
    "reward_pool",
]


def build_task(cfg):
    """A task from a ``stablerl.config.TaskConfig``."""
    if cfg.name == "arithmetic":
        return ArithmeticTask(
            levels=cfg.levels, style=cfg.style, eval_size=cfg.eval_size, seed=cfg.seed, max_operand=cfg.max_operand
        )
    return DatasetTask(
        cfg.dataset,
        columns=columns_of(cfg.columns),
        split=cfg.split,
        config=cfg.dataset_config,
        eval_dataset=cfg.eval_dataset,
        eval_split=cfg.eval_split,
        eval_size=cfg.eval_size,
        seed=cfg.seed,
        prompt_template=cfg.prompt_template,
        eval_size_set="eval_size" in cfg.model_fields_set,
    )


def columns_of(cfg) -> Columns:
    """A ``Columns`` from a ``stablerl.config.ColumnsConfig``."""
    return Columns(question=cfg.question, answer=cfg.answer, solution=cfg.solution)


def reward_pool(task, cfg) -> RewardPool:
    """The worker-process pool that scores ``task``'s responses (``cfg`` is a TaskConfig)."""
    try:
        return RewardPool(
            cfg.reward_fns or task.reward_fns,
            cfg.reward_weights,
            workers=cfg.reward_workers,
            timeout_s=cfg.reward_timeout_s,
            memory_mb=cfg.reward_memory_mb,
        )
    except ValueError as e:
        raise ValueError(f"task.reward_fns: {e}") from None
