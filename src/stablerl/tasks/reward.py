"""Scoring responses without letting a reward function zero, stall or kill a run.

Reward functions run in a pool of worker *processes* (``RewardPool``), never in the trainer's
process or in a thread:

- each call runs in a worker's main thread, so verifiers that rely on ``signal.alarm`` (math-verify
  bounds its parsing that way) work as they do in a script;
- each call has a hard deadline: a worker still busy past ``timeout_s`` is killed and replaced,
  so a function stuck forever costs one timeout, not the run. The clock starts once the worker
  has started and imported the functions (waited for up to max(60 s, ``timeout_s``) per
  function; no call is handed out meanwhile): a new worker's start-up and a heavy
  verifier's import (math-verify's takes seconds) are not charged to a call;
- a function that raises (``sys.exit`` included) gives 0 and the worker goes on; one that kills
  its interpreter (``os._exit``, a segfault, the OOM killer) gives 0 and the worker is replaced;
  ``memory_mb`` caps each worker's address space, so runaway allocation raises ``MemoryError``
  in the worker instead of taking the machine down;
- calls run in parallel across responses (one per worker at a time).

Every failure gives reward 0, is counted by kind (error, timeout, crash) and is named by its
function in ``RewardStats``. Workers die with the trainer (``PR_SET_PDEATHSIG`` on Linux, and a
closed pipe everywhere), so a killed run leaves no verifier processes behind.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from stablerl.tasks.process_tree import kill_tree
from stablerl.tasks.verifiers import check_spec, spec_name

# one wait slice: deadlines are checked at least this often, and no OS wait call ever gets a
# timeout too large for it (a timeout such as 1e10 s overflows select/poll)
_SLICE_S = 0.5

# A reward (each function's, and their weighted total) is a number in [-MAX_ABS_REWARD,
# MAX_ABS_REWARD]. Beyond it the group sums and advantages of float32 maths lose every digit (a
# reward of 1e38 makes each advantage NaN, 1e308 is inf in float32): such a value is a counted
# reward error (reward 0) naming its function, never a dead run.
MAX_ABS_REWARD = 1e6

# how long importing the reward functions may take at start-up (at least the per-call timeout)
IMPORT_TIMEOUT_S = 60.0

# a worker's first message: it has started and imported its functions (with preload), so the
# clock of its first call starts after the interpreter's start-up and the verifiers' imports
READY = b"ready"


def reward_value(raw) -> float:
    """The reward a function's return value stands for, or ValueError saying why it is none.

    Allowed: real numbers (int, float, numpy and torch scalars) and bools (a pass/fail reward:
    True = 1.0, False = 0.0). Strings are never numbers ("0.75" is an error, as "nan" is), and the
    value must be finite and within +-MAX_ABS_REWARD."""
    if isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, (str, bytes)):
        raise ValueError(f"returned a {type(raw).__name__} ({str(raw)[:40]!r}), not a number; return a float")
    if isinstance(raw, numbers.Real):
        value = float(raw)
    elif getattr(raw, "ndim", None) == 0 and hasattr(raw, "item"):  # a 0-d numpy array or torch tensor
        return reward_value(raw.item())
    else:
        raise ValueError(f"returned a {type(raw).__name__}, not a number; return a float")
    if not (math.isfinite(value) and abs(value) <= MAX_ABS_REWARD):
        raise ValueError(
            f"returned {value:g}, outside the allowed range [-{MAX_ABS_REWARD:g}, {MAX_ABS_REWARD:g}] "
            "(rewards beyond it overflow the float32 maths of the advantages)"
        )
    return value


@dataclass
class RewardStats:
    """Failures of one scoring call. ``by_fn`` counts failures per function name."""

    errors: int = 0
    timeouts: int = 0
    crashes: int = 0
    by_fn: dict[str, int] = field(default_factory=dict)
    first_error: str = ""

    @property
    def failures(self) -> int:
        return self.errors + self.timeouts + self.crashes

    def record(self, kind: str, fn: str, detail: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        self.by_fn[fn] = self.by_fn.get(fn, 0) + 1
        self.first_error = self.first_error or f"{fn}: {detail}"

    def metrics(self, prefix: str = "reward_") -> dict[str, float]:
        return {f"{prefix}errors": self.errors, f"{prefix}timeouts": self.timeouts, f"{prefix}crashes": self.crashes}

    @classmethod
    def merge(cls, parts: list[RewardStats]) -> RewardStats:
        """The failures of several scoring calls (or ranks) together."""
        total = cls()
        for s in parts:
            total.errors += s.errors
            total.timeouts += s.timeouts
            total.crashes += s.crashes
            for fn, n in s.by_fn.items():
                total.by_fn[fn] = total.by_fn.get(fn, 0) + n
            total.first_error = total.first_error or s.first_error
        return total

    def summary(self) -> str:
        parts = [
            f"{n} {k}"
            for k, n in (("errors", self.errors), ("timeouts", self.timeouts), ("crashes", self.crashes))
            if n
        ]
        names = ", ".join(f"{fn} x{n}" for fn, n in sorted(self.by_fn.items()))
        return f"{', '.join(parts)} ({names}); reward 0 for each. First: {self.first_error}"


@dataclass
class RewardResult:
    """Per-function rewards ``{name: [one per item]}``, their weighted sum, and the failures."""

    per_fn: dict[str, list[float]]
    total: list[float]
    stats: RewardStats


class _Worker:
    """One worker: ``python -m stablerl.tasks.reward_worker`` over a socket pair.

    A plain subprocess, not ``multiprocessing``: spawn and forkserver re-import the parent's
    ``__main__``, which runs a user's unguarded training script again in every worker. The worker
    gets the parent's ``sys.path``, so it imports reward functions exactly as the parent did.
    """

    def __init__(self, specs: list[str], memory_mb: int | None, preload: bool = True):
        import json
        import socket
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        mine, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stablerl.tasks.reward_worker",
                str(theirs.fileno()),
                json.dumps({"specs": specs, "memory_mb": memory_mb, "preload": preload}),
            ],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()  # so that the worker's death reads as EOF here
        self.conn = Connection(mine.detach())
        self.job: tuple | None = None
        self.deadline = 0.0

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) for the worker's READY; False if it did not come (the
        worker died or is still starting: the job paths then find it dead or time it out)."""
        try:
            return self.conn.poll(min(timeout_s, 1e6)) and self.conn.recv_bytes() == READY
        except (EOFError, OSError):
            return False

    def exit_code(self) -> int | None:
        return self.process.poll()

    def kill(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        if self.process.poll() is None:
            kill_tree(self.process.pid)  # what a stuck call started dies with it
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except Exception:  # noqa: BLE001 - a process that will not die is the OS's problem now
            pass


class RewardPool:
    """Worker processes that call reward functions named by ``specs`` (see ``verifiers``).

    ``score(items)`` with ``items`` = ``[(prompt, completion, fields[, turns]), ...]`` returns every
    function's reward per item and the weighted total. Use as a context manager or call
    ``close()``; workers start on first use.
    """

    def __init__(
        self,
        specs: list[str],
        weights: list[float] | None = None,
        *,
        workers: int = 2,
        timeout_s: float = 10.0,
        memory_mb: int | None = None,
    ):
        if not specs:
            raise ValueError("at least one reward function is needed")
        weights = [1.0] * len(specs) if weights is None else list(weights)
        if len(weights) != len(specs):
            raise ValueError(f"{len(weights)} reward weights for {len(specs)} reward functions")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"reward timeout must be a finite number > 0, got {timeout_s}")
        for spec in specs:  # the format and the file, without importing anything
            check_spec(spec)
        self.specs, self.weights = list(specs), weights
        self.names = _unique_names(self.specs)
        self.n_workers, self.timeout_s, self.memory_mb = int(workers), float(timeout_s), memory_mb
        self._workers: list[_Worker] = []
        self._pid = os.getpid()
        self.batched = [False] * len(self.specs)  # TRL-style functions, called once per score()
        # fail before any work: a module that does not import is a config error, not a reward of 0.
        # It is imported in a worker, never here: its import-time side effects (an exit, an endless
        # loop, a KeyboardInterrupt) must not reach the trainer.
        self._check_imports()

    def _check_imports(self) -> None:
        # each function imported by its own check job, so that an error names its function
        worker = _Worker(self.specs, self.memory_mb, preload=False)
        limit = self._import_limit()
        try:
            if not worker.wait_ready(limit):
                try:
                    code = worker.process.wait(timeout=5)
                except Exception:  # noqa: BLE001 - still starting
                    raise ValueError(f"the reward worker process did not start within {limit:g} s") from None
                raise ValueError(f"the reward worker process died at start-up (exit code {code})")
            for k, spec in enumerate(self.specs):
                worker.conn.send(((-1, k), k, None, None, None))
                if not worker.conn.poll(min(limit, 1e6)):
                    raise ValueError(
                        f"reward function {spec!r}: importing it did not finish within {limit:g} s "
                        "(an endless loop at import time?)"
                    )
                try:
                    _, status, payload = _parse_reply(worker.conn.recv_bytes())
                except (EOFError, OSError, ValueError):
                    try:
                        code = worker.process.wait(timeout=5)
                    except Exception:  # noqa: BLE001
                        code = None
                    raise ValueError(
                        f"reward function {spec!r}: the process importing it died (exit code {code})"
                    ) from None
                if status != "ok":
                    raise ValueError(
                        payload
                        if payload.startswith("reward function")
                        else f"reward function {spec!r}: importing it failed: {payload}"
                    )
                self.batched[k] = payload == 1.0
        except BaseException:
            worker.kill()
            raise
        self._workers.append(worker)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if os.getpid() != self._pid:
            return
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in self._workers:
            try:
                w.process.wait(timeout=1)
            except Exception:  # noqa: BLE001 - still busy: killed below
                pass
            w.kill()
        self._workers = []

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------------------------
    def score(self, items: list[tuple]) -> RewardResult:
        stats = RewardStats()
        values = [[0.0] * len(items) for _ in self.specs]
        # a TRL-style function is one job for every item (i = -1), the others one job per item
        jobs = deque((k, -1) for k in range(len(self.specs)) if self.batched[k] and items)
        jobs.extend((k, i) for i in range(len(items)) for k in range(len(self.specs)) if not self.batched[k])
        new = [_Worker(self.specs, self.memory_mb) for _ in range(min(self.n_workers, len(jobs)) - len(self._workers))]
        self._workers += new
        for w in new:  # started side by side; no call's clock runs while they import
            w.wait_ready(self._start_limit())
        busy: dict[int, _Worker] = {}
        while jobs or busy:
            self._dispatch(jobs, items, busy, stats)
            if busy:
                self._collect(busy, values, stats, len(items))
        per_fn = dict(zip(self.names, values))
        return RewardResult(per_fn=per_fn, total=self._weighted_total(values, stats, len(items)), stats=stats)

    def _dispatch(self, jobs: deque, items: list, busy: dict, stats: RewardStats) -> None:
        """Give every idle worker the next job (a worker found dead while idle is replaced)."""
        for idx, w in enumerate(self._workers):
            if w.job is not None or not jobs:
                continue
            k, i = jobs.popleft()
            if i == -1:
                job = ((k, -1), k, *_trl_batch(items))
                limit = self.timeout_s * len(items)  # the per-call limit, for each response it scores
            else:
                prompt, completion, fields = items[i][:3]
                job, limit = ((k, i), k, prompt, completion, dict(fields)), self.timeout_s
            try:
                w.conn.send(job)
            except (OSError, ValueError) as e:  # the worker died while idle
                for _ in range(len(items)) if i == -1 else [i]:
                    stats.record("crashes", self.names[k], f"worker unavailable ({e})")
                self._replace(idx)
                continue
            w.job, w.deadline, w.limit = (k, i), time.monotonic() + limit, limit
            busy[id(w)] = w

    def _collect(self, busy: dict, values: list, stats: RewardStats, n_items: int) -> None:
        """Wait (at most one slice) for replies; record results, crashes and timeouts."""
        everyone = range(n_items)
        wait_s = max(0.0, min(_SLICE_S, min(w.deadline for w in busy.values()) - time.monotonic()))
        ready = wait([w.conn for w in busy.values()], timeout=wait_s)
        # deadlines are judged at the wait's end, and workers are replaced after every reply is
        # read: a replacement's start-up must not make another worker's finished call look late
        now, dead = time.monotonic(), []
        for idx, w in enumerate(list(self._workers)):
            if id(w) not in busy:
                continue
            k, i = w.job
            if w.conn in ready:
                try:
                    data = w.conn.recv_bytes()
                    if data == READY:  # a worker that started after wait_ready gave up on it
                        continue
                    (done_k, done_i), status, payload = _parse_reply(data)
                except (EOFError, OSError, ValueError):
                    try:
                        code = w.process.wait(timeout=1)
                    except Exception:  # noqa: BLE001
                        code = None
                    for _ in everyone if i == -1 else [i]:
                        stats.record("crashes", self.names[k], f"worker died (exit code {code})")
                    del busy[id(w)]
                    dead.append(idx)
                    continue
                self._record_reply(done_k, done_i, status, payload, values, stats, everyone)
                w.job = None
                del busy[id(w)]
            elif now >= w.deadline:
                for _ in everyone if i == -1 else [i]:
                    stats.record("timeouts", self.names[k], f"still running after {w.limit:g} s (killed)")
                del busy[id(w)]
                dead.append(idx)
        for idx in dead:
            self._replace(idx)

    def _record_reply(self, k: int, i: int, status: str, payload, values: list, stats: RewardStats, everyone) -> None:
        if status == "ok" and i == -1:
            for j, (value, error) in enumerate(payload):
                values[k][j] = value
                if error:
                    stats.record("errors", self.names[k], error)
        elif status == "ok":
            values[k][i] = payload
        else:
            for _ in everyone if i == -1 else [i]:
                stats.record("errors", self.names[k], payload)

    def _weighted_total(self, values: list, stats: RewardStats, n_items: int) -> list[float]:
        """Each item's weighted total over the reward functions; one out of bounds counts as an
        error and scores 0."""
        total = [sum(wt * col[i] for wt, col in zip(self.weights, values)) for i in range(n_items)]
        for i, t in enumerate(total):
            if not (math.isfinite(t) and abs(t) <= MAX_ABS_REWARD):
                stats.record(
                    "errors",
                    "reward_weights",
                    f"the weighted total {t:g} is outside [-{MAX_ABS_REWARD:g}, {MAX_ABS_REWARD:g}]",
                )
                total[i] = 0.0
        return total

    def _replace(self, idx: int) -> None:
        self._workers[idx].kill()
        self._workers[idx] = _Worker(self.specs, self.memory_mb)
        self._workers[idx].wait_ready(self._start_limit())

    def _import_limit(self) -> float:
        """How long importing one reward function may take (at least the per-call limit)."""
        return max(IMPORT_TIMEOUT_S, self.timeout_s)

    def _start_limit(self) -> float:
        """How long a new worker may take to start and import every function (each import gets
        what the start-up check gives it); past it, its first call's clock runs anyway."""
        return self._import_limit() * len(self.specs)


