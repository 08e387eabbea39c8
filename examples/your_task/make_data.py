"""Writes the example's data: "which number is largest?" problems with a worked teacher solution.

    python examples/your_task/make_data.py     # data/train.jsonl (400 rows), data/test.csv (60 rows)

Any columns may be added: every column of a row reaches the reward functions as a keyword
argument (here `numbers`, which `rewards.py:shows_work` uses).
"""

import csv
import json
import random
from pathlib import Path


def row(rng: random.Random) -> dict:
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    best = max(numbers)
    listed = ", ".join(map(str, numbers))
    # the teacher compares left to right, then answers in the format the rewards check
    steps, top = [], numbers[0]
    for n in numbers[1:]:
        top = max(top, n)
        steps.append(str(top))
    return {
        "question": f"Largest of {listed}?",
        "answer": str(best),
        "numbers": listed,
        "solution": f"{' '.join(steps)}. Answer: {best}",
    }


def main() -> None:
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    rng = random.Random(0)
    rows = [row(rng) for _ in range(460)]
    with (out / "train.jsonl").open("w") as f:
        for r in rows[:400]:
            f.write(json.dumps(r) + "\n")
    with (out / "test.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer", "numbers"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("question", "answer", "numbers")} for r in rows[400:])


if __name__ == "__main__":
    main()
