"""What a checkpoint's files must say before anything in them is used: shardfx.json field by field
(and its own digest), DCP's `.metadata` read by a restricted unpickler and checked entry by entry, and
the two against each other. Each failure is one CheckpointError line naming the file and the field.

Loading (runtime/checkpoint.py) runs these checks first, so a malformed or hostile checkpoint is refused
before a tensor is allocated, a generator reseeded or a rank's state changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
from typing import Any

import torch

from shardfx.errors import CheckpointError
from shardfx.runtime.rng import parse_rng_state

FORMAT = "shardfx-checkpoint/1"
META_FILE = "shardfx.json"


def meta_digest(meta: dict[str, Any]) -> str:
    """The sha256 of shardfx.json's content (canonical JSON, without this digest itself): files["shardfx.json"].
    A file cannot hold its own hash, so it records that of what it says; bytes that do not change what it
    says (whitespace) are not corruption."""
    files = {k: v for k, v in (meta.get("files") or {}).items() if k != META_FILE}
    canonical = json.dumps({**meta, "files": files}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


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


def check_meta(meta: dict[str, Any], path: str) -> None:
    """Every field of shardfx.json has the type this code reads it as (CheckpointError naming the field)."""

    def bad(field: str, value: Any, wanted: str) -> CheckpointError:
        shown = repr(value) if len(repr(value)) <= 120 else repr(value)[:120] + "..."
        return CheckpointError(f"checkpoint {path!r}: {META_FILE} field {field!r} is {shown}; expected {wanted}")

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
        if not isinstance(entry.get("dtype"), str) or not isinstance(
            getattr(torch, entry["dtype"].removeprefix("torch."), None), torch.dtype
        ):
            raise bad(f"tensors.{key}.dtype", entry.get("dtype"), "a dtype name")
        if not key.startswith(("model/", "buffer/", "optim/")):
            raise bad("tensors", key, "keys model/<name>, buffer/<name> or optim/<name>/<state>")
    for field in ("steps", "micro_steps", "samples", "skipped_steps", "zero_stage", "world_size"):
        if meta[field] < (1 if field == "world_size" else 0):
            raise bad(field, meta[field], "a count >= 0" if field != "world_size" else "an integer >= 1")
    if not all(isinstance(k, str) for k in meta["state_dict_keys"]):
        raise bad("state_dict_keys", meta["state_dict_keys"], "a list of names")
    if not all(isinstance(v, list) and all(isinstance(a, str) for a in v) for v in meta["aliases"].values()):
        raise bad("aliases", meta["aliases"], "name -> list of names")
    extra = meta["optimizer_extra"]
    groups, state = extra.get("groups", []), extra.get("state", {})
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise bad("optimizer_extra.groups", groups, "a list of param group settings")
    if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()):
        raise bad("optimizer_extra.state", state, "parameter name -> its optimizer state")
    try:
        parse_rng_state(meta["rng"])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path!r}: {META_FILE} field 'rng' is not an RNG state: {exc}") from None
    for field, types in _OPTIONAL_META_FIELDS.items():
        if field in meta and not isinstance(meta[field], types):
            raise bad(field, meta[field], " or ".join(t.__name__ for t in types))
    if not all(isinstance(v, str) for v in (meta.get("files") or {}).values()):
        raise bad("files", meta["files"], "file name -> sha256")
    if "hf" in meta:
        for field, types in _HF_FIELDS.items():
            if not isinstance(meta["hf"].get(field), types):
                raise bad(f"hf.{field}", meta["hf"].get(field), " or ".join(t.__name__ for t in types))


def check_tensors(path: str, saved: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: Any) -> None:
    """shardfx.json's tensors are the ones DCP's .metadata holds (shape and dtype), and each chunk's bytes
    lie inside its data file: nothing is allocated for a size no file can hold."""
    held = metadata.state_dict_metadata
    unlisted = sorted(set(held) - set(saved))
    if unlisted:  # a tensor left out of the load would keep whatever value the engine had
        raise CheckpointError(f"checkpoint {path!r}: .metadata holds {unlisted[:5]}, which {META_FILE} does not list")
    for key, (shape, dtype) in saved.items():
        entry = held.get(key)
        if entry is None:
            raise CheckpointError(f"checkpoint {path!r}: {META_FILE} lists {key}, which .metadata does not hold")
        if tuple(entry.size) != shape or entry.properties.dtype != dtype:
            raise CheckpointError(
                f"checkpoint {path!r}: {key} is {list(shape)} {dtype} in {META_FILE} but "
                f"{list(entry.size)} {entry.properties.dtype} in .metadata"
            )
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        entry = held.get(index.fqn)
        if entry is None:
            raise CheckpointError(f"checkpoint {path!r}: .metadata stores {index.fqn!r}, which it does not declare")
        chunk = next((c for c in entry.chunks if tuple(c.offsets) == tuple(index.offset or ())), None)
        file = os.path.join(path, str(info.relative_path))
        if info.relative_path not in sizes:
            sizes[info.relative_path] = os.path.getsize(file) if os.path.isfile(file) else -1
        nbytes = 0 if chunk is None else math.prod(chunk.sizes) * entry.properties.dtype.itemsize
        if info.offset < 0 or info.length < nbytes or info.offset + info.length > sizes[info.relative_path]:
            raise CheckpointError(
                f"checkpoint {path!r}: .metadata puts {index.fqn} ({nbytes} bytes) at bytes "
                f"{info.offset}..{info.offset + info.length} of {info.relative_path}, which has "
                f"{max(sizes[info.relative_path], 0)}"
            )


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
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    file = os.path.join(path, ".metadata")
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path!r} has no .metadata (not a complete checkpoint)") from None
    except Exception as exc:  # noqa: BLE001 - any malformed or hostile pickle: one clear line
        reason = " ".join(str(exc).split())  # pickle's own messages can span lines
        raise CheckpointError(f"checkpoint {path!r}: .metadata refused: {reason}") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint {path!r}: .metadata holds a {type(metadata).__name__}, not DCP metadata")
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        raise CheckpointError(f"checkpoint {path!r}: .metadata is malformed: its state_dict_metadata is not a dict")
    for key, entry in entries.items():
        if isinstance(entry, BytesStorageMetadata):
            raise CheckpointError(
                f"checkpoint {path!r}: .metadata declares {key!r} as {type(entry).__name__} (bytes); shardfx writes "
                "only tensors and reads no pickled objects"
            )
        problem = _tensor_entry_problem(key, entry)
        if problem:
            raise CheckpointError(f"checkpoint {path!r}: .metadata is malformed: {problem}")
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise CheckpointError(f"checkpoint {path!r}: .metadata is malformed: its storage_data is not a dict")
    for index, info in storage.items():
        problem = _storage_problem(index, info)
        if problem:
            raise CheckpointError(f"checkpoint {path!r}: .metadata is malformed: {problem}")
    return metadata


def _sizes(value: Any) -> bool:
    return isinstance(value, torch.Size) and all(isinstance(d, int) and d >= 0 for d in value)


def _tensor_entry_problem(key: Any, entry: Any) -> str:
    """What is wrong with one of .metadata's tensor entries, as the unpickler built it ('' when nothing):
    the unpickler builds DCP's classes with whatever fields the bytes give them."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata

    if not isinstance(key, str) or not isinstance(entry, TensorStorageMetadata):
        return f"entry {key!r} is a {type(entry).__name__}, not a tensor"
    dtype = getattr(getattr(entry, "properties", None), "dtype", None)
    chunks = getattr(entry, "chunks", None)
    if not _sizes(getattr(entry, "size", None)) or not isinstance(dtype, torch.dtype) or not isinstance(chunks, list):
        return f"entry {key!r} has no size, dtype or chunk list"
    for chunk in chunks:
        if not (
            isinstance(chunk, ChunkStorageMetadata)
            and _sizes(getattr(chunk, "offsets", None))
            and _sizes(getattr(chunk, "sizes", None))
            and len(chunk.offsets) == len(chunk.sizes) == len(entry.size)
            and all(o + n <= d for o, n, d in zip(chunk.offsets, chunk.sizes, entry.size))
        ):
            return f"entry {key!r} has a chunk outside its size {list(entry.size)}"
    return ""


def _storage_problem(index: Any, info: Any) -> str:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    if not isinstance(index, MetadataIndex) or not isinstance(getattr(index, "fqn", None), str):
        return f"a storage key is a {type(index).__name__}, not a tensor index"
    if not isinstance(info, _StorageInfo):
        return f"{index.fqn!r} is stored in a {type(info).__name__}"
    name, offset, length = (getattr(info, f, None) for f in ("relative_path", "offset", "length"))
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
        return f"{index.fqn!r} is stored in {name!r}, not a file of the checkpoint folder"
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
        return f"{index.fqn!r} is stored at offset {offset!r}, length {length!r}"
    if index.offset is not None and not _sizes(index.offset):
        return f"{index.fqn!r} has a chunk offset {index.offset!r}"
    return ""
