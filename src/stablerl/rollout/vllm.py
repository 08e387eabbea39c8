"""The vLLM rollout engine: a colocated vLLM instance in the trainer's process, behind the same
``RolloutEngine`` protocol and batch layout as ``LocalEngine`` (docs/rollout.md).

- Numerics: ``rollout.precision`` fp32 / bf16 are vLLM's dtype; fp8 / fp8_w8a8 its FP8
  quantization where the platform supports it (a clear error otherwise, e.g. on CPU).
- ``rollout_logp`` are vLLM's *processed* log-probs (``logprobs_mode="processed_logprobs"``): the
  log-prob under the distribution actually sampled from, after temperature, top-k and top-p —
  what ``rollout_logp`` means everywhere in stablerl.
- Routes for R3: vLLM's own ``routed_experts`` output on GPUs; on CPU an in-process capture of the
  expert ids each MoE router picks, mapped to (request, position) from the model runner's batch
  of each step. Both give ``[B, P + R, moe_layers, top_k]`` int16 with -1 where there is no route
  (padding; the last sampled token, which is never fed back). Routes that do not line up with
  the tokens are an error, never a silent misalignment.
- Weight sync in place (``load_weights``): vLLM's ``reload_weights`` from a stream of
  ``(name, tensor)``; on CPU the MoE experts' packed copies are rebuilt afterwards (vLLM's reload
  refreshes the plain weights but not the CPU grouped-gemm packing).
- Under torchrun each rank runs its own instance (``external_launcher``, as TRL's colocate mode);
  with ``tensor_parallel_size`` k, k consecutive ranks form one instance: they gather their
  prompts, sample them together, and each keeps its own rows.
- Sleep mode (GPUs): after sampling, vLLM sleeps (level 1: weights to CPU memory, KV cache freed;
  level 2: both freed), so the trainer has the GPU for the update; the next weight sync wakes the
  weights, loads the new ones, then wakes the KV cache.

``import stablerl`` never imports vllm; this module imports it when an engine is built.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from stablerl.config import SamplingConfig, VllmConfig
from stablerl.distributed.world import gather_in_group, tensor_parallel_group
from stablerl.models import is_moe
from stablerl.rollout.base import RolloutBatch, checked_request
from stablerl.rollout.vllm_support import (
    PER_EXPERT_NAMES,
    check_vllm_model,
    import_vllm,
    per_expert_weights,
    quiet_weight_sync,
    resolve_sleep_level,
    stop_ids,
    vllm_dtype_args,
    vllm_model_config,
)
from stablerl.routing import NO_ROUTE, ROUTE_DTYPE, moe_layer_indices, route_shape


class _RouteRecorder:
    """Expert ids per (request, position) from an in-process vLLM model runner (CPU).

    Before each forward the runner lays out this step's tokens: ``req_indices[row]`` says whose
    token row ``row`` is, ``positions[row]`` where it sits in that request's sequence. Each MoE
    router then reports the top-k ids of those rows (``set_capture_fn``, the hook vLLM's own
    capturer uses). Prefix caching must be off: a cached token runs no forward and has no row.
    """

    def __init__(self, runner, moe_layer_ids: list[int], top_k: int):
        from vllm.model_executor.layers.fused_moe.layer import MoERunner

        self.runner, self.top_k = runner, top_k
        self.layer_of = {lid: i for i, lid in enumerate(moe_layer_ids)}  # decoder layer -> MoE layer index
        self.steps: list[dict] = []
        self.active = False
        prepare = runner._prepare_inputs

        def prepare_and_record(scheduler_output, num_scheduled_tokens):
            out = prepare(scheduler_output, num_scheduled_tokens)
            if self.active:
                total = scheduler_output.total_num_scheduled_tokens
                n_reqs = runner.input_batch.num_reqs
                self.steps.append(
                    {
                        "req_ids": list(runner.input_batch.req_ids[:n_reqs]),
                        "rows": runner.req_indices.np[:total].copy(),
                        "positions": runner.positions[:total].cpu().numpy().copy(),
                        "ids": {},
                    }
                )
            return out

        runner._prepare_inputs = prepare_and_record
        bound = 0
        for module in runner.model.modules():
            if isinstance(module, MoERunner) and module.layer_id in self.layer_of:
                module.router.set_capture_fn(lambda ids, li=self.layer_of[module.layer_id]: self._capture(li, ids))
                bound += 1
        if bound != len(self.layer_of):
            raise ValueError(f"vLLM route capture: found {bound} MoE routers for {len(self.layer_of)} MoE layers")

    def _capture(self, layer: int, ids: torch.Tensor) -> None:
        if self.active and self.steps:
            step = self.steps[-1]
            step["ids"][layer] = ids[: len(step["rows"])].detach().to("cpu", torch.int16).numpy().copy()

    def start(self) -> None:
        self.steps, self.active = [], True

    def stop(self) -> dict[str, np.ndarray]:
        """``{external request id: [positions, moe_layers, top_k]}`` (-1 where nothing was routed)."""
        self.active = False
        return self.collect({})

    def collect(self, seqs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The steps recorded since the last call, added into ``seqs`` (by request and position)."""
        n_layers = len(self.layer_of)
        steps, self.steps = self.steps, []
        for step in steps:
            if not step["ids"]:  # a forward in which no MoE layer routed (e.g. a hybrid model's warm-up)
                continue
            if len(step["ids"]) != n_layers:
                raise ValueError(f"vLLM route capture: a step reported {len(step['ids'])} of {n_layers} MoE layers")
            owners = [step["req_ids"][r].rsplit("-", 1)[0] for r in step["rows"]]  # vLLM suffixes internal ids
            ids = np.stack([step["ids"][li] for li in range(n_layers)], axis=1)  # [rows, layers, k]
            for rid in set(owners):
                sel = np.array([o == rid for o in owners])
                pos = step["positions"][sel]
                arr = seqs.get(rid)
                need = int(pos.max()) + 1
                if arr is None or arr.shape[0] < need:
                    grown = np.full((max(need, 64), n_layers, self.top_k), NO_ROUTE, dtype=np.int16)
                    if arr is not None:
                        grown[: arr.shape[0]] = arr
                    arr = seqs[rid] = grown
                arr[pos] = ids[sel]
        return seqs


