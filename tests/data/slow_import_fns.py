"""A reward module whose import takes 1.5 s, as a heavy verifier library's can."""

import time

time.sleep(1.5)


def fine(prompt, completion, **_):
    if completion == "hang":
        time.sleep(60)
    if completion.startswith("sleep"):
        time.sleep(float(completion[len("sleep") :]))
    return 1.0
