raise KeyboardInterrupt


def reward(prompt, completion, **_):
    return 1.0
