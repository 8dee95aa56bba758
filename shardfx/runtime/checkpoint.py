"""Checkpoints: sharded tensors through torch.distributed.checkpoint (DCP), everything else as JSON.

A checkpoint is a folder:

    .metadata, __*_*.distcp    DCP: every tensor, in its full, unpadded logical shape
    shardfx.json               step, data position, optimizer hyperparameters, scheduler, RNG,
                               the user's client_state, the shape/dtype of every tensor, the
                               sha256 of every other file of the folder and of its own content
                               (files["shardfx.json"]: canonical JSON without that entry) and, for a
                               Hugging Face model, its class and config (`hf`, read by `shardfx export --hf`)

Loading validates shardfx.json field by field and checks every file's sha256 before it
reads a tensor: a flipped bit is refused, naming the file and the tensors in it. The checks
(checkpoint_checks.py) also hold where an attacker re-records the checksums: shardfx.json's
tensors must be the ones .metadata declares, with their shapes and dtypes, every chunk inside
its data file, and the RNG state and optimizer settings readable, before anything is allocated
or any rank's state changes.

Tensor keys are `model/<param>`, `buffer/<name>` and `optim/<param>/<state key>` (e.g.
`optim/fc.weight/exp_avg`). A sharded parameter and the optimizer state shaped like it
are stored as ONE logical tensor, so loading at another world size or ZeRO stage
reshards both, across tensor-parallel meshes too: the local runtime saves and loads full
tensors (no process group, DCP's single-process path); the distributed runtime hands DCP
the boxes of each logical tensor that this rank's shard covers (checkpoint_layout.Pieces),
so each rank writes and reads only its own shard.

Writes are atomic: everything goes to `<dir>.tmp`, shardfx.json last, then the folder
is renamed into place (the previous `<dir>`, if any, is moved aside to `<dir>.old` first
and removed after). A save killed while writing leaves `<dir>` as it was; one killed
between the two renames leaves both complete copies beside it, and loading (or the next
save) renames the newer back into place (`recover`). Loading reads tensors
with torch.load(weights_only=True) (DCP's own reader) and DCP's `.metadata` with an
unpickler that admits exact (module, name) pairs of DCP's metadata classes, no dotted
name; a `.metadata` that declares any entry as bytes (which DCP would read with
torch.load(weights_only=False)) is refused before any data file is opened. No other
pickle is read, so a crafted checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from shardfx.errors import CheckpointError
from shardfx.runtime import checkpoint_layout as layout
from shardfx.runtime.checkpoint_checks import (  # FORMAT and META_FILE are also read as checkpoint.*
    FORMAT,
    META_FILE,
    check_meta,
    check_tensors,
    meta_digest,
    read_dcp_metadata,
)


def save(path: str | os.PathLike, runtime: Any, meta: dict[str, Any]) -> None:
    """Write `runtime`'s model and optimizer state and `meta` (JSON-able) to the folder `path`, atomically."""
    path = os.fspath(path)
    distributed = runtime.distributed
    rank0 = not distributed or dist.get_rank() == 0
    tensors, extra = layout.collect(runtime)
    shapes = {k: {"shape": list(layout.global_shape(v)), "dtype": str(v.dtype)} for k, v in tensors.items()}
    aliases = {
        s.name: list(s.aliases) for program, _ in layout.views(runtime) for s in program.signature.params() if s.aliases
    }
    if distributed and getattr(runtime, "stages", None) is not None:
        # a pipeline process holds its stages only: the file describes every stage's tensors
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (shapes, extra["state"], aliases))
        for part_shapes, part_state, part_aliases in parts:
            shapes.update(part_shapes)
            aliases.update(part_aliases)
            for name, items in part_state.items():
                extra["state"].setdefault(name, {}).update(items)
    meta = {
        "format": FORMAT,
        **meta,
        "optimizer_extra": extra,
        "state_dict_keys": list(runtime.model.state_dict()),
        "aliases": aliases,
        "tensors": shapes,
    }
    hf = hf_model_meta(runtime.model)
    if hf is not None:
        meta["hf"] = hf
    try:
        text = json.dumps(meta, indent=1)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"checkpoint metadata (client_state, scheduler state, optimizer hyperparameters) must be JSON: {exc}"
        ) from exc
    tmp = path + ".tmp"
    if rank0:
        recover(path)  # a save killed between its renames: put the complete checkpoint back first
        shutil.rmtree(tmp, ignore_errors=True)  # a save that was killed before
        os.makedirs(tmp)
    _barrier(distributed)
    _dcp(dcp.save, tensors, FileSystemWriter(tmp), distributed)
    if rank0:  # dcp.save returns on rank 0 after every rank's files are written
        meta["files"] = {name: _sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        meta = json.loads(json.dumps(meta))  # as it will be read back (tuples as lists, keys as str)
        meta["files"][META_FILE] = meta_digest(meta)
        text = json.dumps(meta, indent=1)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(tmp, path)
    _barrier(distributed)


def hf_model_meta(model: torch.nn.Module) -> dict[str, Any] | None:
    """`model`'s Hugging Face class name, full config and key prefix, when it is a transformers.PreTrainedModel
    or a module whose whole state lies under one ("hf." for a wrapper's `self.hf`); None for any other model.
    Export runs in another process, without the model: this is what rebuilds its config.json there."""
    modeling = sys.modules.get("transformers.modeling_utils")  # imported wherever a PreTrainedModel exists
    if modeling is None:
        return None
    for name, module in model.named_modules():  # outermost first
        if isinstance(module, modeling.PreTrainedModel):
            prefix = f"{name}." if name else ""
            if not all(k.startswith(prefix) for k in model.state_dict()):
                return None  # the wrapper has state of its own: not one HF model
            config = json.loads(module.config.to_json_string(use_diff=False))
            return {"class": type(module).__name__, "config": config, "prefix": prefix}
    return None


def recover(path: str) -> str:
    """The folder holding the complete checkpoint saved as `path`: `path` itself, or, when a save was
    killed after moving the old one aside and before renaming the new one in, the new one (`<path>.tmp`,
    complete once its shardfx.json exists: it is written last) or else the old (`<path>.old`), renamed
    back to `path`. Loading and saving call it first, so at every instant one complete copy is found."""
    if os.path.isfile(os.path.join(path, META_FILE)) or os.path.exists(path):
        return path
    for sibling in (path + ".tmp", path + ".old"):
        if os.path.isfile(os.path.join(sibling, META_FILE)):
            try:
                os.rename(sibling, path)
            except OSError:  # read-only, or another rank got there first: read it where it lies
                return sibling if os.path.isdir(sibling) else path
            return path
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON half of a checkpoint; a clear error when `path` is not a complete checkpoint."""
    path = os.fspath(path)
    file = os.path.join(path, META_FILE)
    if not os.path.isfile(file):
        what = "does not exist" if not os.path.exists(path) else f"has no {META_FILE} (not a complete checkpoint)"
        raise ValueError(f"checkpoint {path!r} {what}")
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: {META_FILE} is not readable JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"checkpoint {path!r} has format {found!r}; this shardfx reads {FORMAT!r}")
    check_meta(meta, path)
    recorded = (meta.get("files") or {}).get(META_FILE)
    if recorded is not None and recorded != meta_digest(meta):
        raise CheckpointError(
            f"checkpoint {path!r}: {META_FILE} is corrupt (its content differs from the sha256 it records)"
        )
    return meta


def verify_files(path: str, meta: dict[str, Any]) -> None:
    """The checkpoint's data files are the bytes it was saved with (the sha256 of each, in shardfx.json);
    a mismatch names the file and the tensors stored in it. Checkpoints from before checksums load unchecked."""
    files = meta.get("files")
    if files is None:
        warnings.warn(f"checkpoint {path!r} has no checksums (written by an older shardfx): not verified", stacklevel=3)
        return
    for name, digest in files.items():
        if name == META_FILE:
            continue  # checked by read_meta: the digest of its content
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path!r}: {name} is missing")
        if _sha256(file) != digest:
            raise CheckpointError(
                f"checkpoint {path!r}: {name} is corrupt (its sha256 differs from the one saved)"
                + _tensors_in(path, name)
            )


def _tensors_in(path: str, name: str) -> str:
    """'; it holds model/fc.weight, ...' from DCP's metadata ('' when that cannot be read)."""
    try:
        metadata = read_dcp_metadata(path)
    except CheckpointError:
        return ""
    keys = sorted({index.fqn for index, info in metadata.storage_data.items() if info.relative_path == name})
    return f"; it holds {', '.join(keys)}" if keys else ""


def _sha256(file: str) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load(path: str | os.PathLike, runtime: Any) -> dict[str, Any]:
    """Load a checkpoint into `runtime` (resharding to its world size and ZeRO stage); returns the metadata."""
    path = recover(os.fspath(path))
    meta = read_meta(path)
    saved = {k: (tuple(v["shape"]), _dtype(v["dtype"])) for k, v in meta["tensors"].items()}
    verify_files(path, meta)
    check_tensors(path, saved, read_dcp_metadata(path))  # refused here, in one line, before DCP starts
    template = layout.template(runtime, saved)
    _load(path, template, runtime.distributed)
    layout.restore(runtime, template, meta.get("optimizer_extra", {}))
    return meta


def consolidate(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model's full state_dict (its own keys and order, tied names included) from a checkpoint, in one process."""
    path = recover(os.fspath(path))
    meta = read_meta(path)
    saved = {k: (tuple(v["shape"]), _dtype(v["dtype"])) for k, v in meta["tensors"].items()}
    verify_files(path, meta)
    check_tensors(path, saved, read_dcp_metadata(path))
    names = {k.split("/", 1)[1] for k in saved if k.startswith(("model/", "buffer/"))}
    aliases = meta.get("aliases", {})
    unknown = sorted(
        {n for n in aliases if n not in names}
        | (set(meta["state_dict_keys"]) - names - {a for v in aliases.values() for a in v})
    )
    if unknown:
        raise CheckpointError(
            f"checkpoint {path!r}: {META_FILE} names {unknown[:5]} in state_dict_keys or aliases, "
            "which it holds no tensor for"
        )
    template = {
        k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in saved.items() if k.startswith(("model/", "buffer/"))
    }
    _load(path, template, distributed=False)
    values = {k.split("/", 1)[1]: v for k, v in template.items()}
    for name, tied in aliases.items():
        for alias in tied:
            values[alias] = values[name].clone()  # one file entry per name: safetensors refuses shared storage
    return {k: values[k] for k in meta["state_dict_keys"]}


def _dcp(fn: Any, tensors: dict[str, Tensor], storage: Any, distributed: bool) -> None:
    with warnings.catch_warnings():
        # Single-process DCP warns that it assumes a single process; that is the intent here.
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        if distributed:
            fn(tensors, storage_writer=storage) if fn is dcp.save else fn(tensors, storage_reader=storage)
        elif fn is dcp.save:
            fn(tensors, storage_writer=storage, no_dist=True)
        else:
            fn(tensors, storage_reader=storage, no_dist=True)


def _load(path: str, template: dict[str, Tensor], distributed: bool) -> None:
    """dcp.load with its failures as one CheckpointError line (DCP raises a BaseException with tracebacks)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        _dcp(dcp.load, template, _SafeReader(path), distributed)
    except CheckpointException as exc:
        causes = list(getattr(exc, "failures", {}).values())
        cause = causes[0] if causes else exc
        if isinstance(cause, CheckpointError):
            raise CheckpointError(str(cause)) from None
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
        raise CheckpointError(f"checkpoint {path!r} could not be read: {type(cause).__name__}: {first}") from None


def _replace_dir(tmp: str, path: str) -> None:
    old = path + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()


def _dtype(text: str) -> torch.dtype:
    value = getattr(torch, text.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise CheckpointError(f"checkpoint names an unknown dtype {text!r}")
    return value


class _SafeReader(FileSystemReader):
    """DCP's file reader, with the `.metadata` read and checked by read_dcp_metadata."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = read_dcp_metadata(os.fspath(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata
