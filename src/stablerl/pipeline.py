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

import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stablerl import distributed as D
from stablerl.generation import sample_and_score
from stablerl.models import is_moe, load_policy
from stablerl.rollout import build_engine
from stablerl.seeds import rollout_seeds
from stablerl.tasks import build_task, reward_pool
from stablerl.tasks.reward import RewardStats

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
        root = Path(ckpt_dir) / LAG_DIR
        root.mkdir(parents=True, exist_ok=True)
        for v, weights in self.versions.items():
            if v != newest:
                save_file({k: t.contiguous() for k, t in weights.items()}, str(root / f"version_{v:06d}.safetensors"))

    def load(self, ckpt_dir: Path, newest: int, newest_weights) -> None:
        """Restore what ``save`` wrote, and ``newest_weights`` as version ``newest``; a missing
        version is a clear error (the checkpoint was made with another lag, or damaged)."""
        self.versions = {}
        for v in range(sampling_version(newest + 1, self.eta), newest):
            path = Path(ckpt_dir) / LAG_DIR / f"version_{v:06d}.safetensors"
            if not path.is_file():
                raise ValueError(
                    f"{ckpt_dir}: the weights of policy version {v}, which rollout.max_staleness="
                    f"{self.eta} samples the next step with, are missing ({path})"
                )
            self.versions[v] = load_file(str(path))
        self.keep(newest, newest_weights)


# --------------------------------------------------------------------------------------------
# Rollout workers: R processes of the same torchrun job (the last R ranks) that only sample.
#
# Per step s the order of messages is fixed, so nobody waits on a message sent out of turn:
#   worker:  [eta = 0: receive version s - 1]  sample step s with version max(0, s - 1 - eta)
#            send every learner its groups     [eta >= 1: receive version s - 1]
#   learner: receive step s's groups           [eta >= 1: send version s - 1]   train step s
#            [eta = 0: send version s]
# With eta >= 1 the learner trains step s while the worker samples step s + 1: that is the
# overlap, and it is why a worker is always eta versions behind.
# --------------------------------------------------------------------------------------------
def initial_versions(start_step: int, eta: int) -> list[int]:
    """The versions a worker needs before its first step after ``start_step``."""
    if eta == 0:
        return [start_step]
    return list(range(sampling_version(start_step + 1, eta), max(0, start_step - 1) + 1))


def send_version(version: int, weights: dict, device) -> None:
    """Learner rank 0: one policy version to every worker, tensor by tensor (at most one extra
    full tensor on the sender at a time)."""
    D.transfer_object((version, [(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in weights.items()]))
    for t in weights.values():
        D.transfer_tensor(t.to(device).contiguous())


def receive_version(device) -> tuple[int, dict]:
    version, spec = D.transfer_object()
    weights = {}
    for name, shape, dtype in spec:
        t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        D.transfer_tensor(t)
        weights[name] = t.cpu()
    return version, weights


def run_worker(cfg, world, log=print) -> None:
    """A rollout worker's whole life: the start-up handshake (which model, from which step, the
    versions it needs), then per step the weights it needs, its share of the step's groups
    sampled and scored, and each learner rank's part of them sent to it."""
    hello = D.transfer_object(long=True)  # waits out rank 0's set-up (a cold start included)
    if hello is None:  # the learners failed to start: nothing to do
        return
    model, tokenizer = load_policy(hello["source"])
    task = build_task(cfg.task)
    eta, P, G, K, R = (
        cfg.rollout.max_staleness,
        cfg.batch.prompts_per_step,
        cfg.batch.group_size,
        world.size,
        world.workers,
    )
    versions = dict(receive_version(world.device) for _ in range(hello["initial"]))
    # distributed: a vLLM engine joins the workers' own default process group (external_launcher),
    # never the learners' (distributed/world.py)
    engine = build_engine(
        cfg.rollout,
        model,
        tokenizer,
        seed=cfg.train.seed,
        distributed=True,
        log_dir=Path(cfg.run_dir) / "vllm_servers" if cfg.run_dir else None,
        timeout_s=cfg.distributed.timeout_s,
    )
    moe = is_moe(model)
    sampling = cfg.rollout.sampling()
    mine = D.share(world.worker_index, R, P)
    with reward_pool(task, cfg.task) as rewards:
        for step in range(hello["start_step"] + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            if eta == 0 and step > hello["start_step"] + 1:
                v, w = receive_version(world.device)
                versions[v] = w
            waited = time.perf_counter() - t0
            target = sampling_version(step, eta)
            if engine.version != target or step == hello["start_step"] + 1:
                engine.load_weights(versions[target], version=target)
            versions = {v: w for v, w in versions.items() if v >= target}
            problems = [task.train_problem(step * P + i) for i in mine]
            seeds = rollout_seeds(cfg.train.seed, step, [i * G + g for i in mine for g in range(G)])
            scored = sample_and_score(
                engine, tokenizer, problems, G, rewards, sampling, seeds, cfg.task, capture_routes=moe
            )
            for r in range(K):  # every learner gets one message per step and worker, maybe empty
                theirs = [j for j, i in enumerate(mine) if i in D.share(r, K, P)]
                rows = [j * G + g for j in theirs for g in range(G)]
                part = None
                if rows:
                    part = {
                        "batch": scored.batch.select(rows),
                        "texts": [scored.texts[i] for i in rows],
                        "per_fn": {n: [vals[i] for i in rows] for n, vals in scored.result.per_fn.items()},
                    }
                D.send_object(
                    {"part": part, "stats": scored.result.stats if r == 0 else RewardStats(), "worker_wait_s": waited},
                    dst=r,
                )
            if eta >= 1 and step >= 2:
                v, w = receive_version(world.device)
                versions[v] = w
