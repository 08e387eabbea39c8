"""`stablerl repro`: the paper's findings reproduced in miniature (docs/results.md)."""

from stablerl.repro.experiments import EXPERIMENTS
from stablerl.repro.report import write_report
from stablerl.repro.runner import run_experiment
from stablerl.repro.stats import collapse_step

__all__ = ["EXPERIMENTS", "collapse_step", "run_experiment", "write_report"]
