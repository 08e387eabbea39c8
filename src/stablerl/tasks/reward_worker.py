"""A reward worker process: ``python -m stablerl.tasks.reward_worker FD CONFIG``.

Started by ``stablerl.tasks.reward.RewardPool``; FD is its end of a socket pair, CONFIG a JSON
object with the reward function specs, the memory cap and whether to import the functions before
saying it is ready. Imports no torch.
"""

from __future__ import annotations

import json
import signal
import sys
from multiprocessing.connection import Connection

from stablerl.tasks.process_tree import PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, TaskCap, prctl
from stablerl.tasks.reward import READY, reward_value
from stablerl.tasks.verifiers import is_batched, resolve


def worker_main(conn, specs: list[str], memory_mb: int | None, preload: bool = False) -> None:
    """A worker's loop (``stablerl.tasks.reward_worker``): call, reply, repeat, until told to stop.

    A job ``((-1, k), k, None, None, None)`` only imports and checks function k (the pool does this
    at start-up, so a user's module is never imported in the trainer's process). With ``preload``
    every function is imported before the worker says it is READY; an import's failure is
    reported by the first job that needs the function, and the next one imports it again."""
    _confine(memory_mb)
    cap_tasks = TaskCap()
    cap_tasks()
    fns, failed = {}, {}
    for k, spec in enumerate(specs if preload else []):
        try:
            fns[k] = resolve(spec)
        except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt included
            failed[k] = e
    try:
        conn.send_bytes(READY)
    except (OSError, ValueError):
        return
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if job is None:
            return
        cap_tasks()
        reply = _answer(job, specs, fns, failed)
        try:
            # JSON, never pickle: the trainer must not unpickle what a process running user code sends
            conn.send_bytes(json.dumps(reply).encode())
        except (OSError, ValueError):
            return


def _confine(memory_mb: int | None) -> None:
    """Tie the worker to its parent and cap the memory a call may take (its processes: TaskCap)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the kernel kills this worker when its parent dies
    # orphaned descendants of a call re-parent to this worker, so killing its tree gets them all
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    import resource  # POSIX only: imported here, where the worker (Linux) needs it

    if memory_mb:
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _answer(job: tuple, specs: list[str], fns: dict, failed: dict) -> tuple:
    """One job's reply: ``(job_id, "ok", value)`` or ``(job_id, "error", message)``."""
    job_id, fn_index, prompt, completion, fields = job
    try:
        if fn_index in failed:  # reported once; a later job imports it again
            raise failed.pop(fn_index)
        if fn_index not in fns:
            fns[fn_index] = resolve(specs[fn_index])
        if job_id[0] == -1:  # an import check; the reply says whether it is TRL-style (batched)
            reply = (job_id, "ok", float(is_batched(fns[fn_index])))
        elif job_id[1] == -1:  # TRL-style: every response at once, columns as lists
            out = fns[fn_index](completions=completion, prompts=prompt, **fields)
            if not isinstance(out, (list, tuple)) or len(out) != len(completion):
                raise ValueError(
                    f"returned {type(out).__name__} of length {len(out) if hasattr(out, '__len__') else '?'}"
                    f", not a list of {len(completion)} rewards (one per completion)"
                )
            reply = (job_id, "ok", [_item(v) for v in out])
        else:
            reply = (job_id, "ok", reward_value(fns[fn_index](prompt, completion, **fields)))
    except ValueError as e:  # resolve's own errors are already sentences
        reply = (job_id, "error", (str(e) if job_id[0] == -1 else f"ValueError: {e}")[:500])
    except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt included
        reply = (job_id, "error", f"{type(e).__name__}: {e}"[:500])
    return reply


def _item(value) -> list:
    """One reward of a TRL-style list: ``[value, None]``, or ``[0.0, error]``; None (TRL's "does
    not apply to this sample") is a reward of 0, not an error."""
    if value is None:
        return [0.0, None]
    try:
        return [reward_value(value), None]
    except ValueError as e:
        return [0.0, f"ValueError: {e}"[:500]]


if __name__ == "__main__":
    fd, config = int(sys.argv[1]), json.loads(sys.argv[2])
    worker_main(Connection(fd), config["specs"], config["memory_mb"], config["preload"])
