"""Reward functions for the tests, loaded by file path in the reward pool's worker processes."""

import os
import sys
import time


def exact(prompt, completion, answer, **_):
    return float(completion.strip() == str(answer))


def hang(prompt, completion, **_):
    if "hang" in completion:
        while True:
            time.sleep(1)
    return 1.0


def slow(prompt, completion, **_):
    time.sleep(0.4)
    return 1.0


def boom(prompt, completion, **_):
    if "boom" in completion:
        raise RuntimeError("verifier crashed")
    return 1.0


def exits(prompt, completion, **_):
    if "exit" in completion:
        sys.exit(3)
    return 1.0


def dies(prompt, completion, **_):
    if "die" in completion:
        os._exit(9)
    return 1.0


def hog(prompt, completion, **_):
    if "hog" in completion:
        return float(len(bytearray(8 * 2**30)))  # 8 GiB: over the worker's address-space cap
    return 1.0


def not_a_number(prompt, completion, **_):
    return float("nan")


def uses_alarm(prompt, completion, **_):
    """signal.alarm works only in a process's main thread (as math-verify needs)."""
    import signal

    signal.signal(signal.SIGALRM, lambda *a: None)
    signal.alarm(5)
    signal.alarm(0)
    return 1.0


def digit_fraction(prompt, completion, **_):
    """A graded reward (the fraction of digits): never constant within a group, so every step of a
    test run has non-zero advantages and a real gradient."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


def hang_on_digits(prompt, completion, **_):
    """Hangs forever on any completion with a digit (most of them): a verifier stuck in a loop."""
    if any(c.isdigit() for c in completion):
        while True:
            time.sleep(1)
    return 0.0


def boom_always(prompt, completion, **_):
    raise RuntimeError("this verifier always fails")


def hang_always(prompt, completion, **_):
    while True:
        time.sleep(1)


def die_always(prompt, completion, **_):
    os._exit(9)


def string_reward(prompt, completion, **_):
    return "0.75"


def bool_reward(prompt, completion, **_):
    return completion.startswith("a")


def huge(prompt, completion, **_):
    return 1e308


def overflowing(prompt, completion, **_):
    return 1e38


def numpy_reward(prompt, completion, **_):
    import numpy

    return numpy.float32(0.5)


def spawns_and_hangs(prompt, completion, **_):
    """Starts a grandchild in a new session (escaping a process group), records its pid, hangs."""
    import subprocess

    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    with open(os.environ["STABLERL_TEST_MARKER"], "w") as f:
        f.write(str(child.pid))
    while True:
        time.sleep(1)


def trl_length(completions, **kwargs):
    """TRL's signature: every completion at once, the columns (and prompts) as lists."""
    assert len(kwargs["prompts"]) == len(completions) and len(kwargs["answer"]) == len(completions)
    return [float(c == a) if a is not None else None for c, a in zip(completions, kwargs["answer"])]


def trl_conversational(completions, prompts, **kwargs):
    """TRL's conversational form: each completion ``[{"role": "assistant", "content": ...}]``, each
    prompt its chat turns; the reward says which form it got."""
    out = []
    for c, p in zip(completions, prompts):
        if isinstance(c, str):
            out.append(-1.0 if isinstance(p, str) else -2.0)
        else:
            assert [m["role"] for m in c] == ["assistant"] and p[-1]["role"] == "user"
            out.append(float(len(c[0]["content"])) + 0.5 * (p[0]["role"] == "system"))
    return out


def trl_bad_item(completions, **kwargs):
    return [1.0] + ["oops"] * (len(completions) - 1)


def trl_wrong_length(completions, **kwargs):
    return [1.0]


def graded_if_listed(prompt, completion, **_):
    """digit_fraction on the prompts listed (one per line) in the file $STABLERL_TEST_SIGNAL_PROMPTS,
    0 elsewhere: a run whose reward has signal only at the steps that sample those prompts."""
    listed = open(os.environ["STABLERL_TEST_SIGNAL_PROMPTS"]).read().split("\n\x00\n")
    return digit_fraction(prompt, completion) if prompt in listed else 0.0


def graded_on_half(prompt, completion, **_):
    """digit_fraction on about half of the prompts (by a hash of the prompt), 0 on the rest: groups
    of the rest have no learning signal (batch.filter_groups drops them)."""
    import zlib

    return digit_fraction(prompt, completion) if zlib.crc32(prompt.encode()) % 2 else 0.0
