"""stablerl's vLLM general plugin (entry point ``vllm.general_plugins``: stablerl), which vLLM runs
in each of its processes.

- It registers stablerl's gloo weight-transfer engine with vLLM's ``WeightTransferEngineFactory``,
  so a server started with ``--weight-transfer-config '{"backend": "stablerl_gloo"}'`` takes
  weights over gloo (CPU).
- In a CPU server that stablerl starts for an MoE model (``STABLERL_VLLM_ROUTES`` set: the MoE
  layers and top-k), it records the experts each router picks, per request and position, with
  the same recorder as the in-process engine; the client takes them by request id through vLLM's
  ``/collective_rpc`` (method ``stablerl_routes``). vLLM's own ``routed_experts`` needs its GPU
  model runner, so GPUs use that instead.

Elsewhere it only registers: nothing runs until a server is configured to use it.
"""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np

ROUTES_ENV = "STABLERL_VLLM_ROUTES"
ROUTES_RPC = "stablerl_routes"


def register() -> None:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from stablerl.rollout.weight_transfer import GLOO_BACKEND

    if GLOO_BACKEND not in WeightTransferEngineFactory._registry:  # vLLM may load a plugin twice
        WeightTransferEngineFactory.register_engine(
            GLOO_BACKEND, "stablerl.rollout.gloo_transfer", "GlooWeightTransferEngine"
        )
    if os.environ.get(ROUTES_ENV):
        _record_routes_in_cpu_workers(json.loads(os.environ[ROUTES_ENV]))


def encode_routes(seq: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, seq.astype(np.int16), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def decode_routes(text: str) -> np.ndarray:
    """What ``encode_routes`` (and vLLM's ``routed_experts``) send: base64 ``.npy``, never pickled."""
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


def _record_routes_in_cpu_workers(spec: dict) -> None:
    from vllm.v1.worker.cpu_worker import CPUWorker

    if getattr(CPUWorker, ROUTES_RPC, None) is not None:
        return
    load_model = CPUWorker.load_model

    def load_model_and_record(self, *args, **kwargs):
        from stablerl.rollout.vllm import _RouteRecorder

        load_model(self, *args, **kwargs)
        self._stablerl_recorder = _RouteRecorder(self.model_runner, spec["layers"], spec["top_k"])
        self._stablerl_recorder.active = True
        self._stablerl_routes = {}

    def stablerl_routes(self, request_ids: str) -> dict:
        """``{request id: base64 .npy [positions, moe_layers, top_k]}`` of the finished requests
        named (JSON list), each handed out once."""
        self._stablerl_recorder.collect(self._stablerl_routes)
        return {
            r: encode_routes(self._stablerl_routes.pop(r))
            for r in json.loads(request_ids)
            if r in self._stablerl_routes
        }

    CPUWorker.load_model = load_model_and_record
    setattr(CPUWorker, ROUTES_RPC, stablerl_routes)
