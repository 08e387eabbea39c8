"""The ``stablerl`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from stablerl.config import LabConfig, RunConfig, build_config, describe


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


def _run_config(args: argparse.Namespace) -> RunConfig:
    if getattr(args, "resume", None):
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise ValueError(f"--resume {args.resume}: not a run directory (no config.json)")
        from stablerl.config import apply_overrides

        data = apply_overrides(json.loads(saved.read_text()), args.overrides)
        return build_config(RunConfig, None, [f"{k}={json.dumps(v)}" for k, v in _flatten(data).items()])
    return build_config(RunConfig, args.config, args.overrides)


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _train(args: argparse.Namespace) -> int:
    import time

    from stablerl.plot import plot_runs
    from stablerl.trainer import Trainer, TrainingAborted, fmt_pct, summarize

    cfg = _run_config(args)
    run_dir = Path(args.resume or cfg.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if not args.resume and (run_dir / "checkpoints").is_dir():
        raise ValueError(f"run_dir {run_dir} already holds a run; resume it with --resume {run_dir} or pick another")
    cfg.run_dir = str(run_dir)
    trainer = Trainer(cfg, run_dir, resume=bool(args.resume))
    t0 = time.perf_counter()
    try:
        trainer.run()
    except TrainingAborted as e:
        print(f"stablerl train: stopped: {e}", file=sys.stderr)
        return 3
    summary = summarize(run_dir)
    plots = plot_runs([run_dir], run_dir / "plots" / "curves.png")
    lines = [f"\nrun: {run_dir}  ({summary['steps']} steps, {time.perf_counter() - t0:.0f} s this invocation)"]
    for mode in ("greedy", "sampled"):
        if f"{mode}_before" in summary:
            b, a = summary[f"{mode}_before"], summary[f"{mode}_after"]
            lines.append(f"held-out accuracy ({mode}): {fmt_pct(b)} -> {fmt_pct(a)}  ({100 * (a - b):+.1f} points)")
    lines += [f"metrics: {run_dir / 'metrics.jsonl'}   tensorboard: {run_dir / 'tb'}   plots: {plots}",
              f"checkpoint: {run_dir / 'checkpoints'}"]
    print("\n".join(lines))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


def _sft(args: argparse.Namespace) -> int:
    from stablerl.trainer import cold_start

    cfg = build_config(RunConfig, args.config, args.overrides + ([f"sft.output_dir={args.out}"] if args.out else []))
    path = cold_start(cfg)
    print(f"cold-start checkpoint: {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from stablerl.trainer import Trainer

    cfg = build_config(RunConfig, args.config, args.overrides + [f"model.path={args.checkpoint}"])
    trainer = Trainer(cfg, Path(args.checkpoint), log=lambda *_: None)
    print(json.dumps(trainer.evaluate(0), indent=1))
    return 0


def _repro(args: argparse.Namespace) -> int:
    from stablerl.repro import EXPERIMENTS, run_experiment, write_report

    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    out = Path(args.out)
    for name in names:
        run_experiment(name, out, args.seeds, args.overrides)
        paths = write_report(name, out, args.seeds)
        print(f"[repro {name}] table: {paths['md']}  figure: {paths['png']}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from stablerl.plot import plot_runs

    out = plot_runs(args.run_dirs, args.out or Path(args.run_dirs[0]) / "plots" / "curves.png")
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablerl", description=__doc__ and "stable RL for LLMs (MoE first)")
    sub = parser.add_subparsers(dest="command", required=True)
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

    keys = "config keys (set with section.key=value):\n" + "\n".join(describe(RunConfig))
    train = sub.add_parser("train", help="RL training (cold start by SFT if no checkpoint), then evaluation",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=keys)
    train.add_argument("--config", help="YAML or TOML file with RunConfig sections")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. loss.eps_high=0.28 train.steps=100")
    train.set_defaults(func=_train)

    sft = sub.add_parser("sft", help="cold-start SFT on teacher solutions; saves an HF checkpoint",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=keys)
    sft.add_argument("--config")
    sft.add_argument("--out", help="checkpoint directory (default: runs/sft/<hash>)")
    sft.add_argument("overrides", nargs="*", metavar="key=value")
    sft.set_defaults(func=_sft)

    ev = sub.add_parser("eval", help="held-out accuracy (greedy and sampled) of an HF checkpoint")
    ev.add_argument("checkpoint", help="HF checkpoint dir (model + tokenizer)")
    ev.add_argument("--config")
    ev.add_argument("overrides", nargs="*", metavar="key=value")
    ev.set_defaults(func=_eval)

    rp = sub.add_parser("repro", help="the paper's experiments in miniature (docs/results.md)")
    from stablerl.repro.experiments import EXPERIMENTS

    rp.add_argument("experiment", choices=[*EXPERIMENTS, "all"],
                    help="one experiment, or all of them in this order")
    rp.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    rp.add_argument("--out", default="runs/repro", help="output directory (default runs/repro)")
    rp.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run (after the experiment's)")
    rp.set_defaults(func=_repro)

    pl = sub.add_parser("plot", help="PNG curves comparing runs")
    pl.add_argument("run_dirs", nargs="+")
    pl.add_argument("--out", help="PNG path (default: FIRST_RUN/plots/curves.png)")
    pl.set_defaults(func=_plot)
    return parser


def _quiet_hf() -> None:
    # nothing is fetched from a hub at run time, and HF's per-file progress bars are noise here
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "lab":
        _quiet_hf()
    try:
        return args.func(args)
    except ValueError as e:
        print(f"stablerl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
