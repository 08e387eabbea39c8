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

import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stablerl import distributed as D
from stablerl import metrics as M
from stablerl.diagnostics import k3
from stablerl.forward import response_logp
from stablerl.generation import sample_and_score
from stablerl.models import build_model, is_moe, load_policy
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
#
# In-flight updates (rollout.vllm.in_flight_updates) drop the fixed lag for a bound: the learner
# sends version s as soon as step s is trained, and the worker's InFlightFeed loads it into the
# servers at once, while they sample if they do; a step waits only for version s - 1 - eta.
# --------------------------------------------------------------------------------------------
def initial_versions(start_step: int, eta: int, in_flight: bool = False) -> list[int]:
    """The versions a worker needs before its first step after ``start_step`` (in flight: the
    newest alone)."""
    if eta == 0 or in_flight:
        return [start_step]
    return list(range(sampling_version(start_step + 1, eta), max(0, start_step - 1) + 1))


def send_version(version: int, weights: dict, device) -> None:
    """Learner rank 0: one policy version to every worker, tensor by tensor (at most one extra
    full tensor on the sender at a time)."""
    D.transfer_object((version, [(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in weights.items()]))
    for t in weights.values():
        D.transfer_tensor(t.to(device).contiguous())


def start_workers(
    world: D.World,
    start: int,
    eta: int,
    source: str,
    lag: LaggedWeights,
    extra_prompts: int = 0,
    in_flight: bool = False,
) -> None:
    """The handshake every rollout worker waits for: the model, the step to start after, the
    versions it needs first, the prompts batch.filter_groups' extra rounds consumed so far
    (learner rank 0 sends; run_worker receives)."""
    if not world.workers or not world.is_main:
        return
    needed = initial_versions(start, eta, in_flight)
    hello = {"source": source, "start_step": start, "initial": len(needed), "extra_prompts": extra_prompts}
    D.transfer_object(hello, long=True)
    for v in needed:
        send_version(v, lag.versions[v], world.device)


def send_to_workers(
    world: D.World,
    step: int,
    eta: int,
    last_step: int,
    lag: LaggedWeights | None,
    *,
    trained: bool,
    in_flight: bool = False,
):
    """Learner rank 0's weight messages of step ``step``: with eta >= 1 version step - 1 as soon
    as the step's rollouts are in (the workers sample on meanwhile); with eta = 0, or in flight,
    version ``step`` once trained (``trained``), unless it is the last step."""
    if not world.workers or not world.is_main:
        return
    if in_flight:
        if trained and step < last_step:
            send_version(step, lag.versions[step], world.device)
    elif not trained and eta >= 1 and step >= 2:
        send_version(step - 1, lag.versions[step - 1], world.device)
    elif trained and eta == 0 and step < last_step:
        send_version(step, lag.versions[step], world.device)


class LagSplit:
    """The training-inference mismatch split (``log.lag_kl``): the engine's part, mu against the
    training policy of the version that sampled (pi_v, its weights kept for the lag), and the
    lag's, pi_v against pi_old. In k1 the split is exact on the same tokens:
    E_mu[log mu - log pi_old] = E_mu[log mu - log pi_v] + E_mu[log pi_v - log pi_old]. pi_v is
    routed as pi_old is (R3: the rollout's routes)."""

    def __init__(self, model_config, replay_rollout: bool, recompute: bool):
        self.model_config, self.replay_rollout, self.recompute = model_config, replay_rollout, recompute
        self.model = None  # one more full copy of the weights, on every learner rank, built on first use

    def __call__(self, lag: LaggedWeights | None, batch, metrics: dict) -> dict:
        weights = lag.versions.get(batch.version) if lag is not None else None
        if weights is None:
            return {}
        if self.model is None:
            self.model = build_model(self.model_config).eval().requires_grad_(False)
        self.model.load_state_dict(weights)
        replay = batch.routes if self.replay_rollout else None
        with torch.no_grad():
            out = response_logp(self.model, batch, replay=replay, temperature=batch.sampling.temperature)
        d = (out["logp"] - batch.rollout_logp)[batch.response_mask].double()
        k1_sum, k3_sum, n = D.all_reduce_sum([float(-d.sum()), float(k3(d).sum()), float(d.numel())]).tolist()
        split = {M.LAG_ENGINE_KL: k3_sum / max(n, 1.0), M.LAG_ENGINE_KL_K1: k1_sum / max(n, 1.0)}
        if self.recompute and M.TRAIN_INFER_KL_K1 in metrics:
            split[M.LAG_KL_K1] = metrics[M.TRAIN_INFER_KL_K1] - split[M.LAG_ENGINE_KL_K1]
        return split


def receive_version(device) -> tuple[int, dict]:
    version, spec = D.transfer_object()
    weights = {}
    for name, shape, dtype in spec:
        t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        D.transfer_tensor(t)
        weights[name] = t.cpu()
    return version, weights


class InFlightFeed:
    """A worker's side of in-flight updates: a thread receives each version learner rank 0 sends
    after a step and loads it into the servers at once, while they sample or not (the token route
    records which version sampled each token); the worker's loop only waits for the version a
    step needs at the least. The same steps as ``FixedLag``: ``before`` a step, ``after`` it,
    ``close`` at the end."""

    def __init__(self, engine, device, count: int, eta: int, timeout_s: float):
        self.engine, self.eta, self.timeout_s = engine, eta, timeout_s
        self.loaded, self.error = engine.version, None
        self.ready = threading.Condition()
        self.thread = threading.Thread(target=self._receive, args=(device, count), daemon=True)
        self.thread.start()

    def _receive(self, device, count: int) -> None:
        try:
            for _ in range(count):
                version, weights = receive_version(device)
                self.engine.load_weights(weights, version=version, in_flight=True)
                with self.ready:
                    self.loaded = version
                    self.ready.notify_all()
        except BaseException as e:  # handed to the worker's loop
            with self.ready:
                self.error = e
                self.ready.notify_all()

    def wait_for(self, version: int) -> float:
        """Block until the servers hold ``version`` or a newer one; the seconds waited."""
        t0 = time.perf_counter()
        with self.ready:
            self.ready.wait_for(lambda: self.loaded >= version or self.error is not None, self.timeout_s)
        if self.error is not None:
            raise RuntimeError(f"in-flight weight updates stopped: {self.error}") from self.error
        if self.loaded < version:
            raise TimeoutError(
                f"the rollout worker waited {self.timeout_s:.0f} s (distributed.timeout_s) for policy version "
                f"{version}; the servers hold {self.loaded}"
            )
        return time.perf_counter() - t0

    def before(self, step: int) -> float:
        """Wait for the oldest version that may sample ``step``; the seconds waited."""
        return self.wait_for(sampling_version(step, self.eta))

    def after(self, step: int) -> None:
        """Nothing: versions arrive on the feed's thread."""

    def close(self) -> None:
        """After the last step: the last version's load must have ended, and well."""
        self.thread.join(self.timeout_s)
        if self.error is not None:
            raise RuntimeError(f"in-flight weight updates stopped: {self.error}") from self.error
        if self.thread.is_alive():
            raise TimeoutError(f"the last in-flight weight update did not end within {self.timeout_s:.0f} s")


class FixedLag:
    """A worker's side of the fixed lag: the versions it was sent, loaded at step boundaries."""

    def __init__(self, engine, versions: dict, eta: int, start_step: int, device):
        self.engine, self.versions, self.eta, self.start, self.device = engine, versions, eta, start_step, device

    def before(self, step: int) -> float:
        """Load the version that samples ``step``; the seconds waited for it."""
        t0 = time.perf_counter()
        if self.eta == 0 and step > self.start + 1:
            v, w = receive_version(self.device)
            self.versions[v] = w
        waited = time.perf_counter() - t0
        target = sampling_version(step, self.eta)
        if self.engine.version != target:
            self.engine.load_weights(self.versions[target], version=target)
        self.versions = {v: w for v, w in self.versions.items() if v >= target}
        return waited

    def after(self, step: int) -> None:
        if self.eta >= 1 and step >= 2:
            v, w = receive_version(self.device)
            self.versions[v] = w

    def close(self) -> None:
        """Nothing: every version was received in the loop."""


def run_worker(cfg, world, log=print) -> None:
    """A rollout worker's whole life: the start-up handshake (which model, from which step, the
    versions it needs), then per step the weights it needs, its share of the step's groups
    sampled and scored, and each learner rank's part of them sent to it."""
    hello = D.transfer_object(long=True)  # waits out rank 0's set-up (a cold start included)
    if hello is None:  # the learners failed to start: nothing to do
        return
    # the structure only: the weights are the learners' versions (a resumed run's source is a
    # checkpoint, which holds DCP shards and no HF weights)
    model, tokenizer = load_policy(hello["source"], weights=False)
    task = build_task(cfg.task)
    eta, P, K, R = cfg.rollout.max_staleness, cfg.batch.prompts_per_step, world.size, world.workers
    in_flight, start = cfg.rollout.vllm.in_flight_updates, hello["start_step"]
    versions = dict(receive_version(world.device) for _ in range(hello["initial"]))
    first = max(versions) if in_flight else sampling_version(start + 1, eta)
    # distributed: a vLLM engine joins the workers' own default process group (external_launcher),
    # never the learners' (distributed/world.py)
    engine = build_engine(
        cfg.rollout,
        model,
        tokenizer,
        seed=cfg.train.seed,
        distributed=True,
        weights=versions[first],
        version=first,
        log_dir=Path(cfg.run_dir) / "vllm_servers" if cfg.run_dir else None,
        timeout_s=cfg.distributed.timeout_s,
    )
    if in_flight:
        feed = InFlightFeed(engine, world.device, cfg.train.steps - 1 - start, eta, cfg.distributed.timeout_s)
    else:
        feed = FixedLag(engine, versions, eta, start, world.device)
    moe = is_moe(model)
    mine = D.share(world.worker_index, R, P)
    extra_prompts = hello.get("extra_prompts", 0)  # the prompts extra filter rounds consumed before
    with reward_pool(task, cfg.task) as rewards:
        for step in range(start + 1, cfg.train.steps + 1):
            waited = feed.before(step)
            base, rd = step * P + extra_prompts, 0
            _sample_and_send(engine, tokenizer, task, rewards, cfg, step, base, rd, mine, K, moe, waited)
            # batch.filter_groups: learner rank 0 says whether the step samples another round
            while cfg.batch.filter_groups and D.transfer_object():
                rd += 1
                _sample_and_send(engine, tokenizer, task, rewards, cfg, step, base, rd, mine, K, moe, 0.0)
            extra_prompts += rd * P
            feed.after(step)
    feed.close()


def _sample_and_send(engine, tokenizer, task, rewards, cfg, step, base, rd, mine, K, moe, waited) -> None:
    """A worker's share ``mine`` of sampling round ``rd`` of step ``step`` (prompts ``base + rd*P ..``,
    seeds as the learners' own sampling derives them), sampled, scored and sent: every learner gets
    one message per round and worker, maybe empty."""
    P, G = cfg.batch.prompts_per_step, cfg.batch.group_size
    problems = [task.train_problem(base + rd * P + i) for i in mine]
    seeds = rollout_seeds(cfg.train.seed, step, [(rd * P + i) * G + g for i in mine for g in range(G)])
    scored = sample_and_score(
        engine, tokenizer, problems, G, rewards, cfg.rollout.sampling(), seeds, cfg.task, capture_routes=moe
    )
    for r in range(K):
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
