"""The asynchronous side of training: staleness as a fixed, bounded lag (docs/training.md
"Staleness").

``rollout.max_staleness`` = eta: the batch trained at step s was sampled by the policy of version
``max(0, s - 1 - eta)`` (version v = the weights after v learner steps; version 0 is the starting
policy). A *fixed* lag, not "at most eta", so that a run is deterministic, resumable and equal to
its one-process reference: the same config gives the same metrics however the sampling is laid
out. eta = 0 is the synchronous loop.

``LaggedWeights`` applies the lag in the learner's own process: the engine simply loads weights eta
steps late. It keeps the weights of the versions the engine has not loaded yet (eta full copies
on the CPU of every rank), and they belong to the checkpoint, so a resume continues exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

LAG_DIR = "lag"


def sampling_version(step: int, eta: int) -> int:
    """The policy version that samples the batch trained at ``step`` (1-based)."""
    return max(0, step - 1 - eta)


class LaggedWeights:
    """Versions ``max(0, s - eta) .. s`` of the weights after step s; the engine holds the oldest."""

    def __init__(self, eta: int):
        self.eta = eta
        self.versions: dict[int, dict[str, torch.Tensor]] = {}

    def keep(self, version: int, weights) -> None:
        """Remember version ``version`` (``weights``: a state dict or a stream of (name, tensor))."""
        items = weights.items() if hasattr(weights, "items") else weights
        self.versions[version] = {name: t.detach().to("cpu", copy=True) for name, t in items}

    def advance(self, step: int) -> tuple[int, dict[str, torch.Tensor]]:
        """After step ``step``: the version the engine samples step + 1 with, and its weights;
        older versions are dropped."""
        target = sampling_version(step + 1, self.eta)
        self.versions = {v: w for v, w in self.versions.items() if v >= target}
        return target, self.versions[target]

    # -- checkpoints: every kept version but the newest (that one is the checkpoint's model) -------
    def save(self, ckpt_dir: Path, newest: int) -> None:
        from safetensors.torch import save_file

        root = Path(ckpt_dir) / LAG_DIR
        root.mkdir(parents=True, exist_ok=True)
        for v, weights in self.versions.items():
            if v != newest:
                save_file({k: t.contiguous() for k, t in weights.items()}, str(root / f"version_{v:06d}.safetensors"))

    def load(self, ckpt_dir: Path, newest: int, newest_weights) -> None:
        """Restore what ``save`` wrote, and ``newest_weights`` as version ``newest``; a missing
        version is a clear error (the checkpoint was made with another lag, or damaged)."""
        from safetensors.torch import load_file

        self.versions = {}
        for v in range(sampling_version(newest + 1, self.eta), newest):
            path = Path(ckpt_dir) / LAG_DIR / f"version_{v:06d}.safetensors"
            if not path.is_file():
                raise ValueError(f"{ckpt_dir}: the weights of policy version {v}, which rollout.max_staleness="
                                 f"{self.eta} samples the next step with, are missing ({path})")
            self.versions[v] = load_file(str(path))
        self.keep(newest, newest_weights)
