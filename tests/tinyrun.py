"""What many tests share: a tiny run's overrides, building and running it, and the CLI's user-error check."""

from pathlib import Path

from stablerl.cli import main
from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.loop import Trainer

FNS = str(Path(__file__).parent / "data" / "reward_fns.py")
SAMPLE = str(Path(__file__).parents[1] / "src" / "stablerl" / "tasks" / "data" / "sample_math.jsonl")
TINY = [
    "batch.prompts_per_step=2",
    "batch.group_size=4",
    "rollout.max_new_tokens=12",
    "task.levels=[1]",
    "task.eval_size=8",
    "eval.every=2",
    "log.progress=false",
    "log.tensorboard=false",
]


def args(ckpt, run_dir, *extra):
    return [f"model.path={ckpt}", f"run_dir={run_dir}", *TINY, *extra]


def config(ckpt, run_dir, *extra) -> RunConfig:
    return build_config(RunConfig, None, args(ckpt, run_dir, *extra))


def train(ckpt, run_dir, *extra, resume=False):
    return Trainer(config(ckpt, run_dir, *extra), run_dir, resume=resume, log=lambda *_: None).run()


def cli_error(capsys, argv) -> str:
    """Run the CLI, expect a user error: exit code 2 and exactly one line on stderr."""
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err
