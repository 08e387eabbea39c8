"""stablerl's vLLM general plugin (entry point ``vllm.general_plugins``: stablerl), which vLLM runs
in each of its processes: it registers stablerl's gloo weight-transfer engine with vLLM's
``WeightTransferEngineFactory``, so a server started with
``--weight-transfer-config '{"backend": "stablerl_gloo"}'`` takes weights over gloo (CPU).
It only registers; nothing runs until a server is configured to use it."""

from __future__ import annotations


def register() -> None:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from stablerl.rollout.weight_transfer import GLOO_BACKEND

    if GLOO_BACKEND not in WeightTransferEngineFactory._registry:  # vLLM may load a plugin twice
        WeightTransferEngineFactory.register_engine(GLOO_BACKEND, _gloo_engine_class())


def _gloo_engine_class():
    from stablerl.rollout.weight_transfer import make_gloo_engine_class

    return make_gloo_engine_class()
