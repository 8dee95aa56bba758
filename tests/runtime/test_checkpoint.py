"""Checkpoints: bitwise resume, resharding across world sizes and ZeRO stages, atomic writes."""

from __future__ import annotations

import json
import math
import os
import pickle
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shardfx
from shardfx.errors import CheckpointError
from shardfx.runtime import checkpoint

# 7 and 5 rows do not divide by 2 or 4: every shard layout has padding.
DIMS = (6, 7, 5, 3)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(DIMS[0], DIMS[1]),
        nn.Tanh(),
        nn.Linear(DIMS[1], DIMS[2]),
        nn.LayerNorm(DIMS[2]),
        nn.Linear(DIMS[2], DIMS[3]),
    )


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, DIMS[0], generator=g), torch.randn(8, DIMS[3], generator=g)) for _ in range(n)]


def engine_for(world_size: int, zero_stage: int, model: nn.Module | None = None, **config) -> shardfx.Engine:
    return shardfx.compile_distributed(
        model or make_model(),
        world_size,
        example_inputs=batches(1)[0],
        loss_fn=F.mse_loss,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        config=shardfx.Config(zero_stage=zero_stage, **config),
    )


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_resume_is_bitwise(zero_stage: int, tmp_path) -> None:
    data = batches(6)
    straight = engine_for(2, zero_stage)
    losses = [straight.train_step(*b) for b in data]

    first = engine_for(2, zero_stage)
    resumed = [first.train_step(*b) for b in data[:3]]
    first.save_checkpoint(str(tmp_path / "ckpt"), client_state={"batch": 3})
    second = engine_for(2, zero_stage)
    assert second.load_checkpoint(str(tmp_path / "ckpt")) == {"batch": 3}
    assert second.steps == 3 and second.get_lr() == first.get_lr()
    resumed += [second.train_step(*b) for b in data[3:]]

    assert torch.equal(torch.stack(losses), torch.stack(resumed))
    for key, value in straight.state_dict().items():
        assert torch.equal(second.state_dict()[key], value), key


def test_reshard_to_other_world_sizes_and_stages(tmp_path) -> None:
    data = batches(4)
    saved = engine_for(4, 3)
    for b in data[:2]:
        saved.train_step(*b)
    saved.save_checkpoint(str(tmp_path / "ckpt"))
    weights = saved.state_dict()
    reference = [saved.train_step(*b) for b in data[2:]]
    for world_size, stage in [(2, 1), (1, 0), (2, 3)]:
        loaded = engine_for(world_size, stage)
        loaded.load_checkpoint(str(tmp_path / "ckpt"))
        for key, value in weights.items():
            assert torch.equal(loaded.state_dict()[key], value), (world_size, stage, key)
        # Optimizer state moved too: training continues as it would have (up to reduction order).
        losses = [loaded.train_step(*b) for b in data[2:]]
        torch.testing.assert_close(torch.stack(losses), torch.stack(reference), rtol=1e-5, atol=1e-6)


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "ckpt")
    engine = engine_for(2, 3)
    engine.train_step(*batches(1)[0])
    engine.save_checkpoint(path)
    weights = engine.state_dict()
    engine.train_step(*batches(2)[1])

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated, in the middle of writing)")

    real_save = checkpoint.dcp.save

    def half_then_crash(tensors, **kwargs):
        real_save({k: v for k, v in list(tensors.items())[:2]}, **kwargs)  # some files are written
        crash()

    monkeypatch.setattr(checkpoint.dcp, "save", half_then_crash)
    with pytest.raises(OSError, match="simulated"):
        engine.save_checkpoint(path)
    monkeypatch.undo()
    fresh = engine_for(2, 3)
    fresh.load_checkpoint(path)
    assert fresh.steps == 1
    for key, value in weights.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # The next save cleans the leftover temporary folder and replaces the checkpoint.
    engine.save_checkpoint(path)
    assert not os.path.exists(path + ".tmp") and checkpoint.read_meta(path)["steps"] == 2


def test_loading_refuses_what_is_not_a_checkpoint(tmp_path) -> None:
    engine = engine_for(1, 0)
    with pytest.raises(ValueError, match="does not exist"):
        engine.load_checkpoint(str(tmp_path / "nothing"))
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        engine.load_checkpoint(str(tmp_path / "half"))
    other = shardfx.compile_distributed(
        nn.Linear(DIMS[0], DIMS[3]), 1, example_inputs=batches(1)[0], loss_fn=F.mse_loss, optimizer=None
    )
    other.save_checkpoint(str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"parameters do not match the model: missing \['0.bias'"):
        engine.load_checkpoint(str(tmp_path / "other"))


def test_metadata_is_json_and_the_pickle_reader_is_restricted(tmp_path) -> None:
    engine = engine_for(2, 1)
    engine.train_step(*batches(1)[0])
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    meta = json.loads((tmp_path / "ckpt" / "shardfx.json").read_text())
    assert meta["steps"] == 1 and meta["tensors"]["optim/0.weight/exp_avg"]["shape"] == [DIMS[1], DIMS[0]]

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    with open(tmp_path / "ckpt" / ".metadata", "wb") as f:
        pickle.dump(Evil(), f)
    del meta["files"]  # as an older shardfx wrote it (no checksums): the restricted reader is what stops Evil
    (tmp_path / "ckpt" / "shardfx.json").write_text(json.dumps(meta))
    # a shardfx error (a ValueError) in one line, not DCP's CheckpointException (a BaseException)
    with pytest.raises(CheckpointError, match="system, which a checkpoint never holds"):
        engine.load_checkpoint(str(tmp_path / "ckpt"))


