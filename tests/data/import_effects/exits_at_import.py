import sys

sys.exit(4)


def reward(prompt, completion, **_):
    return 1.0
