"""Atomic, resumable checkpoints (DCP) and HF exports.

``RUN_DIR/checkpoints/step_000123/`` holds

- ``dcp/``: model and optimizer state written by ``torch.distributed.checkpoint`` — each rank its
  own shards, so a run on K ranks can be resumed on any number of ranks (DCP reshards on load);
- ``config.json`` (+ generation config) and the tokenizer, to rebuild the model before loading;
- ``state.json``: step, counters, number of metrics lines, and a SHA-256 of every other file of
  the checkpoint — written last.

Reading a checkpoint never runs code: DCP's metadata is unpickled with an allow-list of its own
classes (``SafeReader``), tensors with ``torch.load(weights_only=True)``. A checkpoint whose
files do not match their checksums (or that has no checksum table, or files outside it), or whose
state.json is damaged or invalid (each field checked: ``rundir.StateRecord``), is never trained on: a
resume falls back to the newest good one and says which it skipped and why (``latest_good``).

A checkpoint is written into ``step_000123.tmp`` and renamed when complete, so a kill at any
moment leaves the previous checkpoint or the new one, never a half-written one taken as the
latest. Before anything is written, every parameter and optimizer tensor is checked: a
non-finite state is never saved as a checkpoint (``NonFiniteState``). A write that fails (a full
disk: ENOSPC, also inside DCP's shard write) removes the partial directory and says in one line
which directory, why and, for a full disk, the space it needs and has (``CheckpointWriteError``);
the previous checkpoint stays intact.

``RUN_DIR/export/step_000123/`` is an HF checkpoint (safetensors + tokenizer) that
``AutoModelForCausalLM.from_pretrained`` loads: written at the end of a run and every
``checkpoint.export_every`` steps.
"""

from __future__ import annotations

import errno
import hashlib
import json
import pickle
import shutil
import warnings
from pathlib import Path

import torch

from stablerl import distributed as D
from stablerl.rundir import CONFIG_COPY, RunDir, RunState, atomic_write_text, publish_dir

STATE_FILE = "state.json"
DCP_DIR = "dcp"


# --------------------------------------------------------------------------------------------
# Reading a checkpoint never runs code. DCP's own reader unpickles ``.metadata`` with the plain
# pickle module: a crafted file runs whatever it names. ``SafeReader`` unpickles it with an
# allow-list of exactly the classes DCP's metadata is made of; tensors and the optimizer's
# non-tensor entries are read by DCP with ``torch.load(weights_only=True)``.
# --------------------------------------------------------------------------------------------
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "tuple", "list", "dict"},
}


