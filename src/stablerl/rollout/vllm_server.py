"""The vLLM server engine (``rollout.engine=vllm_server``): rollouts from vLLM OpenAI servers,
behind the same ``RolloutEngine`` protocol and batch layout as the in-process engines
(docs/rollout.md).

- Servers: stablerl starts ``rollout.vllm.servers`` of them (``python -m
  vllm.entrypoints.openai.api_server`` with ``VLLM_SERVER_DEV_MODE=1``; free ports, each in its own
  process group, its log in the run directory, stopped with the run) or attaches to
  ``rollout.vllm.urls``. Requests are spread over them.
- Token in, token out: each prompt goes as token ids (one request per response, with its seed),
  and the sampled ids and vLLM's processed log-probs come back (``return_token_ids``); no text is
  ever re-tokenized. Routes for R3 come from vLLM's ``routed_experts`` (GPUs).
- Weights: vLLM's weight-transfer protocol (``weight_transfer.py``), sent by the first sampling
  rank; the other ranks take part in the gather of the trained weights and wait for the sync.
- Faults: a server that dies or stops answering ends the run naming it within
  ``distributed.timeout_s``; a port in use, a server that never gets ready and a wrong URL are
  one-line errors.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stablerl import distributed as D
from stablerl.config import SamplingConfig, VllmConfig
from stablerl.models import is_moe
from stablerl.rollout.base import RolloutBatch, checked_request
from stablerl.rollout.server_process import ServerProcess, free_port, server_command
from stablerl.rollout.vllm_plugin import ROUTES_RPC, decode_routes
from stablerl.rollout.vllm_support import vllm_model_config
from stablerl.rollout.weight_transfer import GLOO_BACKEND, WeightMeta, WeightSender
from stablerl.routing import NO_ROUTE, ROUTE_DTYPE, moe_layer_indices, route_shape

__all__ = ["VllmServerClient", "VllmServerEngine", "free_port"]

WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # others go as bf16; vLLM casts/quantizes


class VllmServerClient:
    """One server's HTTP routes (the OpenAI completions route and vLLM's RL routes)."""

    def __init__(self, url: str, timeout_s: float, process: ServerProcess | None = None, world_size: int = 1):
        self.url, self.timeout_s, self.process, self.world_size = url.rstrip("/"), timeout_s, process, world_size

    def _request(self, method: str, route: str, body: dict | None = None, query: dict | None = None):
        url = f"{self.url}/{route}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                text = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise RuntimeError(f"vLLM server {self.url}: /{route} answered {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise RuntimeError(f"vLLM server {self.url} did not answer /{route}{self._state()}: {e}") from None
        return json.loads(text) if text else None

    def _state(self) -> str:
        if self.process is None:
            return ""
        code = self.process.poll()
        where = f"; its log: {self.process.log_path}"
        return (
            f" (it exited with code {code}{where})" if code is not None else f" (within {self.timeout_s:.0f} s{where})"
        )

    def post(self, route: str, body: dict | None = None, query: dict | None = None):
        return self._request("POST", route, body, query)

    def get(self, route: str):
        return self._request("GET", route)

    def complete(self, model: str, prompt: list[int], params: dict) -> dict:
        """The one choice of a completion, with ``request_id``: vLLM's id of the request."""
        out = self.post("v1/completions", {"model": model, "prompt": prompt, **params})
        return {**out["choices"][0], "request_id": f"{out['id']}-0"}

    def generate_tokens(self, model: str, prompt: list[int], params: dict) -> dict:
        """vLLM's token-in/token-out route (``/inference/v1/generate``, served with
        ``--enable-scale-out``), as ``complete``'s choice plus ``weight_versions``: the spans of
        output tokens each weight version sampled."""
        body = {"model": model, "token_ids": prompt, "request_id": f"stablerl-{uuid.uuid4().hex}"}
        out = self.post("inference/v1/generate", {**body, "sampling_params": params})
        choice = out["choices"][0]
        logprobs = [c["logprob"] for c in (choice.get("logprobs") or {}).get("content") or []]
        return {**choice, "logprobs": {"token_logprobs": logprobs}, "request_id": out["request_id"]}

    def recorded_routes(self, request_ids: list[str]) -> dict[str, str]:
        """Routes stablerl's plugin recorded in a CPU server (vllm_plugin.py), by request id."""
        body = {"method": ROUTES_RPC, "kwargs": {"request_ids": json.dumps(request_ids)}}
        return self.post("collective_rpc", body)["results"][0]


def _wire_dtype(precision: str) -> torch.dtype:
    return WIRE_DTYPES.get(precision, torch.bfloat16)


