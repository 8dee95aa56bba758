"""Random bytes in checkpoint files: overwritten, flipped, truncated, appended, cut out, at random offsets
of a random file (shardfx.json and DCP's .metadata included), and random values planted in shardfx.json.
Loading (engine.load_checkpoint, and consolidate as `shardfx export` does) either raises a one-line
CheckpointError or loads exactly what was saved: tensors, optimizer state, counters, RNG and client
state. A second run re-records the checksums as an attacker would, so the parsers behind them are
fuzzed too: they may load what the attacker wrote, but raise nothing but a one-line CheckpointError.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, note
from hypothesis import strategies as st

import shardfx
from shardfx.errors import CheckpointError
from shardfx.runtime import checkpoint
from tests.fuzz.util import check_error, fuzz, no_hang

CLIENT_STATE = {"epoch": 3, "note": "fuzz", "losses": [1.5, 0.25]}


def make_engine() -> shardfx.Engine:
    torch.manual_seed(0)
    return shardfx.compile_distributed(
        nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)),
        2,
        example_inputs=(torch.randn(4, 4), torch.randn(4, 2)),
        loss_fn=F.mse_loss,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=0.1),
        config=shardfx.Config(zero_stage=1),  # optimizer state sharded: the checkpoint reshards it
    )


def snapshot(engine: shardfx.Engine) -> dict[str, Any]:
    """Everything a load restores, comparable with ==/torch.equal."""
    optimizers = []
    for _, state in engine.runtime.held_states():
        sd = copy.deepcopy(state.optimizer.state_dict())  # its tensors are the live ones, stepped in place
        optimizers.append((sd["param_groups"], {i: dict(s) for i, s in sd["state"].items()}))
    return {
        "model": {k: v.clone() for k, v in engine.state_dict().items()},
        "optim": optimizers,
        "counters": (engine.steps, engine.micro_steps, engine.samples, engine.skipped_steps),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }


def assert_same(got: Any, want: Any, where: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got, key=str) == sorted(want, key=str), where
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


class Saved:
    """One saved checkpoint, what loading it restores, and an engine to load into."""

    def __init__(self, root: Path) -> None:
        self.root = root
        trainer = make_engine()
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            trainer.train_step(torch.randn(4, 4, generator=g), torch.randn(4, 2, generator=g))
        self.path = root / "ckpt"
        trainer.save_checkpoint(str(self.path), client_state=CLIENT_STATE)
        self.engine = make_engine()
        self.consolidated = checkpoint.consolidate(str(self.path))
        assert self.engine.load_checkpoint(str(self.path)) == CLIENT_STATE
        self.expected = snapshot(self.engine)
        self.files = sorted(os.listdir(self.path))
        self.count = 0

    def copy(self) -> Path:
        self.count += 1
        target = self.root / f"case{self.count}"
        shutil.copytree(self.path, target)
        return target

    def disturb(self) -> None:
        """Move the engine, its counters and the RNG away from the checkpoint, so a load that leaves
        anything out cannot pass for one that restored it."""
        g = torch.Generator().manual_seed(self.count)
        self.engine.train_step(torch.randn(4, 4, generator=g), torch.randn(4, 2, generator=g))
        torch.manual_seed(self.count)
        random.seed(self.count)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return Saved(tmp_path_factory.mktemp("fuzz_ckpt"))


def rehash(path: Path) -> None:
    """Re-record every checksum in shardfx.json (the files' and its own), as an attacker would."""
    meta = json.loads((path / checkpoint.META_FILE).read_text())
    files = {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in path.iterdir() if f.name != checkpoint.META_FILE
    }
    meta["files"] = files
    meta["files"][checkpoint.META_FILE] = checkpoint.meta_digest(meta)
    (path / checkpoint.META_FILE).write_text(json.dumps(meta))


# --- mutations -----------------------------------------------------------------------------------------


@st.composite
def byte_edit(draw: st.DrawFn, size: int) -> tuple[str, int, bytes]:
    """(operation, offset, bytes): overwrite, flip a bit, truncate, append, insert or cut out."""
    op = draw(st.sampled_from(["overwrite", "flip", "truncate", "append", "insert", "cut"]))
    offset = draw(st.integers(0, max(0, size - 1)))
    data = draw(st.binary(min_size=1, max_size=16))
    return op, offset, data


def apply_edit(file: Path, edit: tuple[str, int, bytes]) -> None:
    op, offset, data = edit
    raw = bytearray(file.read_bytes())
    if op == "overwrite":
        raw[offset : offset + len(data)] = data[: max(0, len(raw) - offset)] or data
    elif op == "flip":
        raw[offset] ^= 1 << (data[0] % 8)
    elif op == "truncate":
        del raw[offset:]
    elif op == "append":
        raw += data
    elif op == "insert":
        raw[offset:offset] = data
    else:
        del raw[offset : offset + len(data)]
    file.write_bytes(bytes(raw))


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", "torch.float64", "torch.int8", "torch.Size", "model/0.weight", "0.weight", "../x", "\x00"])
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def paths_in(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON value (dict keys, list indices), the value's own () first."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths_in(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):  # the RNG's 625 numbers: a few are enough
            out += paths_in(v, (*prefix, i))
    return out


@st.composite
def json_edit(draw: st.DrawFn, meta: dict[str, Any]) -> dict[str, Any]:
    """shardfx.json with one value replaced, one key removed or one key added (the checksums untouched)."""
    meta = json.loads(json.dumps(meta))
    path = draw(st.sampled_from([p for p in paths_in(meta) if p]))
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    op = draw(st.sampled_from(["replace", "replace", "remove", "add"]))
    note(f"{op} at {list(path)}")
    if op == "remove":
        parent.pop(path[-1]) if isinstance(parent, dict) else parent.pop(path[-1])
    elif op == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=6))] = draw(JSON_VALUES)
    else:
        parent[path[-1]] = draw(JSON_VALUES)
    return meta


