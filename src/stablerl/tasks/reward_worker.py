"""Entry point of a reward worker process: ``python -m stablerl.tasks.reward_worker FD CONFIG``.

Started by ``stablerl.tasks.reward.RewardPool``; FD is its end of a socket pair, CONFIG a JSON
object with the reward function specs and the memory cap. Imports no torch.
"""

import json
import sys
from multiprocessing.connection import Connection

from stablerl.tasks.reward import worker_main

if __name__ == "__main__":
    fd, config = int(sys.argv[1]), json.loads(sys.argv[2])
    worker_main(Connection(fd), config["specs"], config["memory_mb"])
