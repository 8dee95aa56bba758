"""Loading a checkpoint runs no code from it, ever: a corpus of crafted checkpoints.

Each case takes a real checkpoint and plants a payload whose only effect would
be to create a file (the canary). Every load must fail with a clear ValueError
and leave no canary, through load_checkpoint, shardfx export (consolidate) and
the tools that call them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shardfx
from shardfx.runtime import checkpoint


def engine() -> shardfx.Engine:
    torch.manual_seed(0)
    return shardfx.compile_distributed(
        nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)),
        1,
        example_inputs=(torch.randn(4, 4), torch.randn(4, 2)),
        loss_fn=F.mse_loss,
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
    )


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    engine().save_checkpoint(str(path))
    return path


def _str(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def call_pickle(module: str, name: str, argument: str) -> bytes:
    """A protocol-4 pickle that calls module.name(argument) when loaded (STACK_GLOBAL, TUPLE1, REDUCE)."""
    return b"\x80\x04" + _str(module) + _str(name) + b"\x93" + _str(argument) + b"\x85R."


def touch(canary: Path) -> str:
    return f"python3 -c \"open('{canary}', 'w').write('ran')\""


class _Payload:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (self.command,))


def rehash(path: Path) -> None:
    """Record the planted files' checksums in shardfx.json, as an attacker would: the guards must hold
    without the integrity check."""
    meta = json.loads((path / checkpoint.META_FILE).read_text())
    meta["files"] = {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in path.iterdir() if f.name != checkpoint.META_FILE
    }
    (path / checkpoint.META_FILE).write_text(json.dumps(meta))


def read_metadata(path: Path):  # type: ignore[no-untyped-def]
    with open(path / ".metadata", "rb") as f:
        return pickle.load(f)  # the test's own, trusted checkpoint


def load_every_way(path: Path) -> list[str]:
    """The error of each way a checkpoint is read (all must fail)."""
    errors = []
    for load in (lambda: engine().load_checkpoint(str(path)), lambda: checkpoint.consolidate(str(path))):
        with pytest.raises(ValueError) as info:
            load()
        errors.append(str(info.value))
    return errors


@pytest.mark.parametrize(
    "module, name",
    [
        ("torch.distributed.checkpoint.filesystem", "os.system"),  # a dotted name inside an allowed module
        ("torch.distributed.checkpoint.metadata", "torch.os.system"),
        ("os", "system"),
        ("builtins", "eval"),
        ("torch", "load"),
    ],
)
def test_a_metadata_pickle_naming_a_callable_runs_nothing(saved: Path, tmp_path: Path, module: str, name: str) -> None:
    canary = tmp_path / "canary"
    payload = call_pickle(module, name, touch(canary) if "system" in name else "open('x')")
    (saved / ".metadata").write_bytes(payload)
    rehash(saved)
    for error in load_every_way(saved):
        assert ".metadata refused" in error and len(error.splitlines()) == 1, error
    assert not canary.exists()


def test_a_bytes_entry_is_refused_before_any_data_is_read(saved: Path, tmp_path: Path) -> None:
    """Only DCP classes in .metadata, but one tensor declared as bytes: DCP would torch.load(weights_only=False)
    the payload file it points at."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    canary = tmp_path / "canary"
    buffer = io.BytesIO()
    torch.save(_Payload(touch(canary)), buffer)
    data = buffer.getvalue()
    (saved / "payload.distcp").write_bytes(data)
    meta = read_metadata(saved)
    key = next(k for k in meta.state_dict_metadata if k.startswith("model/"))
    meta.state_dict_metadata[key] = BytesStorageMetadata()
    meta.storage_data = {i: s for i, s in meta.storage_data.items() if i.fqn != key}
    meta.storage_data[MetadataIndex(key)] = _StorageInfo("payload.distcp", 0, len(data))
    with open(saved / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    rehash(saved)
    for error in load_every_way(saved):
        assert key in error and "bytes" in error, error
    assert not canary.exists()


def test_the_corpus_would_run_code_without_the_guards(saved: Path, tmp_path: Path) -> None:
    """The payloads are real: read by plain pickle, the first one creates its canary (so the tests above
    show the guards, not a broken payload)."""
    canary = tmp_path / "canary"
    pickle.loads(call_pickle("torch.distributed.checkpoint.filesystem", "os.system", touch(canary)))
    assert canary.exists()


def test_a_flipped_bit_is_refused_naming_the_tensors(saved: Path) -> None:
    data_file = next(f for f in saved.iterdir() if f.suffix == ".distcp")
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data_file.write_bytes(bytes(raw))
    for error in load_every_way(saved):
        assert f"{data_file.name} is corrupt" in error and "model/" in error, error


@pytest.mark.parametrize(
    "field, value",
    [("steps", "abc"), ("steps", True), ("tensors", []), ("rng", None), ("state_dict_keys", [1, 2])],
)
def test_a_malformed_shardfx_json_is_refused_naming_the_field(saved: Path, field: str, value: object) -> None:
    meta = json.loads((saved / checkpoint.META_FILE).read_text())
    meta[field] = value
    (saved / checkpoint.META_FILE).write_text(json.dumps(meta))
    for error in load_every_way(saved):
        assert f"field {field!r}" in error and len(error.splitlines()) == 1, error


def test_shardfx_json_that_is_not_json_is_one_line(saved: Path) -> None:
    (saved / checkpoint.META_FILE).write_text("{not json")
    for error in load_every_way(saved):
        assert "is not readable JSON" in error and len(error.splitlines()) == 1, error
