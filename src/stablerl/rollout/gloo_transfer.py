"""The servers' end of stablerl's gloo weight transfer: a vLLM ``WeightTransferEngine`` that
stablerl's vLLM plugin registers as ``stablerl_gloo`` (``vllm_plugin.py``); vLLM builds it in
each worker of a server started with ``--weight-transfer-config '{"backend": "stablerl_gloo"}'``.
The trainer's end is ``weight_transfer.WeightSender``. This module imports vLLM: only vLLM's
processes import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from stablerl.rollout.weight_transfer import _broadcast, _gloo_group


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 1800.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Receives checkpoint-format tensors broadcast by the trainer over gloo and loads them
    layer by layer (vLLM's layerwise reload, as its NCCL engine does)."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group, self._store = None, None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        pc = self.parallel_config
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self.group, self._store = _gloo_group(
            init_info.master_address,
            init_info.master_port,
            rank,
            init_info.world_size,
            init_info.timeout_s,
            is_master=False,
        )

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        if self.device.type == "cpu":  # the CPU MoE kernels keep packed copies of the experts
            from stablerl.rollout.vllm import _repack_cpu_experts

            _repack_cpu_experts(self.model)

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialised: call /init_weight_transfer_engine first")
        for name, dtype_name, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes):
            weight = torch.empty(shape, dtype=getattr(torch, dtype_name))
            _broadcast(self.group, weight)
            self.model.load_weights([(name, weight.to(self.device))])

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))

    def shutdown(self) -> None:
        self.group, self._store = None, None
