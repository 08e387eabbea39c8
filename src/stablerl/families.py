"""The MoE families whose routes stablerl captures and replays: the one table that knows them.

A row names the family's router module (every HF router here returns ``(router_logits,
routing_weights, expert_indices)``, which is what capture and replay hook), how the router turns
logits into the weights of its chosen experts, and a tiny random config of the family for tests,
examples and ``model.family``. Adding a family is a row here and a test in tests/test_families.py.

Scorings (``Family.scoring``), as the routers compute them:

- ``softmax``: p = softmax(logits) over all experts (fp32); choose top-k of p; weights = p at the
  chosen experts, renormalised over them where the family does (``normalize``).
- ``sigmoid_grouped`` (DeepSeek-V3, GLM-4.5, Kimi K2): s = sigmoid(logits); choose top-k of
  ``s + e_score_correction_bias`` within the best ``topk_group`` of ``n_group`` expert groups;
  weights = s at the chosen experts (the bias chooses, it never weights), renormalised, times
  ``routed_scaling_factor``.
- ``topk_softmax`` (gpt-oss): choose top-k of the logits; weights = softmax over the chosen logits.

Under replay the choice is the replayed one and the weights are the family's scoring gathered at
the replayed experts (``replay_weights``): a function of the live logits, so the router keeps its
gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig

Scoring = Literal["softmax", "sigmoid_grouped", "topk_softmax"]


@dataclass(frozen=True)
class Family:
    model_type: str
    name: str  # what practitioners call it
    router: str  # the router module's class name
    scoring: Scoring
    normalize: bool | None  # renormalise the chosen weights; None: the router's own norm_topk_prob
    dense_layers: str  # which decoder layers have no router (no route slot)
    tiny: Callable[[dict, dict], PretrainedConfig]  # (common attention/vocab kwargs, MoE sizes) -> config


def _qwen3_moe(common: dict, moe: dict) -> PretrainedConfig:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**common, **_qwen_moe(moe), head_dim=common["hidden_size"] // 4, norm_topk_prob=True)


def _qwen2_moe(common: dict, moe: dict) -> PretrainedConfig:
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **common, **_qwen_moe(moe), shared_expert_intermediate_size=moe["expert_size"], norm_topk_prob=True
    )


def _olmoe(common: dict, moe: dict) -> PretrainedConfig:
    from transformers import OlmoeConfig

    q = _qwen_moe(moe)
    q.pop("moe_intermediate_size")
    return OlmoeConfig(**common, **{**q, "intermediate_size": moe["expert_size"]}, norm_topk_prob=False)


def _mixtral(common: dict, moe: dict) -> PretrainedConfig:
    from transformers import MixtralConfig

    return MixtralConfig(
        **common,
        num_local_experts=moe["num_experts"],
        num_experts_per_tok=moe["top_k"],
        intermediate_size=moe["expert_size"],
        output_router_logits=False,
    )


def _qwen_moe(moe: dict) -> dict:
    return dict(
        num_experts=moe["num_experts"],
        num_experts_per_tok=moe["top_k"],
        moe_intermediate_size=moe["expert_size"],
        intermediate_size=2 * moe["expert_size"],
        output_router_logits=False,
    )


def _linear_attention(common: dict) -> dict:
    # Gated DeltaNet layers, every fourth layer full attention as in the real models, and the last
    # one too (HF's cache needs at least one attention layer)
    h, n = common["hidden_size"], common["num_hidden_layers"]
    return dict(
        layer_types=["full_attention" if i % 4 == 3 or i == n - 1 else "linear_attention" for i in range(n)],
        head_dim=h // 4,
        linear_key_head_dim=64,  # vLLM's CPU Gated DeltaNet kernels take 64 (not 16 or 32)
        linear_value_head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_conv_kernel_dim=4,
    )


def _qwen3_next(common: dict, moe: dict) -> PretrainedConfig:
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        **common,
        **_qwen_moe(moe),
        **_linear_attention(common),
        shared_expert_intermediate_size=moe["expert_size"],
        norm_topk_prob=True,
    )


def _qwen3_5_moe(common: dict, moe: dict) -> PretrainedConfig:
    from transformers.models.qwen3_5_moe import Qwen3_5MoeTextConfig

    # the text model alone (model_type qwen3_5_moe_text), as AutoModelForCausalLM loads the
    # language model of a Qwen3.5-MoE checkpoint
    q = _qwen_moe(moe)
    q.pop("intermediate_size")
    return Qwen3_5MoeTextConfig(
        **common, **q, **_linear_attention(common), shared_expert_intermediate_size=moe["expert_size"]
    )


def _deepseek_style(common: dict, moe: dict) -> dict:
    # two expert groups, the best one kept per token; one dense first layer; a correction bias set
    # by the tests (zero in a fresh model, as in HF's init)
    return dict(
        n_routed_experts=moe["num_experts"],
        num_experts_per_tok=moe["top_k"],
        moe_intermediate_size=moe["expert_size"],
        intermediate_size=2 * moe["expert_size"],
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        output_router_logits=False,
    )


def _deepseek_v3(common: dict, moe: dict) -> PretrainedConfig:
    from transformers import DeepseekV3Config

    # multi-head latent attention: keys and values per query head (no grouped KV heads)
    h = common["hidden_size"]
    common = {**common, "num_key_value_heads": common["num_attention_heads"]}
    mla = dict(kv_lora_rank=h // 2, q_lora_rank=h // 2, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    return DeepseekV3Config(**common, **_deepseek_style(common, moe), **mla)


def _glm4_moe(common: dict, moe: dict) -> PretrainedConfig:
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(**common, **_deepseek_style(common, moe), head_dim=common["hidden_size"] // 4)


def _gpt_oss(common: dict, moe: dict) -> PretrainedConfig:
    from transformers import GptOssConfig

    # alternating sliding-window / full attention layers with attention sinks, as gpt-oss
    return GptOssConfig(
        **{**common, "rms_norm_eps": 1e-5},
        num_local_experts=moe["num_experts"],
        num_experts_per_tok=moe["top_k"],
        intermediate_size=moe["expert_size"],
        head_dim=common["hidden_size"] // 4,
        sliding_window=8,
        # YaRN as the release (vLLM's gpt-oss reads its parameters), at factor 1 over the tiny context
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 1.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": common["max_position_embeddings"],
        },
        output_router_logits=False,
    )


_QWEN_DENSE = "mlp_only_layers, and layers off decoder_sparse_step"
FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("qwen3_moe", "Qwen3-MoE", "Qwen3MoeTopKRouter", "softmax", None, _QWEN_DENSE, _qwen3_moe),
        Family("qwen2_moe", "Qwen2-MoE", "Qwen2MoeTopKRouter", "softmax", None, _QWEN_DENSE, _qwen2_moe),
        Family("olmoe", "OLMoE", "OlmoeTopKRouter", "softmax", None, "none", _olmoe),
        Family("mixtral", "Mixtral", "MixtralTopKRouter", "softmax", True, "none", _mixtral),
        Family("qwen3_5_moe", "Qwen3.5/3.6-MoE", "Qwen3_5MoeTopKRouter", "softmax", True, "none", _qwen3_5_moe),
        Family("qwen3_next", "Qwen3-Next", "Qwen3NextTopKRouter", "softmax", None, _QWEN_DENSE, _qwen3_next),
        Family(
            "deepseek_v3",
            "DeepSeek-V3 / Kimi K2",
            "DeepseekV3TopkRouter",
            "sigmoid_grouped",
            None,
            "the first first_k_dense_replace layers",
            _deepseek_v3,
        ),
        Family(
            "glm4_moe",
            "GLM-4.5 / 4.6",
            "Glm4MoeTopkRouter",
            "sigmoid_grouped",
            None,
            "the first first_k_dense_replace layers",
            _glm4_moe,
        ),
        Family("gpt_oss", "gpt-oss", "GptOssTopKRouter", "topk_softmax", None, "none", _gpt_oss),
    )
}
# the same family under another model_type: the text-only model of a multimodal checkpoint
ALIASES = {"qwen3_5_moe_text": "qwen3_5_moe"}
# config attributes that make a model a Mixture-of-Experts, whichever its family
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def family_of(config: PretrainedConfig) -> Family | None:
    """The table's row for ``config``'s model_type, or None."""
    model_type = getattr(config, "model_type", None)
    return FAMILIES.get(ALIASES.get(model_type, model_type))


def declares_experts(config: PretrainedConfig) -> bool:
    """Whether ``config`` describes a Mixture-of-Experts, supported or not (for the error that
    tells an unsupported MoE from a dense model)."""
    text = getattr(config, "text_config", None) or config
    return any(isinstance(n := getattr(text, k, None), int) and n > 1 for k in _EXPERT_COUNTS)


def supported_list() -> str:
    """The model_types routing replay covers, in the table's order."""
    return ", ".join(list(FAMILIES) + list(ALIASES))


