"""The local PyTorch rollout engine: mu_old with its own weight copy and precision."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from stablerl.config import SamplingConfig
from stablerl.models import is_moe
from stablerl.moe import ACTIVATION_EXPERTS, use_fast_experts
from stablerl.precision import PRECISIONS, activation_quantizer, cast_named, compute_dtype, perturb_weight
from stablerl.rollout.base import RolloutBatch
from stablerl.rollout.decoders import FastQwen3MoeDecoder, HFDecoder
from stablerl.rollout.sampling import GumbelNoise, mark_ended, sample, sample_next
from stablerl.routing import NO_ROUTE, ROUTE_DTYPE, moe_routers, route_shape


def fp8_exempt_names(model: nn.Module) -> set[str]:
    """Parameters an FP8 inference engine keeps in bf16: embeddings, LM head, norms, MoE routers
    (a quantized router would flip expert choices far more than the paper's setting implies)."""
    names = {n for n, _ in model.named_parameters() if "embed" in n or "lm_head" in n or "norm" in n}
    names |= {n for n, _ in model.named_parameters() if n.endswith("shared_expert_gate.weight")}
    if is_moe(model):
        router_ids = {id(r) for r in moe_routers(model)}
        for mod_name, mod in model.named_modules():
            if id(mod) in router_ids:
                names |= {f"{mod_name}.{p}" for p, _ in mod.named_parameters()}
    return names


# with drop_finished, ended rows leave the decode once they are this share of the rows decoded
DROP_FINISHED = 0.25


class LocalEngine:
    """Samples with a KV cache from its own copy of the weights in ``precision``.

    ``fp32`` reproduces the training engine; ``bf16`` casts weights and compute; ``fp8`` stores
    linear/expert weights as float8 e4m3 with per-output-channel scales (dequantized, computed in
    bf16) and keeps embeddings, LM head, norms and routers in bf16; ``fp8_w8a8`` also rounds the
    input of every fp8 matrix multiply to e4m3 per token; ``nvfp4`` / ``nvfp4_w4a4`` the same in
    NVIDIA's 4-bit format (``stablerl.precision``). ``weight_noise`` perturbs the engine's
    copy of the weight matrices (``stablerl.precision.perturb_weight``). ``fast=None`` uses the
    lean Qwen3-MoE decoder where it applies and the model's own forward elsewhere.
    """

    def __init__(
        self,
        model: nn.Module,
        precision: str = "bf16",
        *,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int = 0,
        fast: bool | None = None,
        weight_noise: float = 0.0,
        noise_seed=None,
        weights=None,
        version: int = 0,
        drop_finished: bool = False,
        compile: bool = False,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown engine precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
        if not 0 <= weight_noise < float("inf"):
            raise ValueError(f"weight_noise must be a finite number >= 0, got {weight_noise}")
        self.precision, self.weight_noise, self.drop_finished = precision, float(weight_noise), drop_finished
        # noise_seed(version) -> the noise pattern's seed for that policy version (a re-drawn
        # mismatch); None: one fixed pattern for every version
        self.noise_seed = noise_seed
        # a copy: from_config shares the config object, and what the engine sets on its own model
        # (the W8A8 experts implementation) must never reach the training model
        config = copy.deepcopy(model.config)
        self.model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype(precision)).eval()
        self.model.requires_grad_(False)
        self._fp8_exempt = fp8_exempt_names(self.model)
        self.act_quant = activation_quantizer(precision)
        if self.act_quant is not None:
            _quantize_linear_inputs(self.model, self._fp8_exempt, self.act_quant, ACTIVATION_EXPERTS[precision])
        if fast and not FastQwen3MoeDecoder.supports(self.model):
            raise ValueError(f"the fast decoder supports qwen3_moe only, not {config.model_type!r}")
        self.fast = FastQwen3MoeDecoder.supports(self.model) if fast is None else fast
        if compile and not self.fast:
            raise ValueError(
                f"rollout.compile compiles the fast decoder's step, which supports qwen3_moe models only "
                f"(this model is {config.model_type!r}); set rollout.compile=false"
            )
        if compile and drop_finished:
            raise ValueError(
                "rollout.compile and rollout.drop_finished cannot be combined (a compiled step has a fixed batch)"
            )
        self.compile = compile
        eos = eos_token_id if eos_token_id is not None else config.eos_token_id
        self.eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=torch.long)
        self.pad_token_id = pad_token_id
        self.vocab_size = config.vocab_size
        self.version = 0
        # ``weights`` (a state dict or a stream of (name, tensor)) instead of ``model``'s own: the
        # model may then be a meta-device skeleton (ranks that never hold the full training model);
        # ``version``: the policy version they are
        self.load_weights(model.state_dict() if weights is None else weights, version=version)

    @torch.no_grad()
    def load_weights(
        self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: int | None = None
    ) -> None:
        """Copy trained weights in, one tensor at a time (cast to the engine's precision, plus its
        ``weight_noise``): ``weights`` may be a state dict or a stream of ``(name, tensor)``, such
        as the learner gathering one full tensor at a time from its shards."""
        own = self.model.state_dict()
        if isinstance(weights, Mapping):
            missing = set(own) - set(weights)
            if missing:
                raise ValueError(f"load_weights: state dict lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
            weights = weights.items()
        seen = set()
        version = self.version + 1 if version is None else int(version)
        seed = 0 if self.noise_seed is None else self.noise_seed(version)
        for name, tensor in weights:
            if name not in own:
                continue
            # the noise is on the engine's copy only; embeddings and LM head (tied here) stay exact
            if "embed" not in name and "lm_head" not in name:
                tensor = perturb_weight(name, tensor, self.weight_noise, seed)
            own[name].copy_(cast_named(name, tensor, self.precision, self._fp8_exempt))  # in place: decoders hold these
            seen.add(name)
        if len(seen) != len(own):
            missing = sorted(set(own) - seen)
            raise ValueError(f"load_weights: the weights lacked {len(missing)} tensors, e.g. {missing[:3]}")
        self.version = version

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        *,
        seeds: list[int] | None = None,
        capture_routes: bool = True,
    ) -> RolloutBatch:
        # inference_mode (cheaper per op than no_grad: no view/version tracking); the outputs are
        # cloned outside it so that training code may use them in autograd graphs
        with torch.inference_mode():
            batch = self._generate(prompts, sampling, seeds, capture_routes)
        return batch.select(torch.arange(len(batch)))

    def _generate(self, prompts, sampling, seeds, capture_routes) -> RolloutBatch:
        ids, attention_mask = self._left_pad(prompts)
        B, P = ids.shape
        R = sampling.max_new_tokens
        if seeds is None:
            seeds = list(range(B))
        if len(seeds) != B:
            raise ValueError(f"got {len(seeds)} seeds for {B} prompts")
        capture = capture_routes and is_moe(self.model)
        decoder = (
            FastQwen3MoeDecoder(self.model, capture, B, P + R, act_quant=self.act_quant, compiled=self.compile)
            if self.fast
            else HFDecoder(self.model, capture)
        )
        noise = GumbelNoise(seeds, self.vocab_size)

        logits, routes = decoder.prefill(ids, attention_mask)
        route_chunks = [_mask_routes(routes, attention_mask.bool())] if capture else []
        positions = attention_mask.sum(-1)  # position of the first response token
        decode = self._decode_compiled if self.compile else self._decode
        tokens, logps, masks, finished = decode(decoder, logits, positions, sampling, noise, route_chunks, capture)

        response = torch.stack(tokens, dim=1)
        response_mask = torch.stack(masks, dim=1)
        batch = RolloutBatch(
            input_ids=torch.cat([ids, response], dim=1),
            attention_mask=torch.cat([attention_mask, response_mask.long()], dim=1),
            prompt_width=P,
            response_mask=response_mask,
            rollout_logp=torch.stack(logps, dim=1).float(),
            finished=finished,
            version=self.version,
        )
        if capture:
            # the last sampled token is never fed back: its route is unknown (-1)
            layers, top_k, _ = route_shape(self.model)
            tail = torch.full((B, 1, layers, top_k), NO_ROUTE, dtype=ROUTE_DTYPE)
            batch.routes = torch.cat(route_chunks + [tail], dim=1)
        return batch

    def _decode(self, decoder, logits, positions, sampling, noise, route_chunks, capture):
        """The decode loop: sample, then feed the sampled tokens back, until every row has ended
        or ``max_new_tokens``; the per-step tokens, log-probs, valid masks, and the rows finished
        (routes appended to ``route_chunks``)."""
        B, R = len(positions), sampling.max_new_tokens
        tokens, logps, masks = [], [], []
        finished = torch.zeros(B, dtype=torch.bool)
        live = torch.arange(B)  # the rows the decoder still computes (finished ones are dropped)
        for s in range(R):
            tok, lp = sample(logits, sampling, noise, s, rows=None if len(live) == B else live)
            tok, lp = _spread(tok, live, B, self.pad_token_id), _spread(lp, live, B, 0.0)
            tok, lp, active, finished = mark_ended(tok, lp, finished, self.eos_ids, self.pad_token_id)
            tokens.append(tok)
            logps.append(lp)
            masks.append(active)
            if bool(finished.all()) or s == R - 1:
                break
            # a row that finished a step ago has fed back its EOS: it needs no more compute. With
            # drop_finished, such rows leave once they are DROP_FINISHED of those decoded (each
            # drop copies the caches). Off by default: the decode's matmul shapes then change with
            # the batch's composition, and CPU kernels round differently at different shapes
            # (~1e-6 in mu), so a row's numbers would depend on the other rows in its batch
            done = finished[live] & ~active[live]
            if self.drop_finished and bool(done.any()) and int(done.sum()) >= DROP_FINISHED * len(live):
                decoder.keep(torch.nonzero(~done).squeeze(1))
                logits, live = logits[~done], live[~done]
            # the token just sampled is real (valid) even if it was EOS; pads after it are not
            logits, routes = decoder.step(tokens[-1][live], (positions + s)[live], active[live])
            if capture:
                route_chunks.append(_spread(_mask_routes(routes, active[live][:, None]), live, B, NO_ROUTE))
        return tokens, logps, masks, finished

    def _decode_compiled(self, decoder, logits, positions, sampling, noise, route_chunks, capture):
        """``_decode`` for ``rollout.compile``: each step's sampling, bookkeeping and decode in one
        compiled call (``FastQwen3MoeDecoder.sample_and_step``); the same tokens, masks and routes
        (rows never leave the batch), mu within float round-off."""
        B, R = len(positions), sampling.max_new_tokens
        tokens, logps, masks = [], [], []
        finished = torch.zeros(B, dtype=torch.bool)
        for s in range(R):
            gumbel = noise.step(s) if sampling.temperature != 0 else None
            if s == R - 1:  # the last token is sampled, never fed back
                tok, lp, active, finished = sample_next(
                    logits, gumbel, finished, sampling, self.eos_ids, self.pad_token_id
                )
            else:
                tok, lp, active, finished, logits, routes = decoder.sample_and_step(
                    logits, gumbel, finished, positions + s, sampling, self.eos_ids, self.pad_token_id
                )
            tokens.append(tok)
            logps.append(lp)
            masks.append(active)
            if s == R - 1 or bool(finished.all()):
                break  # (when every row has just ended, the step computed along is not used)
            if capture:
                route_chunks.append(routes)
        return tokens, logps, masks, finished

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
        flat = [t for p in prompts for t in p]
        if min(flat) < 0 or max(flat) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), P, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, P - len(p) :] = torch.tensor(p)
            mask[i, P - len(p) :] = 1
        return ids, mask


def _quantize_linear_inputs(model: nn.Module, exempt: set[str], quant, experts: str) -> None:
    """W8A8 / W4A4: the input of every quantized linear layer rounded by ``quant`` per token (a
    pre-hook), and the MoE experts switched to the implementation ``experts`` that does the same
    inside (``stablerl.moe``)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and f"{name}.weight" not in exempt:
            module.register_forward_pre_hook(lambda _m, args: (quant(args[0]), *args[1:]))
    use_fast_experts(model, experts)


def _spread(values: torch.Tensor, live: torch.Tensor, B: int, fill) -> torch.Tensor:
    """Per-row ``values`` of the ``live`` rows placed among all ``B`` rows (``fill`` elsewhere);
    unchanged while no row has left the decode."""
    if len(live) == B:
        return values
    return torch.full((B, *values.shape[1:]), fill, dtype=values.dtype).index_copy_(0, live, values)


def _mask_routes(routes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Routes ``[B, T, L, k]`` with -1 where ``valid`` ``[B, T]`` is False (padding)."""
    routes = routes.to(ROUTE_DTYPE)
    return routes if bool(valid.all()) else routes.masked_fill(~valid[:, :, None, None], NO_ROUTE)