class VllmServerEngine:
    """Samples with vLLM servers; see the module docstring."""

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
        log_dir: str | Path | None = None,
        timeout_s: float = 1800.0,
    ):
        from stablerl.rollout.vllm_support import check_vllm_model, import_vllm, stop_ids, vllm_dtype_args

        import_vllm()
        cfg = cfg or VllmConfig()
        on_cuda = torch.cuda.is_available()
        config = model.config
        check_vllm_model(config, on_cuda, precision)
        dtype_args = vllm_dtype_args(precision, on_cuda)
        self.precision, self.moe, self.timeout_s = precision, is_moe(model), timeout_s
        self.in_flight = cfg.in_flight_updates
        self.eos_ids = stop_ids(tokenizer, eos_token_id)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.vocab_size, self.version, self.architecture = config.vocab_size, version, type(model).__name__
        if self.moe:
            self.moe_layers = moe_layer_indices(model)
            self.n_moe, self.top_k, _ = route_shape(model)
        wire = _wire_dtype(precision)
        self.meta = [WeightMeta(n, wire, tuple(t.shape)) for n, t in model.state_dict().items()]
        self.distributed, self.sender, self.processes = distributed, None, []
        self.rank = D.group_rank() if distributed else 0
        backend = cfg.weight_transfer if cfg.weight_transfer != "auto" else ("nccl" if on_cuda else "gloo")
        if backend == "nccl" and not on_cuda:
            raise ValueError("rollout.vllm.weight_transfer=nccl needs CUDA GPUs; on CPU use gloo (or auto)")
        try:
            urls = self._servers(cfg, config, tokenizer, seed, max_model_len, dtype_args, backend, on_cuda, log_dir)
            self.clients = [VllmServerClient(u, timeout_s, p, cfg.tensor_parallel_size) for u, p in urls]
            self.served_model = self.clients[0].get("v1/models")["data"][0]["id"] if self.rank == 0 else None
            self.served_model = D.broadcast_object(self.served_model) if distributed else self.served_model
            self.backend = backend
            self.connect()
            self.load_weights(model.state_dict() if weights is None else weights, version=version)
        except BaseException:
            self.close()
            raise

    def _servers(self, cfg, config, tokenizer, seed, max_model_len, dtype_args, backend, on_cuda, log_dir):
        """``[(url, process or None)]``: rank 0 starts them (or takes cfg.urls); the others learn the URLs."""
        if self.rank != 0:
            return [(u, None) for u in D.broadcast_object(None)]
        if cfg.urls:
            found = [(u, None) for u in cfg.urls]
        else:
            command = server_command(
                vllm_model_config(config, self.architecture),
                tokenizer,
                cfg,
                seed=seed,
                max_model_len=max_model_len or getattr(config, "max_position_embeddings", 2048),
                dtype_args=dtype_args,
                backend=GLOO_BACKEND if backend == "gloo" else "nccl",
                on_cuda=on_cuda,
                routes={"layers": self.moe_layers, "top_k": self.top_k} if self.moe else None,
                log_dir=log_dir,
            )
            self.processes = [ServerProcess.start(command, i, cfg, on_cuda) for i in range(cfg.servers)]
            for p in self.processes:
                p.wait_ready(cfg.server_start_timeout_s)
            found = [(p.url, p) for p in self.processes]
        if self.distributed:
            D.broadcast_object([u for u, _ in found])
        return found

    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(
        self,
        weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        version: int | None = None,
        *,
        in_flight: bool = False,
    ) -> None:
        """Send trained weights to every server (rank 0; on the other ranks the stream is drained,
        taking part in any gather it makes) and set the version; every rank returns after the sync.
        ``in_flight``: requests being sampled freeze during the sync and go on with the new
        weights (else they finish with the old ones first)."""
        version = self.version + 1 if version is None else int(version)
        items = weights.items() if isinstance(weights, Mapping) else weights
        if self.sender is None:
            for _ in items:
                pass
        else:
            self.sender.send(self.meta, _checked(items, self.meta), version, pause="keep" if in_flight else "wait")
        if self.distributed:
            D.barrier()  # nobody samples before the servers hold the new weights
        self.version = version

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        *,
        seeds: list[int] | None = None,
        capture_routes: bool = True,
    ) -> RolloutBatch:
        seeds = checked_request(prompts, seeds, self.vocab_size)
        started, greedy = self.version, sampling.temperature == 0
        capture = capture_routes and self.moe
        params = {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k or -1,
            "max_tokens": sampling.max_new_tokens,
            "logprobs": 0,
            "stop_token_ids": self.eos_ids,
            "ignore_eos": not self.eos_ids,
            "skip_special_tokens": False,
        }
        M, offset = len(self.clients), self.rank * len(prompts)
        served_by = [self.clients[(offset + i) % M] for i in range(len(prompts))]
        # the token route reports which version sampled each token; the completions route does not
        route = "generate_tokens" if self.in_flight else "complete"
        params = params if self.in_flight else {**params, "return_token_ids": True}
        with ThreadPoolExecutor(min(64, len(prompts))) as pool:
            calls = [
                pool.submit(
                    getattr(served_by[i], route), self.served_model, list(p), {**params, "seed": int(s) % 2**63}
                )
                for i, (p, s) in enumerate(zip(prompts, seeds))
            ]
            choices = [c.result() for c in calls]
        if capture and any(c.get("routed_experts") is None for c in choices):
            self._recorded_routes(choices, served_by)
        return self._batch(prompts, choices, greedy, capture, started)

    def _recorded_routes(self, choices: list[dict], served_by: list) -> None:
        """Routes from stablerl's recorder in each CPU server, put where vLLM's own would be."""
        for client in {id(c): c for c in served_by}.values():
            mine = [c for c, s in zip(choices, served_by) if s is client]
            got = client.recorded_routes([c["request_id"] for c in mine])
            for c in mine:
                if c["request_id"] not in got:
                    raise ValueError(
                        f"vLLM server {client.url} reported no routes for request {c['request_id']}: it was not "
                        "started by stablerl with route recording (an MoE model on CPU needs that; on GPUs "
                        "start it with --enable-return-routed-experts)"
                    )
                c["routed_experts"] = got[c["request_id"]]

    def _batch(self, prompts, choices, greedy: bool, capture: bool, started: int) -> RolloutBatch:
        """``started``: the engine's version when the requests went out."""
        B, P = len(prompts), max(len(p) for p in prompts)
        R = max(1, max(len(c["token_ids"]) for c in choices))
        ids = torch.full((B, P + R), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros(B, P + R, dtype=torch.long)
        response_mask = torch.zeros(B, R, dtype=torch.bool)
        logp = torch.zeros(B, R, dtype=torch.float32)
        finished = torch.zeros(B, dtype=torch.bool)
        routes = torch.full((B, P + R, self.n_moe, self.top_k), NO_ROUTE, dtype=ROUTE_DTYPE) if capture else None
        token_version = _token_versions(choices, R, started) if self.in_flight else None
        for i, (prompt, c) in enumerate(zip(prompts, choices)):
            tokens = list(c["token_ids"])
            n, start = len(tokens), P - len(prompt)
            ids[i, start:P] = torch.tensor(prompt)
            attention[i, start : P + n] = 1
            ids[i, P : P + n] = torch.tensor(tokens, dtype=torch.long)
            response_mask[i, :n] = True
            if not greedy and n:
                logp[i, :n] = torch.tensor(c["logprobs"]["token_logprobs"], dtype=torch.float32)
            finished[i] = c["finish_reason"] == "stop"
            if capture:
                seq = decode_routes(c["routed_experts"])
                seq = seq[:, self.moe_layers] if seq.shape[1] != self.n_moe else seq  # vLLM's: every layer
                expected = len(prompt) + n - 1
                if seq.shape[0] < expected:
                    raise ValueError(f"vLLM server returned routes for {seq.shape[0]} of {expected} fed tokens")
                routes[i, start : start + expected] = torch.from_numpy(seq[:expected].astype(np.int16))
        return RolloutBatch(
            input_ids=ids,
            attention_mask=attention,
            prompt_width=P,
            response_mask=response_mask,
            rollout_logp=logp,
            finished=finished,
            version=started if token_version is None else _oldest(token_version, response_mask, started),
            routes=routes,
            token_version=token_version,
        )

    def connect(self) -> None:
        """(Re)join the servers' weight-transfer group (rank 0): at start, and after anyone else
        joined it (a server keeps the last trainer that initialised its transfer engine)."""
        if self.rank == 0:
            if self.sender is not None:
                self.sender.close()
            self.sender = WeightSender(self.clients, self.backend, timeout_s=self.timeout_s)

    # ---------------------------------------------------------------------------------------
    def pause(self) -> None:
        for c in self.clients:
            c.post("pause", query={"mode": "wait"})

    def resume(self) -> None:
        for c in self.clients:
            c.post("resume")

    def check_alive(self) -> None:
        """A clear error naming any server that has died (started servers only)."""
        for p in self.processes:
            p.check_alive()

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None
        for p in self.processes:
            p.stop()
        self.processes = []


def _token_versions(choices: list[dict], R: int, default: int) -> torch.Tensor:
    """``[B, R]``: the policy version that sampled each response token, from vLLM's
    ``weight_versions`` spans (``default``, the engine's version, for a response without them);
    0 at padding."""
    out = torch.zeros(len(choices), R, dtype=torch.long)
    for i, c in enumerate(choices):
        n = len(c["token_ids"])
        out[i, :n] = default
        for span in c.get("weight_versions") or []:
            out[i, int(span["start"]) : min(int(span["end"]), n)] = int(span["version"])
    return out


def _oldest(token_version: torch.Tensor, response_mask: torch.Tensor, started: int) -> int:
    """The oldest version that sampled any token (the batch's ``version``)."""
    return int(token_version[response_mask].min()) if bool(response_mask.any()) else started


def _checked(items, meta: list[WeightMeta]):
    """The tensors of ``items`` in ``meta``'s order (a name out of order is an error, never a
    weight loaded under another name)."""
    for m, (name, t) in zip(meta, items):
        if name != m.name:
            raise ValueError(f"weight sync: the trainer sent {name!r} where {m.name!r} was declared")
        yield t
