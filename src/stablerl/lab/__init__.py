"""The exact first-order lab: enumerate every response of a tiny autoregressive policy and compare
each token-level surrogate's exact expected gradient with the true sequence-level gradient."""

from stablerl.lab.sweep import SURROGATES, run_lab

__all__ = ["SURROGATES", "run_lab"]