class UnsafeCheckpoint(ValueError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":  # torch.Size and the dtypes, layouts and memory formats as values
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        raise UnsafeCheckpoint(
            f"refusing to load {module}.{name}: a checkpoint's metadata names only DCP's own "
            "metadata classes (the file may have been crafted to run code)"
        )


def _safe_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except UnsafeCheckpoint as e:
                    raise UnsafeCheckpoint(f"{path}: {e}") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    reader = SafeReader(str(path))
    reader.read_metadata()  # here, so a refusal is the error raised (DCP's loader would swallow it)
    return reader


class NonFiniteState(RuntimeError):
    pass


class CheckpointWriteError(RuntimeError):
    pass


def _write_error(path: Path, e: OSError, needed: int | None = None) -> CheckpointWriteError:
    """One line: the path, the errno and, for a full disk, the space the write needs and has."""
    name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
    hint = ""
    if e.errno == errno.ENOSPC:
        where = next((p for p in Path(path).parents if p.exists()), Path("/"))
        size = f"the checkpoint needs about {needed / 2**20:.1f} MiB, " if needed else ""
        free = shutil.disk_usage(where).free / 2**20
        hint = f" (the disk is full: {size}{free:.1f} MiB are free at {where}; free space there, then --resume)"
    return CheckpointWriteError(
        f"writing {path} failed: {name}: {e.strerror or e}{hint}; the previous checkpoint is intact"
    )


def _failure(path: Path, e: BaseException, needed: int) -> str:
    """A failed checkpoint write as one line (DCP's own exception holds every rank's traceback)."""
    from torch.distributed.checkpoint.api import CheckpointException

    os_error = _os_error(e)
    if os_error is not None:
        return str(_write_error(path, os_error, needed))
    inner = [x for x in _causes(e) if not isinstance(x, CheckpointException)] or [e]
    first = (str(inner[0]).strip().splitlines() or [""])[0][:300]
    return f"writing {path} failed: {type(inner[0]).__name__}: {first}; the previous checkpoint is intact"


def _state_bytes(model, optimizer) -> int:
    """Bytes of this rank's weights and optimizer state: what its DCP shards hold."""
    return sum(t.numel() * t.element_size() for _, t in _named_state(model, optimizer))


def save_model_dir(path: Path, model, tokenizer, state_dict: dict | None = None) -> Path:
    """An HF checkpoint directory (safetensors + tokenizer), built in ``<path>.tmp`` and renamed
    into place when complete. ``state_dict`` overrides the model's own (e.g. gathered shards)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        tokenizer.save_pretrained(tmp)
        return publish_dir(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(path, e) from None


# --------------------------------------------------------------------------------------------
def check_finite(model, optimizer) -> None:
    """``NonFiniteState`` naming the first non-finite tensor (on any rank; a collective)."""
    named = _named_state(model, optimizer)
    bad = (
        ""
        if all_finite([t for _, t in named])
        else next(name for name, t in named if not bool(torch.isfinite(t).all()))
    )
    names = [b for b in D.all_gather_objects(bad) if b]
    if names:
        raise NonFiniteState(f"the weights or optimizer state are no longer finite ({names[0]})")


def _named_state(model, optimizer) -> list[tuple[str, torch.Tensor]]:
    """This rank's weights and floating-point optimizer state, each with the name an error gives it."""
    named = [(f"parameter {name}", _local(p.detach())) for name, p in model.named_parameters()]
    for i, state in enumerate(optimizer.state.values()):
        for key, value in state.items():
            t = _local(value)
            if torch.is_tensor(t) and t.is_floating_point():
                named.append((f"optimizer state {key} of parameter #{i}", t))
    return named


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Every element of every tensor finite. The learner asks every step, so the common case is one
    batched reduction (a test per tensor cost ~6% of the default update): a 2-norm is finite only
    when every element is (NaN and inf propagate), and when it is not, either an element is not
    finite or finite ones are so large that their squares overflow: the exact test decides."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    if bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(tensors, 2)])).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _local(t):
    """This rank's shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


# a checkpoint holds what is trained: with LoRA (model.lora) the adapters, never the frozen base
_OPTIONS = dict(ignore_frozen_params=True)


def _dcp_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(**_OPTIONS))
    # a tied weight's second name (lm_head.weight) escapes ignore_frozen_params
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            msd.pop(name, None)
    return {"model": msd, "optim": osd}


def save(
    run_dir: Path,
    step: int,
    model,
    tokenizer,
    optimizer,
    state: RunState,
    keep_last: int,
    world: D.World | None = None,
    extra=None,
) -> Path:
    """A checkpoint of ``step`` (every rank calls it; rank 0 publishes it). ``extra(dir)``, on rank
    0, writes more files into it before it is checksummed and published."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    world = world or D.World()
    check_finite(model, optimizer)
    root = RunDir(run_dir).checkpoints
    final = RunDir(run_dir).checkpoint(step)
    tmp = final.with_name(final.name + ".tmp")
    _fresh_tmp(root, tmp, world)
    failure = ""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(tmp / DCP_DIR))
        if world.is_main:
            _finish_on_main(run_dir, tmp, final, model, tokenizer, state, step, world.size, extra)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps the OSError of any rank
        if _collective_failure(e):  # a rank stopped answering: not a write error (api.train names the rank)
            raise
        stop = next((x for x in _causes(e) if isinstance(x, KeyboardInterrupt)), None)
        if stop is not None:  # Ctrl-C or SIGTERM during the write, which DCP wraps: a stop, not a disk error
            raise stop from None
        failure = _failure(final, e, _state_bytes(model, optimizer) * world.size)
    failures = [f for f in D.all_gather_objects(failure) if f]
    if failures:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(failures[0])
    if world.is_main:
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def _fresh_tmp(root: Path, tmp: Path, world: D.World) -> None:
    """An empty ``step_N.tmp`` on rank 0 (a leftover of a killed save removed); a failure is every
    rank's error."""
    failure = ""
    if world.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as e:
            failure = str(_write_error(tmp, e))
    failure = D.broadcast_object(failure)
    if failure:
        raise CheckpointWriteError(failure)