def unsupported_error(config: PretrainedConfig) -> str:
    """The one-line refusal for a model whose routes cannot be captured or replayed."""
    model_type = getattr(config, "model_type", None)
    kind = "a Mixture-of-Experts family routing replay does not support yet" if declares_experts(config) else "dense"
    return f"routing capture/replay does not support model_type={model_type!r} ({kind}); supported: {supported_list()}"


def replay_refusal(mode: str, config: PretrainedConfig) -> str:
    """Why ``train.routing_replay=mode`` cannot run on a model of ``config`` (one with no family
    in the table): a dense model, or an MoE routing replay does not cover yet."""
    model_type = getattr(config, "model_type", None)
    if declares_experts(config):
        return (
            f"train.routing_replay={mode}: {model_type!r} is a Mixture-of-Experts family routing replay does not "
            f"support yet; supported: {supported_list()}; use train.routing_replay=none to train it without replay"
        )
    return (
        f"train.routing_replay={mode} needs a Mixture-of-Experts model, but {model_type!r} is dense; "
        "use train.routing_replay=none"
    )


def replay_weights(
    family: Family, router: nn.Module, logits: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The routing weights ``router`` gives the experts ``indices`` ``[N, k]`` from its live
    ``logits`` ``[N, E]``: the family's own scoring, gathered at the given experts (the operations
    in the router's order, so replaying the router's own choice reproduces its weights bit for bit)."""
    normalize = bool(getattr(router, "norm_topk_prob", True)) if family.normalize is None else family.normalize
    if family.scoring == "softmax":
        return softmax_weights(logits, indices, normalize).to(dtype)
    if family.scoring == "sigmoid_grouped":
        return sigmoid_weights(logits, indices, normalize, float(router.routed_scaling_factor)).to(dtype)
    return topk_softmax_weights(logits, indices).to(dtype)


def softmax_weights(logits: torch.Tensor, indices: torch.Tensor, normalize: bool) -> torch.Tensor:
    """softmax over all experts in fp32 (fp64 for an fp64 model), gathered, renormalised."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    weights = probs.gather(-1, indices)
    return weights / weights.sum(dim=-1, keepdim=True) if normalize else weights