# --- the checks ------------------------------------------------------------------------------------------


def load_every_way(saved: Saved, path: Path, *, same: bool) -> None:
    """Each way a checkpoint is read either refuses it in one line or, when `same`, restores exactly what
    was saved (with re-recorded checksums, what was loaded is the attacker's, not checked)."""
    saved.disturb()
    with no_hang(30):
        try:
            client = saved.engine.load_checkpoint(str(path))
        except Exception as exc:  # noqa: BLE001 - checked to be an allowed one-line error
            check_error(exc)
            assert isinstance(exc, CheckpointError), f"{type(exc).__name__}, not a CheckpointError: {exc}"
            # a refused load may have changed the engine, but the next good one restores all of it
            saved.engine.load_checkpoint(str(saved.path))
            assert_same(snapshot(saved.engine), saved.expected, "a good load after a refused one")
        else:
            if same:
                assert client == CLIENT_STATE
                assert_same(snapshot(saved.engine), saved.expected, "load_checkpoint")
            else:  # the attacker's values (a learning rate of 1e30...): not the next example's starting point
                saved.engine.load_checkpoint(str(saved.path))
        try:
            values = checkpoint.consolidate(str(path))
        except Exception as exc:  # noqa: BLE001 - as above
            check_error(exc)
            assert isinstance(exc, CheckpointError), f"{type(exc).__name__}, not a CheckpointError: {exc}"
        else:
            if same:
                assert_same(values, saved.consolidated, "consolidate")


def mutate(saved: Saved, data: st.DataObject, kind: str) -> Path:
    """A copy of the checkpoint with one random change: bytes in a random file, or one value of shardfx.json;
    "...+rehash": with every checksum re-recorded."""
    path = saved.copy()
    name = checkpoint.META_FILE
    if kind.startswith("bytes"):
        name = data.draw(st.sampled_from(saved.files), label="file")
        apply_edit(path / name, data.draw(byte_edit((path / name).stat().st_size), label="edit"))
    else:
        meta = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps(data.draw(json_edit(meta), label="meta")))
    if kind.endswith("+rehash") and not (kind.startswith("bytes") and name == checkpoint.META_FILE):
        rehash(path)  # (bytes in shardfx.json itself: not JSON any more, or a change its own digest catches)
    return path