def _finish_on_main(run_dir, tmp: Path, final: Path, model, tokenizer, state, step: int, world_size: int, extra):
    """Rank 0's part after the shards: the model's config and tokenizer, ``extra``'s files, a copy of
    the run config, the state with every file's checksum; then the directory is published."""
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if extra is not None:  # more files of the checkpoint (the lag's pending weights), checksummed too
        extra(tmp)
    run_config = RunDir(run_dir).config  # a copy that outlives damage to RUN_DIR/config.json
    if run_config.is_file():
        shutil.copyfile(run_config, tmp / CONFIG_COPY)
    record = {**state.to_checkpoint(), "step": step, "world_size": world_size, "files": _checksums(tmp)}
    atomic_write_text(tmp / STATE_FILE, json.dumps(record, indent=1))
    publish_dir(tmp, final)


def _causes(e: BaseException):
    """``e`` and every exception behind it: causes, contexts, and the per-rank failures DCP wraps."""
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        for v in failures.values() if isinstance(failures, dict) else []:
            stack.append(v[0] if isinstance(v, tuple) else v)


def _collective_failure(e: BaseException) -> bool:
    return any(D.is_collective_failure(x) for x in _causes(e))


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (DCP wraps per-rank failures), if there is one."""
    return next((x for x in _causes(e) if isinstance(x, OSError)), None)


def load(ckpt: Path, model, optimizer) -> None:
    """Load model and optimizer state (sharded or not, from a run on any number of ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    sd = _dcp_state(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(sd, storage_reader=_safe_reader(Path(ckpt) / DCP_DIR))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=sd["model"],
        optim_state_dict=sd["optim"],
        # the frozen base is not in it: strict only when every parameter is trained
        options=StateDictOptions(**_OPTIONS, strict=all(p.requires_grad for p in model.parameters())),
    )


def load_model_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint as full tensors (for tests and tools), without a model."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        _load_state_dict(
            sd, storage_reader=_safe_reader(Path(ckpt) / DCP_DIR), planner=_EmptyStateDictLoadPlanner(), no_dist=True
        )
    return sd["model"]


def _checksums(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` but state.json, by relative path."""
    out = {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file() and p.name != STATE_FILE):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[str(path.relative_to(root))] = h.hexdigest()
    return out


def damage(ckpt: Path) -> str | None:
    """Why the checkpoint ``ckpt`` cannot be trusted (a damaged or invalid state.json, a step
    that is not its folder's, no checksum table, a missing or changed file), or None when it is
    intact."""
    ckpt = Path(ckpt)
    try:
        data = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{ckpt / STATE_FILE} is unreadable ({type(e).__name__})"
    try:
        state = RunState.from_checkpoint(data)
    except ValueError as e:
        return f"{ckpt / STATE_FILE} does not hold a valid checkpoint state ({e})"
    if ckpt.name != RunDir(ckpt.parent.parent).checkpoint(state.step).name:
        return f"{ckpt / STATE_FILE} records step {state.step}, not the step of its folder {ckpt.name}"
    expected = data.get("files")
    if expected is None:  # without its table nothing in it can be checked: not trusted
        return f"{ckpt / STATE_FILE} has no checksum table ('files')"
    actual = _checksums(ckpt)
    unlisted = sorted(set(actual) - set(expected))
    if unlisted:  # every file a checkpoint writes is in its table
        return f"{ckpt / unlisted[0]} is not in the checkpoint's checksum table ({ckpt / STATE_FILE})"
    for name, digest in expected.items():
        if name not in actual:
            return f"{ckpt / name} is missing"
        if actual[name] != digest:
            return f"{ckpt / name} does not match its checksum (damaged or changed)"
    return None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp") and (p / STATE_FILE).is_file()
    )


def latest(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def latest_good(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint, and a warning for each newer one skipped as damaged."""
    skipped: list[tuple[Path, str]] = []
    for ckpt in reversed(complete_checkpoints(run_dir)):
        problem = damage(ckpt)
        if problem is None:
            return ckpt, [f"checkpoint {bad} is damaged ({why}); resuming from {ckpt} instead" for bad, why in skipped]
        skipped.append((ckpt, problem))
    warnings_ = [f"checkpoint {bad} is damaged ({why}) and no older good one exists" for bad, why in skipped]
    return None, warnings_


def load_state(ckpt: Path) -> RunState:
    return RunState.from_checkpoint(json.loads((Path(ckpt) / STATE_FILE).read_text()))
