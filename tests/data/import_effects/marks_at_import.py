import os

# an import-time side effect the trainer's process must never see
os.environ["STABLERL_TEST_IMPORTED_IN_TRAINER"] = "1"
open(os.environ["STABLERL_TEST_MARKER"], "a").write(f"{os.getpid()}\n")


def reward(prompt, completion, **_):
    return 1.0


def wrong_signature(completion):
    return 1.0