def _parse_reply(data: bytes) -> tuple[tuple[int, int], str, float | str | list]:
    """A worker's JSON reply; ValueError for anything else (it is then treated as a crash)."""
    (k, i), status, payload = json.loads(data)
    if status not in ("ok", "error") or not isinstance(k, int) or not isinstance(i, int):
        raise ValueError("malformed reply")
    if status == "ok" and i == -1 and k >= 0:  # a TRL-style batch: [[value, error or None], ...]
        if not isinstance(payload, list) or not all(
            isinstance(x, list) and len(x) == 2 and isinstance(x[0], (int, float)) for x in payload
        ):
            raise ValueError("malformed reply")
    elif status == "ok" and not isinstance(payload, (int, float)):
        raise ValueError("malformed reply")
    return (k, i), status, payload


def _trl_batch(items: list) -> tuple[list, list, dict]:
    """A TRL-style call's prompts, completions and columns. Items are ``(prompt, completion,
    fields[, turns])``; where the prompt went through a chat template (``turns``, the chat turns
    the model saw), TRL's conversational form: each prompt its turns, each completion
    ``[{"role": "assistant", "content": text}]``."""
    chat = any(len(item) > 3 and item[3] for item in items)
    prompts = [list(item[3]) if chat else item[0] for item in items]
    completions = [[{"role": "assistant", "content": item[1]}] if chat else item[1] for item in items]
    return prompts, completions, _columns([dict(item[2]) for item in items])


def _columns(rows: list[dict]) -> dict[str, list]:
    """The rows' fields as columns, TRL's way (a field a row lacks is None there)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [row.get(k) for row in rows] for k in keys}


def _unique_names(specs: list[str]) -> list[str]:
    names, seen = [], {}
    for spec in specs:
        base = spec_name(spec)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names