KINDS = ["bytes", "bytes+rehash", "json", "json+rehash"]


def fuzz_case(saved: Saved, data: st.DataObject, kind: str) -> None:
    path = mutate(saved, data, kind)
    load_every_way(saved, path, same=not kind.endswith("+rehash"))
    shutil.rmtree(path)


@pytest.mark.parametrize("kind", KINDS)
@fuzz(max_examples=40, deadline_ms=20_000)
@given(data=st.data())
def test_a_changed_checkpoint_is_refused_in_one_line_or_loads_what_was_saved(
    saved: Saved, kind: str, data: st.DataObject
) -> None:
    fuzz_case(saved, data, kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@fuzz(max_examples=400, deadline_ms=20_000)
@given(data=st.data())
def test_many_changed_checkpoints(saved: Saved, kind: str, data: st.DataObject) -> None:
    fuzz_case(saved, data, kind)


# --- each defect the fuzzing found, as a plain regression test -------------------------------------------


def _edit_meta(saved: Saved, change: Any, *, record: bool = True) -> Path:
    """A copy whose shardfx.json `change(meta)` edits; with `record`, its own digest re-recorded."""
    path = saved.copy()
    meta = json.loads((path / checkpoint.META_FILE).read_text())
    change(meta)
    if record:
        meta["files"][checkpoint.META_FILE] = checkpoint.meta_digest(meta)
    (path / checkpoint.META_FILE).write_text(json.dumps(meta))
    return path


def _refused(saved: Saved, path: Path, match: str, *, consolidate: bool = True) -> None:
    """Both ways of reading refuse `path` with one CheckpointError line (consolidate reads no optimizer
    state: `consolidate=False` where only that is wrong), and the engine keeps its weights."""
    saved.disturb()
    before = {k: v.clone() for k, v in saved.engine.state_dict().items()}
    ways = [lambda: saved.engine.load_checkpoint(str(path))] + (
        [lambda: checkpoint.consolidate(str(path))] * consolidate
    )
    for load in ways:
        with pytest.raises(CheckpointError, match=match) as info:
            load()
        assert "\n" not in str(info.value)
    assert_same(saved.engine.state_dict(), before, "nothing loaded")


def test_a_changed_value_in_shardfx_json_is_corruption(saved: Saved) -> None:
    """Was loaded silently: shardfx.json had no checksum, so a flipped digit changed the step, the RNG or the
    client state (the fuzzer's first finding: a flip at byte 207)."""
    path = _edit_meta(saved, lambda m: m.update(steps=3), record=False)
    _refused(saved, path, r"shardfx.json is corrupt \(its content differs from the sha256 it records\)")


def test_whitespace_in_shardfx_json_is_not_corruption(saved: Saved) -> None:
    path = saved.copy()
    (path / checkpoint.META_FILE).write_text(" \n" + (path / checkpoint.META_FILE).read_text() + "\n\n")
    saved.disturb()
    assert saved.engine.load_checkpoint(str(path)) == CLIENT_STATE
    assert_same(snapshot(saved.engine), saved.expected, "load_checkpoint")


@pytest.mark.parametrize(
    "rng, match",
    [
        ({"python": [3, [1, 2], None], "torch": None}, "is not an RNG state: the RNG state's 'torch' is not base64"),
        (
            {"torch": "AAAA", "python": None},
            "is not an RNG state: the RNG state's 'torch' is not torch's CPU generator",
        ),
        (None, "is None; expected dict"),
        ("keep torch", "is not an RNG state: the RNG state's 'python' is not Python's random state: state vector"),
    ],
)
def test_a_malformed_rng_state_is_refused_before_any_tensor_is_loaded(saved: Saved, rng: Any, match: str) -> None:
    """Was KeyError, binascii.Error, TypeError, ValueError or torch's RuntimeError from set_rng_state, raised
    after the weights had been loaded."""

    def change(meta: dict[str, Any]) -> None:
        meta["rng"] = {"torch": meta["rng"]["torch"], "python": [3, [1, 2], None]} if rng == "keep torch" else rng

    _refused(saved, _edit_meta(saved, change), "field 'rng' " + match)


def test_a_tensor_left_out_of_shardfx_json_is_refused(saved: Saved) -> None:
    """Was loaded without it: the optimizer kept the engine's own exp_avg (or had none: KeyError at the next step)."""
    path = _edit_meta(saved, lambda m: m["tensors"].pop("optim/0.weight/exp_avg"))
    _refused(saved, path, r"\.metadata holds \['optim/0.weight/exp_avg'\], which shardfx.json does not list")


def test_a_dtype_or_shape_that_disagrees_with_dcp_metadata_is_refused(saved: Saved) -> None:
    """Was a float16 step counter loaded silently (a flipped bit in 'torch.float32'); a huge shape was allocated
    (torch.empty) before any file was checked."""
    path = _edit_meta(saved, lambda m: m["tensors"]["optim/0.weight/step"].update(dtype="torch.float16"))
    _refused(saved, path, r"optim/0.weight/step is \[\] torch.float16 in shardfx.json but \[\] torch.float32")
    path = _edit_meta(saved, lambda m: m["tensors"]["optim/2.bias/exp_avg"].update(shape=[10**12]))
    _refused(saved, path, r"optim/2.bias/exp_avg is \[1000000000000\] torch.float32 in shardfx.json but \[2\]")


def test_an_optimizer_setting_of_another_type_is_refused(saved: Saved) -> None:
    """Was loaded; the next train_step failed inside torch.optim (TypeError, or AssertionError 'Expected lr to be a
    float')."""
    path = _edit_meta(saved, lambda m: m["optimizer_extra"]["groups"][0].update(lr={"x": 1}))
    _refused(
        saved,
        path,
        r"optimizer param group 0 has lr=\{'x': 1\}; this optimizer's is 0.1 \(a float\)",
        consolidate=False,
    )


def test_an_optimizer_setting_this_optimizer_does_not_have_is_ignored(saved: Saved) -> None:
    """Was added to the param group, where it outlived every later load."""
    path = _edit_meta(saved, lambda m: m["optimizer_extra"]["groups"][0].update({"": 5}))
    saved.disturb()
    saved.engine.load_checkpoint(str(path))
    assert_same(snapshot(saved.engine), saved.expected, "load_checkpoint")


def test_dcp_metadata_that_points_outside_the_folder_is_refused(saved: Saved) -> None:
    """Found reading the loader, not by the fuzzer: .metadata's file names were joined to the folder unchecked."""
    import pickle

    path = saved.copy()
    with open(path / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # the test's own, trusted checkpoint
    index = next(iter(metadata.storage_data))
    metadata.storage_data[index].relative_path = "../ckpt/__0_0.distcp"
    with open(path / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    rehash(path)
    _refused(saved, path, r"is stored in '\.\./ckpt/__0_0\.distcp', not a file of the checkpoint folder")


def test_a_pickle_error_of_several_lines_is_one_line(saved: Saved) -> None:
    """Was two lines: a bit flipped into pickle's PERSID opcode ('A load persistent id instruction was encountered,
    <newline> but no persistent_load function was specified.'), found by the slow run (flip at byte 420)."""
    path = saved.copy()
    (path / ".metadata").write_bytes(b"\x80\x04Pabc\n.")  # PERSID 'abc'
    rehash(path)
    _refused(saved, path, r"\.metadata refused: A load persistent id instruction was encountered, but no persistent")
