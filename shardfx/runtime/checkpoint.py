"""Checkpoints: sharded tensors through torch.distributed.checkpoint (DCP), everything else as JSON.

A checkpoint is a folder:

    .metadata, __*_*.distcp    DCP: every tensor, in its full, unpadded logical shape
    shardfx.json               step, data position, optimizer hyperparameters, scheduler, RNG,
                               the user's client_state, the shape/dtype of every tensor, the
                               sha256 of every other file of the folder and, for a Hugging Face
                               model, its class and config (`hf`, read by `shardfx export --hf`)

Loading validates shardfx.json field by field and checks every file's sha256 before it
reads a tensor: a flipped bit is refused, naming the file and the tensors in it.

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
import pickle
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

FORMAT = "shardfx-checkpoint/1"
META_FILE = "shardfx.json"


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
    _check_meta(meta, path)
    return meta


# shardfx.json: every field this code reads, with its type (None allowed where listed).
_META_FIELDS: dict[str, tuple[type, ...]] = {
    "world_size": (int,),
    "zero_stage": (int,),
    "steps": (int,),
    "micro_steps": (int,),
    "samples": (int,),
    "skipped_steps": (int,),
    "scheduler": (dict, type(None)),
    "rng": (dict,),
    "client_state": (dict,),
    "optimizer_extra": (dict,),
    "state_dict_keys": (list,),
    "aliases": (dict,),
    "tensors": (dict,),
}
# Fields a checkpoint has only where they apply (and older shardfx did not write): checked when present.
_OPTIONAL_META_FIELDS: dict[str, tuple[type, ...]] = {
    "files": (dict, type(None)),  # None: written before checksums, like an absent one
    "hf": (dict,),
    "loss_scaler": (dict,),  # fp16: the dynamic loss scale and its counters (runtime/loss_scale.py)
}
_HF_FIELDS: dict[str, tuple[type, ...]] = {"class": (str,), "config": (dict,), "prefix": (str,)}


def _check_meta(meta: dict[str, Any], path: str) -> None:
    """Every field of shardfx.json has the type this code reads it as (CheckpointError naming the field)."""

    def bad(field: str, value: Any, wanted: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path!r}: {META_FILE} field {field!r} is {value!r}; expected {wanted}")

    for field, types in _META_FIELDS.items():
        value = meta.get(field)
        if field not in meta or isinstance(value, bool) or not isinstance(value, types):
            raise bad(field, value, " or ".join(t.__name__ for t in types))
    for key, entry in meta["tensors"].items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (
            isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise bad(f"tensors.{key}.shape", shape, "a list of sizes")
        if not isinstance(entry.get("dtype"), str):
            raise bad(f"tensors.{key}.dtype", entry.get("dtype"), "a dtype name")
    if not all(isinstance(k, str) for k in meta["state_dict_keys"]):
        raise bad("state_dict_keys", meta["state_dict_keys"], "a list of names")
    for field, types in _OPTIONAL_META_FIELDS.items():
        if field in meta and not isinstance(meta[field], types):
            raise bad(field, meta[field], " or ".join(t.__name__ for t in types))
    if not all(isinstance(v, str) for v in (meta.get("files") or {}).values()):
        raise bad("files", meta["files"], "file name -> sha256")
    if "hf" in meta:
        for field, types in _HF_FIELDS.items():
            if not isinstance(meta["hf"].get(field), types):
                raise bad(f"hf.{field}", meta["hf"].get(field), " or ".join(t.__name__ for t in types))


def verify_files(path: str, meta: dict[str, Any]) -> None:
    """The checkpoint's data files are the bytes it was saved with (the sha256 of each, in shardfx.json);
    a mismatch names the file and the tensors stored in it. Checkpoints from before checksums load unchecked."""
    files = meta.get("files")
    if files is None:
        warnings.warn(f"checkpoint {path!r} has no checksums (written by an older shardfx): not verified", stacklevel=3)
        return
    for name, digest in files.items():
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
    template = layout.template(runtime, saved)
    verify_files(path, meta)
    read_dcp_metadata(path)  # refused here, in one line, before DCP starts
    _load(path, template, runtime.distributed)
    layout.restore(runtime, template, meta.get("optimizer_extra", {}))
    return meta


def consolidate(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model's full state_dict (its own keys and order, tied names included) from a checkpoint, in one process."""
    path = recover(os.fspath(path))
    meta = read_meta(path)
    template = {
        k: torch.empty(v["shape"], dtype=_dtype(v["dtype"]))
        for k, v in meta["tensors"].items()
        if k.startswith(("model/", "buffer/"))
    }
    verify_files(path, meta)
    read_dcp_metadata(path)
    _load(path, template, distributed=False)
    values = {k.split("/", 1)[1]: v for k, v in template.items()}
    for name, aliases in meta.get("aliases", {}).items():
        for alias in aliases:
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
        raise ValueError(f"checkpoint names an unknown dtype {text!r}")
    return value


_DCP_METADATA = "torch.distributed.checkpoint.metadata"


class _MetadataUnpickler(pickle.Unpickler):
    """Admits exactly the (module, name) pairs DCP's `.metadata` holds: its dataclasses, torch.Size, dtypes,
    the layout lookup, paths. A dotted name (protocol 4 resolves `os.system` inside any allowed module) or
    any other pair is refused: unpickling builds data, it never calls anything else."""

    _ALLOWED = {
        (_DCP_METADATA, "Metadata"),
        (_DCP_METADATA, "MetadataIndex"),
        (_DCP_METADATA, "StorageMeta"),
        (_DCP_METADATA, "TensorProperties"),
        (_DCP_METADATA, "TensorStorageMetadata"),
        (_DCP_METADATA, "ChunkStorageMetadata"),
        (_DCP_METADATA, "BytesStorageMetadata"),  # admitted to be named and refused (see _check_entries)
        (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # a lookup in a table of torch's layouts
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name:
            if (module, name) in self._ALLOWED:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a checkpoint never holds")


def read_dcp_metadata(path: str) -> Any:
    """DCP's `.metadata` of the checkpoint at `path`, read by _MetadataUnpickler and checked: every entry a
    tensor (DCP reads a bytes entry with torch.load(weights_only=False): code could run). CheckpointError
    otherwise, in one line, before any data file is opened."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    file = os.path.join(path, ".metadata")
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path!r} has no .metadata (not a complete checkpoint)") from None
    except Exception as exc:  # noqa: BLE001 - any malformed or hostile pickle: one clear line
        raise CheckpointError(f"checkpoint {path!r}: .metadata refused: {exc}") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint {path!r}: .metadata holds a {type(metadata).__name__}, not DCP metadata")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(
                f"checkpoint {path!r}: .metadata declares {key!r} as {type(entry).__name__} (bytes); shardfx writes "
                "only tensors and reads no pickled objects"
            )
    return metadata


class _SafeReader(FileSystemReader):
    """DCP's file reader, with the `.metadata` read and checked by read_dcp_metadata."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = read_dcp_metadata(os.fspath(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata
