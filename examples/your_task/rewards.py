"""The example's reward functions. stablerl calls each as

    fn(prompt: str, completion: str, **fields) -> float

in worker processes (a function that raises, hangs or crashes gives 0 and is counted, never stops
training). `fields` holds every column of the problem's row (`answer`, `numbers`, ...).
"""

import re

_ANSWER = re.compile(r"Answer:\s*(-?\d+)\s*$")


def correct(prompt: str, completion: str, answer: str, **_) -> float:
    """1 when the completion ends with "Answer: N" and N is the reference answer."""
    m = _ANSWER.search(completion.strip())
    return float(m is not None and m.group(1) == str(answer))


def well_formed(prompt: str, completion: str, **_) -> float:
    """1 when the completion ends with "Answer: <integer>", whatever the integer: a format reward."""
    return float(_ANSWER.search(completion.strip()) is not None)


def shows_work(prompt: str, completion: str, numbers: str, **_) -> float:
    """The fraction of the running maxima a careful solver writes that appear before the answer
    (uses the row's `numbers` column)."""
    values = [int(x) for x in numbers.split(",")]
    running = [max(values[: i + 1]) for i in range(1, len(values))]
    work = completion.split("Answer:")[0]
    return sum(str(v) in work for v in running) / len(running)