def gpt_engine(world_size: int, **config) -> shardfx.Engine:
    from shardfx.models import gpt_loss
    from tests.fixtures import gpt_batch, tiny_gpt

    return shardfx.compile_distributed(
        tiny_gpt(),
        world_size,
        example_inputs=gpt_batch(8),
        loss_fn=gpt_loss,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        config=shardfx.Config(**config),
    )


def test_tensor_parallel_checkpoints_reshard_to_any_mesh(tmp_path) -> None:
    """tp=2 x ZeRO-3 dp=2 (the fused qkv weight split in blocks) saves full logical tensors; every mesh loads them."""
    from tests.fixtures import gpt_batch

    batch = gpt_batch(8)
    saved = gpt_engine(4, tp_size=2, zero_stage=3)
    for _ in range(2):
        saved.train_step(*batch)
    saved.save_checkpoint(str(tmp_path / "ckpt"))
    weights = saved.state_dict()
    reference = saved.train_step(*batch)
    for world_size, config in [(4, {"tp_size": 2, "zero_stage": 3}), (2, {"zero_stage": 1}), (2, {"tp_size": 2})]:
        loaded = gpt_engine(world_size, **config)
        loaded.load_checkpoint(str(tmp_path / "ckpt"))
        for key, value in weights.items():
            assert torch.equal(loaded.state_dict()[key], value), (config, key)
        torch.testing.assert_close(loaded.train_step(*batch), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "specs",
    [
        [(2, 1, 0)],  # ZeRO alone, padded (7 rows over 2)
        [(2, 3, 0), (2, 1, 0)],  # tp over 3 fused blocks, then ZeRO on the same dim
        [(2, 3, 0), (3, 1, 0)],  # ... ZeRO cutting across block pieces
        [(2, 3, 0), (4, 1, 0)],  # ... and padding (9 rows of the tp slice over 4 ranks)
        [(2, 1, 1), (2, 1, 0)],  # tp on dim 1, ZeRO on dim 0
    ],
)
def test_pieces_cover_each_ranks_shard_exactly(specs) -> None:
    """Every box a rank declares is the part of the global tensor its padded local shard holds there."""
    from shardfx.graphs.placement import ShardSpec, local_shard
    from shardfx.graphs.program import Mesh
    from shardfx.runtime.checkpoint_layout import _boxes

    full_shape = (18, 4) if specs[0][1] == 3 else (7, 6)
    axes = ["tp", "dp"][-len(specs) :] if len(specs) == 1 else ["tp", "dp"]
    mesh = Mesh.of(**{axis: world for axis, (world, _, _) in zip(reversed(axes), reversed(specs))})
    shape = full_shape
    built = []
    for axis, (world, blocks, dim) in zip(axes, specs):
        spec = ShardSpec(axis=axis, dim=dim, world=world, full_shape=shape, blocks=blocks)
        built.append(spec)
        shape = spec.shard_shape

    class Program:
        def __init__(self) -> None:
            self.mesh = mesh

        def specs(self, name: str) -> list[ShardSpec]:
            return built

    index = torch.arange(1, 1 + math.prod(full_shape)).reshape(full_shape)  # 0 marks padding
    for rank in range(mesh.world_size):
        local = local_shard(index, built, mesh.coords(rank))
        boxes = _boxes(Program(), "w", rank)
        covered = 0
        for offsets, slices in boxes:
            piece = local[slices]
            region = index[tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape))]
            assert torch.equal(piece, region), (rank, offsets)
            covered += piece.numel()
        assert covered == int((local > 0).sum()), rank


@pytest.mark.parametrize("kill_at", range(1, 6))
def test_a_save_killed_at_any_step_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, kill_at: int) -> None:
    """The save's file-system steps after writing (remove a stale .old, move the old checkpoint aside,
    rename the new one in, remove .old): killed before the k-th, `path` still loads a complete checkpoint,
    the old or the new, and the next save succeeds."""
    path = str(tmp_path / "ckpt")
    engine = engine_for(2, 1)
    engine.train_step(*batches(1)[0])
    engine.save_checkpoint(path)
    old = engine.state_dict()
    engine.train_step(*batches(2)[1])
    new = engine.state_dict()
    calls = {"n": 0}
    real_rename, real_rmtree = checkpoint.os.rename, checkpoint.shutil.rmtree

    def killed(real):  # type: ignore[no-untyped-def]
        def step(*args, **kwargs):  # type: ignore[no-untyped-def]
            if sys._getframe(1).f_code.co_filename != checkpoint.__file__:  # DCP's own renames: not a step
                return real(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == kill_at:
                raise KeyboardInterrupt(f"killed before file-system step {kill_at}")
            return real(*args, **kwargs)

        return step

    monkeypatch.setattr(checkpoint.os, "rename", killed(real_rename))
    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed(real_rmtree))
    try:
        engine.save_checkpoint(path)
        finished = True
    except KeyboardInterrupt:
        finished = False
    monkeypatch.undo()
    assert not finished or kill_at > calls["n"]
    fresh = engine_for(2, 1)
    fresh.load_checkpoint(path)
    expected = new if fresh.steps == 2 else old
    assert fresh.steps in (1, 2)
    for key, value in expected.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    engine.save_checkpoint(path)  # and the next save works from whatever was left
    assert checkpoint.read_meta(path)["steps"] == 2 and not os.path.exists(path + ".tmp")