class VllmEngine:
    """Samples with a colocated vLLM instance; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        precision: str = "bf16",
        *,
        cfg: VllmConfig | None = None,
        seed: int = 0,
        max_model_len: int | None = None,
        distributed: bool = False,
        eos_token_id: int | list[int] | None = None,
        weights=None,
        version: int = 0,
    ):
        cfg = cfg or VllmConfig()
        vllm = import_vllm()
        on_cuda = torch.cuda.is_available()
        config = model.config
        check_vllm_model(config, on_cuda, precision)
        self.precision, self.moe, self.model_type = precision, is_moe(model), config.model_type
        self.eos_ids = stop_ids(tokenizer, eos_token_id)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.vocab_size = config.vocab_size
        self.version = 0
        if self.moe:
            self.moe_layers = moe_layer_indices(model)
            self.n_moe, self.top_k, _ = route_shape(model)
        # vLLM loads from a directory: the config and tokenizer only; the weights come in through
        # load_weights below (load_format="dummy" builds the model without reading any)
        self._dir = tempfile.TemporaryDirectory(prefix="stablerl-vllm-")
        vllm_model_config(config, type(model).__name__).save_pretrained(self._dir.name)
        tokenizer.save_pretrained(self._dir.name)
        args = dict(
            model=self._dir.name,
            load_format="dummy",
            seed=seed,
            enforce_eager=(not on_cuda) if cfg.enforce_eager is None else cfg.enforce_eager,
            max_model_len=max_model_len or getattr(config, "max_position_embeddings", 2048),
            max_num_seqs=cfg.max_num_seqs,
            enable_prefix_caching=False,
            logprobs_mode="processed_logprobs",
            **vllm_dtype_args(precision, on_cuda),
        )
        self.sleep_level = resolve_sleep_level(cfg.sleep_level, on_cuda)
        args.update(self._placement_args(cfg, on_cuda, distributed))
        self.asleep, self._weights_discarded = False, False
        self.llm = self._start(vllm, args, on_cuda)
        self._runner = self.llm.collective_rpc(lambda worker: worker.model_runner)[0]
        self._recorder = _RouteRecorder(self._runner, self.moe_layers, self.top_k) if self.moe and not on_cuda else None
        self.on_cuda = on_cuda
        self.load_weights(model.state_dict() if weights is None else weights, version=version)

    def _placement_args(self, cfg: VllmConfig, on_cuda: bool, distributed: bool) -> dict:
        """vLLM's memory, sleep-mode and parallelism arguments (and this rank's tensor-parallel
        group, when the instance spans several ranks)."""
        args = {}
        if on_cuda:
            args.update(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_return_routed_experts=self.moe)
            args.update(enable_sleep_mode=self.sleep_level > 0)
        else:
            args.update(kv_cache_memory_bytes=int(cfg.kv_cache_gb * 2**30))
        self.tp_group = None
        if distributed:
            args.update(distributed_executor_backend="external_launcher", tensor_parallel_size=cfg.tensor_parallel_size)
            if cfg.tensor_parallel_size > 1:
                self.tp_group = tensor_parallel_group(cfg.tensor_parallel_size)
        elif cfg.tensor_parallel_size > 1:
            raise ValueError(
                f"rollout.vllm.tensor_parallel_size={cfg.tensor_parallel_size} with rollout.engine=vllm spans "
                "that many torchrun ranks; launch with torchrun (or use rollout.engine=vllm_server)"
            )
        return args

    @staticmethod
    def _start(vllm, args: dict, on_cuda: bool):
        # in this process (colocated); vLLM must neither bind this process's threads to cores nor
        # leave torch.set_num_threads disabled and the trainer on one thread, as it does for serving
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not on_cuda:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        try:
            return vllm.LLM(**args)
        except (ValueError, RuntimeError, NotImplementedError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"vLLM cannot run this model with rollout.precision and the rollout.vllm options given: {first}"
            ) from None
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)

    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(
        self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: int | None = None
    ) -> None:
        """Load trained weights in place (a state dict or a stream of ``(name, tensor)``)."""
        items = weights.items() if isinstance(weights, Mapping) else weights
        if self.asleep:  # the weights' memory first (level 2: uninitialised until loaded below)
            self.llm.wake_up(tags=["weights"])
        # vLLM casts each tensor to its dtype as it loads it: stream them one at a time
        quiet_weight_sync()
        if self.model_type in PER_EXPERT_NAMES:
            items = per_expert_weights(items)
        self.llm.collective_rpc(
            "reload_weights",
            kwargs={"weights_iterator": ((n, t.detach()) for n, t in items), "is_checkpoint_format": True},
        )
        if not self.on_cuda:
            self.llm.apply_model(_repack_cpu_experts)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep, self._weights_discarded = False, False
        self.version = self.version + 1 if version is None else int(version)

    def sleep(self) -> None:
        """Hand the GPU memory back to the trainer until the next sampling or weight sync."""
        if self.sleep_level and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep, self._weights_discarded = True, self.sleep_level == 2

    def _wake(self) -> None:
        if not self.asleep:
            return
        if self._weights_discarded:
            raise ValueError(
                "rollout.vllm.sleep_level=2 discarded vLLM's weights and no weight sync came before this "
                "sampling (a lagged engine keeps a version across steps); use sleep_level=1"
            )
        self.llm.wake_up()
        self.asleep = False

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        *,
        seeds: list[int] | None = None,
        capture_routes: bool = True,
    ) -> RolloutBatch:
        from vllm import SamplingParams

        seeds = checked_request(prompts, seeds, self.vocab_size)
        greedy = sampling.temperature == 0
        params = [
            SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k or -1,
                max_tokens=sampling.max_new_tokens,
                seed=int(s) % 2**63,
                logprobs=0,
                stop_token_ids=self.eos_ids,
                ignore_eos=not self.eos_ids,
                detokenize=False,
            )
            for s in seeds
        ]
        capture = capture_routes and self.moe
        self._wake()
        if capture and self._recorder is not None:
            self._recorder.start()
        try:
            outputs = self._generate_in_group([{"prompt_token_ids": list(p)} for p in prompts], params)
        finally:
            captured = self._recorder.stop() if capture and self._recorder is not None else None
        self.sleep()
        return self._batch(prompts, outputs, greedy, captured if capture else None, capture)

    def _generate_in_group(self, requests: list[dict], params: list) -> list:
        """This rank's outputs; with tensor parallelism the ranks of the instance sample every
        rank's requests together (one vLLM call on identical inputs), each keeping its own."""
        if self.tp_group is None:
            return self.llm.generate(requests, params, use_tqdm=False)
        mine, everyone = gather_in_group((requests, params), self.tp_group)
        outputs = self.llm.generate(
            [r for rs, _ in everyone for r in rs], [p for _, ps in everyone for p in ps], use_tqdm=False
        )
        start = sum(len(rs) for rs, _ in everyone[:mine])
        return outputs[start : start + len(requests)]

    def _batch(self, prompts, outputs, greedy: bool, captured, capture: bool) -> RolloutBatch:
        B, P = len(prompts), max(len(p) for p in prompts)
        completions = [o.outputs[0] for o in outputs]
        R = max(1, max(len(c.token_ids) for c in completions))
        ids = torch.full((B, P + R), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros(B, P + R, dtype=torch.long)
        response_mask = torch.zeros(B, R, dtype=torch.bool)
        logp = torch.zeros(B, R, dtype=torch.float32)
        finished = torch.zeros(B, dtype=torch.bool)
        routes = torch.full((B, P + R, self.n_moe, self.top_k), NO_ROUTE, dtype=ROUTE_DTYPE) if capture else None
        for i, (prompt, out, c) in enumerate(zip(prompts, outputs, completions)):
            n, start = len(c.token_ids), P - len(prompt)
            ids[i, start:P] = torch.tensor(prompt)
            attention[i, start : P + n] = 1
            ids[i, P : P + n] = torch.tensor(list(c.token_ids), dtype=torch.long)
            response_mask[i, :n] = True
            if not greedy and n:
                logp[i, :n] = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
            finished[i] = c.finish_reason == "stop"
            if capture:
                seq = self._routes_of(out, c, captured)
                expected = len(prompt) + n - 1  # every fed token; the last sampled one never is
                if seq.shape[0] < expected or (seq[:expected, 0, 0] < 0).any():
                    raise ValueError(
                        f"vLLM returned routes for {int((seq[:, 0, 0] >= 0).sum())} positions of request "
                        f"{out.request_id}, which fed {expected} tokens: they do not line up"
                    )
                routes[i, start : start + expected] = torch.from_numpy(seq[:expected].astype(np.int16))
        return RolloutBatch(
            input_ids=ids,
            attention_mask=attention,
            prompt_width=P,
            response_mask=response_mask,
            rollout_logp=logp,
            finished=finished,
            version=self.version,
            routes=routes,
        )

    def _routes_of(self, out, completion, captured) -> np.ndarray:
        if captured is not None:  # CPU: the in-process capture
            return captured.get(out.request_id, np.zeros((0, self.n_moe, self.top_k), dtype=np.int16))
        routed = getattr(completion, "routed_experts", None)  # GPU: vLLM's own [seq, all layers, k]
        if routed is None:
            raise ValueError("vLLM returned no routed_experts: this vLLM build cannot report routes for R3")
        return np.asarray(routed)[:, self.moe_layers]

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            self.llm = None
            del llm
        if getattr(self, "_dir", None) is not None:
            self._dir.cleanup()
            self._dir = None


def _repack_cpu_experts(model: nn.Module) -> int:
    """After a reload on CPU: rebuild each MoE layer's packed expert weights from the reloaded ones."""
    n = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        kernel = getattr(method, "moe_kernel", None)
        if hasattr(module, "w13_weight") and kernel is not None:
            kernel.fused_experts.process_weights_after_loading(module)
            n += 1
    return n