def sigmoid_weights(logits: torch.Tensor, indices: torch.Tensor, normalize: bool, scale: float) -> torch.Tensor:
    """sigmoid scores gathered (no correction bias: it only chooses), normalised, scaled."""
    weights = logits.sigmoid().gather(-1, indices)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale


def topk_softmax_weights(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """softmax over the chosen experts' logits only."""
    return torch.softmax(logits.gather(-1, indices), dim=-1, dtype=logits.dtype)


def check_tiny_family(family: str, num_experts: int, top_k: int) -> None:
    """A clear error for a tiny model the table cannot build."""
    row = FAMILIES.get(family)
    if row is None:
        raise ValueError(f"unknown model family {family!r}; allowed: {', '.join(FAMILIES)}")
    if row.scoring == "sigmoid_grouped" and (num_experts % 2 or top_k > num_experts // 2):
        raise ValueError(
            f"a tiny {family} model keeps one of two expert groups per token: num_experts must be even and "
            f"top_k <= num_experts / 2, got num_experts={num_experts}, top_k={top_k}"
        )


def tiny_common(vocab_size: int, hidden_size: int, num_layers: int, max_positions: int) -> dict:
    """The config fields every tiny model shares, MoE or dense (four attention heads, two KV heads)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )


def tiny_family_config(
    family: str,
    vocab_size: int,
    *,
    hidden_size: int,
    num_layers: int,
    num_experts: int,
    top_k: int,
    expert_size: int,
    max_positions: int,
) -> PretrainedConfig:
    """A tiny random-weight config of an MoE family of the table (four attention heads)."""
    check_tiny_family(family, num_experts, top_k)
    common = tiny_common(vocab_size, hidden_size, num_layers, max_positions)
    return FAMILIES[family].tiny(common, dict(num_experts=num_experts, top_k=top_k, expert_size=expert_size))
