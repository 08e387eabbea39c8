"""The ``stablerl`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from stablerl.config import LabConfig, RunConfig
from stablerl.config_io import build_config, describe
from stablerl.errors import Terminated


def _lab(args: argparse.Namespace) -> int:
    from stablerl.lab import run_lab
    from stablerl.lab.report import format_table, plot

    cfg = build_config(LabConfig, args.config, args.overrides)
    result = run_lab(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lab.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "lab.png")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
        print(f"\nwrote {out / 'lab.json'} and {out / 'lab.png'}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import time

    from stablerl.api import resolve_run, train_resolved
    from stablerl.loop import RankStopped, TrainingAborted
    from stablerl.plot import reward_is_accuracy
    from stablerl.rundir import RunDir

    cfg, run_dir = resolve_run(args.config, resume=args.resume, overrides=args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    t0 = time.perf_counter()
    try:
        summary = train_resolved(cfg, run_dir, resume=bool(args.resume))
    except TrainingAborted as e:
        if os.environ.get("RANK", "0") == "0" or isinstance(e, RankStopped):
            print(f"stablerl train: stopped: {e}", file=sys.stderr)
        return 3
    if not summary:  # a rank other than 0: rank 0 reports
        return 0
    files = RunDir(run_dir)
    plots = files.plots / "curves.png"  # drawn by train_resolved, as for the Python API
    lines = [f"\nrun: {run_dir}  ({summary['steps']} steps, {time.perf_counter() - t0:.0f} s this invocation)"]
    accuracy = reward_is_accuracy(run_dir)  # a weighted reward of your functions can exceed 1: no percent
    for mode in ("greedy", "sampled"):
        if f"{mode}_before" in summary:
            b, a = summary[f"{mode}_before"], summary[f"{mode}_after"]
            if accuracy:
                lines.append(f"held-out accuracy ({mode}): {_pct(b)} -> {_pct(a)}  ({100 * (a - b):+.1f} points)")
            else:
                lines.append(f"held-out reward ({mode}, mean per response): {b:.4g} -> {a:.4g}  ({a - b:+.4g})")
    if summary.get("collapsed"):
        lines.append(collapse_line(summary))
    failures = sum(summary.get(k, 0) for k in ("reward_errors", "reward_timeouts", "reward_crashes"))
    if failures:
        lines.append(
            f"reward failures (reward 0): {summary.get('reward_errors', 0)} errors, "
            f"{summary.get('reward_timeouts', 0)} timeouts, {summary.get('reward_crashes', 0)} crashes"
        )
    lines += [
        f"metrics: {files.metrics}   tensorboard: {files.tensorboard}   plots: {plots}",
        f"checkpoint: {files.checkpoints}   HF export: {files.exports}",
    ]
    print("\n".join(lines))
    return 0


def collapse_line(summary: dict) -> str:
    """The summary's line for a run the online detector flagged. The detector watches short
    windows of training metrics (log.collapse_*), so what it flags is a sign to check the held-out
    curve, not a verdict: a 3-step KL excursion that passes is flagged too (docs/training.md)."""
    return (
        "WARNING: the online diagnostics flagged a possible collapse (check the held-out accuracy "
        "in the plots): " + "; ".join(summary["collapse_warnings"])
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x == x and abs(x) != float("inf") else "n/a"


def _sft(args: argparse.Namespace) -> int:
    from stablerl.sft import cold_start
    from stablerl.tasks import build_task

    cfg = build_config(RunConfig, args.config, args.overrides + ([f"sft.output_dir={args.out}"] if args.out else []))
    path = cold_start(cfg, build_task(cfg.task))
    print(f"cold-start checkpoint: {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from stablerl.export import export_run

    print(export_run(Path(args.run_dir), Path(args.out) if args.out else None, args.step, args.merged))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from stablerl.evaluation import build_eval_sets, evaluate
    from stablerl.models import check_model_dir, load_policy
    from stablerl.preflight import check_prompts
    from stablerl.rollout import LocalEngine
    from stablerl.seeds import eval_seed
    from stablerl.tasks import build_task, reward_pool

    check_model_dir(args.checkpoint, key="checkpoint")
    cfg = build_config(RunConfig, args.config, args.overrides + [f"model.path={args.checkpoint}"])
    task = build_task(cfg.task)
    for w in getattr(task, "warnings", []):
        print(f"[warning] {w}", file=sys.stderr)
    model, tokenizer = load_policy(args.checkpoint)
    engine = LocalEngine(
        model, cfg.eval.precision, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    with reward_pool(task, cfg.task) as pool:
        sets = build_eval_sets(cfg, pool)
        try:
            # the prompts a run would refuse (a prompt and rollout.max_new_tokens must fit the context)
            check_prompts(task, sets, tokenizer, cfg, model.config, lambda m: print(m, file=sys.stderr))
            result = evaluate(
                engine, tokenizer, task, pool, cfg, lambda *p: eval_seed(cfg.train.seed, 0, *p), sets=sets
            )
        finally:
            for s in sets:
                s.close()
    print(json.dumps(result, indent=1))
    return 0


def _repro(args: argparse.Namespace) -> int:
    from stablerl.repro import EXPERIMENTS, run_experiment, write_report
    from stablerl.repro.runner import is_done

    names = (
        [n for n, e in EXPERIMENTS.items() if e.get("in_all", True)] if args.experiment == "all" else [args.experiment]
    )
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: the number of seeds per configuration must be at least 1")
    out = Path(args.out)
    if args.report_only:
        for name in names:
            paths = write_report(name, out, args.seeds)
            print(
                f"[repro {name}] report of seeds 0..{args.seeds - 1}: {paths['md']}"
                if paths["md"].is_file()
                else f"[repro {name}] no finished run or record under {out / name}"
            )
        return 0
    # seed by seed across the experiments: an interrupted `all` has every experiment at equal depth
    for seed in range(args.seeds):
        for name in names:
            dirs = run_experiment(name, out, [seed], args.overrides, variants=args.variants)
            paths = write_report(name, out, args.seeds)
            # a run another process holds has a (locked) directory; one finished on a lost machine
            # has only its record, and no directory
            elsewhere = sum(d.exists() and not is_done(d) for d in dirs)
            state = f"{elsewhere} run(s) of seed {seed} still running in another process" if elsewhere else "done"
            print(f"[repro {name}] seeds 0..{seed} {state}; table: {paths['md']}  figure: {paths['png']}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from stablerl.plot import plot_runs
    from stablerl.rundir import RunDir

    out = plot_runs(args.run_dirs, args.out or RunDir(args.run_dirs[0]).plots / "curves.png")
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from stablerl import __version__

    parser = argparse.ArgumentParser(prog="stablerl", description=__doc__ and "stable RL for LLMs (MoE first)")
    parser.add_argument("--version", action="version", version=f"stablerl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_lab(sub)
    _add_train_and_sft(sub)
    _add_eval(sub)
    _add_repro(sub)
    ex = sub.add_parser("export", help="a run's checkpoint as an HF model, or a LoRA run's as a peft adapter")
    ex.add_argument("run_dir")
    ex.add_argument("--step", type=int, help="the checkpoint of this step (default: the latest intact one)")
    ex.add_argument("--merged", action="store_true", help="LoRA runs: also the merged model, in OUT/merged")
    ex.add_argument("--out", help="output directory (default: RUN_DIR/export/step_N)")
    ex.set_defaults(func=_export)
    pl = sub.add_parser("plot", help="PNG curves comparing runs")
    pl.add_argument("run_dirs", nargs="+")
    pl.add_argument("--out", help="PNG path (default: FIRST_RUN/plots/curves.png)")
    pl.set_defaults(func=_plot)
    return parser


def _add_lab(sub) -> None:
    lab = sub.add_parser(
        "lab",
        help="exact first-order lab: surrogate gradients vs the true gradient, by enumeration",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set with key=value):\n" + "\n".join(describe(LabConfig)),
    )
    lab.add_argument("--config", help="YAML or TOML file with LabConfig keys")
    lab.add_argument("--out", default="runs/lab", help="directory for lab.json and lab.png (default: runs/lab)")
    lab.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    lab.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. seed=1")
    lab.set_defaults(func=_lab)


def _add_train_and_sft(sub) -> None:
    keys = "config keys (set with section.key=value):\n" + "\n".join(describe(RunConfig))
    train = sub.add_parser(
        "train",
        help="RL training (cold start by SFT if no checkpoint), then evaluation",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=keys,
    )
    train.add_argument("--config", help="YAML or TOML file with RunConfig sections")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (file, overrides, defaults) as YAML and exit; nothing runs",
    )
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. loss.eps_high=0.28 train.steps=100")
    train.set_defaults(func=_train)

    sft = sub.add_parser(
        "sft",
        help="cold-start SFT on teacher solutions; saves an HF checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=keys,
    )
    sft.add_argument("--config")
    sft.add_argument("--out", help="checkpoint directory (default: runs/sft/<hash>)")
    sft.add_argument("overrides", nargs="*", metavar="key=value")
    sft.set_defaults(func=_sft)


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="held-out accuracy (greedy and sampled) of an HF checkpoint")
    ev.add_argument("checkpoint", help="HF checkpoint dir (model + tokenizer)")
    ev.add_argument("--config")
    ev.add_argument("overrides", nargs="*", metavar="key=value")
    ev.set_defaults(func=_eval)


def _add_repro(sub) -> None:
    rp = sub.add_parser("repro", help="the paper's experiments in miniature (docs/results.md)")
    from stablerl.repro.experiments import EXPERIMENTS

    rp.add_argument(
        "experiment",
        choices=[*EXPERIMENTS, "all"],
        help="one experiment, or all of them (but calibration), seed by seed",
    )
    rp.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    rp.add_argument(
        "--variants",
        nargs="+",
        metavar="VARIANT",
        help="run only these variants of the experiment (default: all); the report covers every finished run",
    )
    rp.add_argument("--out", default="runs/repro", help="output directory (default runs/repro)")
    rp.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write the report from the finished runs under --out and the run records "
        "beside it (<out>/<experiment>/records/, e.g. copied back from docs/results/)",
    )
    rp.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run (after the experiment's)")
    rp.set_defaults(func=_repro)


def _quiet_hf() -> None:
    # HF's per-file progress bars are noise here. Hub ids (model.path, task.dataset) are fetched
    # where the network allows, from the HF cache otherwise (set HF_HUB_OFFLINE=1 to never try)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:  # imported before (by a caller of main()): the variable came too late
        sys.modules["datasets"].disable_progress_bars()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also come after options (`train a.b=1 --config f.yaml c.d=2`): argparse leaves
    # those unparsed; anything else left over is a real error
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command != "lab":
        _quiet_hf()
    try:
        return args.func(args)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line, no traceback (the summary says interrupted)
        hint = f"; continue with: stablerl train --resume {args.resume}" if getattr(args, "resume", None) else ""
        terminated = isinstance(e, Terminated)
        print(
            f"stablerl {args.command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}{hint}", file=sys.stderr
        )
        return 143 if terminated else 130
    except ValueError as e:  # every user error (config, data, paths) is a ValueError with a clear message
        print(f"stablerl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no (permissions, a full disk)
        print(f"stablerl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
