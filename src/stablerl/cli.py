"""The ``stablerl`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stablerl.config import LabConfig, build_config, describe


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"stablerl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
