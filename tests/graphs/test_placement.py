"""ShardSpec round trips (hypothesis): shard then unshard gives the tensor back, for random shapes,
dims, world sizes and uneven sizes; blocked specs (fused q|k|v) and tp-then-ZeRO compositions too."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfx.graphs.placement import ShardSpec, local_shard
from shardfx.graphs.program import Mesh
from shardfx.runtime.state import unshard

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4)


@st.composite
def plain_case(draw):  # type: ignore[no-untyped-def]
    shape = tuple(draw(shapes))
    dim = draw(st.integers(0, len(shape) - 1))
    world = draw(st.integers(1, 7))
    return ShardSpec("dp", dim, world, shape), torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)


@settings(max_examples=200, deadline=None)
@given(plain_case())
def test_shard_then_unshard_is_the_identity(case) -> None:  # type: ignore[no-untyped-def]
    spec, full = case
    shards = [spec.shard(full, r) for r in range(spec.world)]
    assert all(tuple(s.shape) == spec.shard_shape for s in shards)  # every rank the same shape: padded
    assert torch.equal(spec.unshard(shards), full)
    # padding is zeros, and only the last rows of the gathered tensor
    gathered = torch.cat(shards, dim=spec.dim)
    assert gathered.shape[spec.dim] == spec.padded_size == spec.shard_size * spec.world
    tail = gathered.narrow(spec.dim, spec.full_shape[spec.dim], spec.padding)
    assert torch.count_nonzero(tail) == 0


@st.composite
def blocked_case(draw):  # type: ignore[no-untyped-def]
    world = draw(st.integers(1, 4))
    blocks = draw(st.integers(2, 4))
    per_rank = draw(st.integers(1, 3))
    other = draw(st.integers(1, 5))
    dim = draw(st.integers(0, 1))
    shape = [other, other]
    shape[dim] = blocks * world * per_rank  # blocked specs split each block evenly (no padding)
    full = torch.randn(shape)
    return ShardSpec("tp", dim, world, tuple(shape), blocks=blocks), full


@settings(max_examples=100, deadline=None)
@given(blocked_case())
def test_blocked_shards_hold_a_slice_of_every_block(case) -> None:  # type: ignore[no-untyped-def]
    spec, full = case
    shards = [spec.shard(full, r) for r in range(spec.world)]
    assert torch.equal(spec.unshard(shards), full)
    block = spec.full_shape[spec.dim] // spec.blocks
    piece = block // spec.world
    for r, shard in enumerate(shards):  # rank r holds rows [r*piece, (r+1)*piece) of each block
        for b in range(spec.blocks):
            want = full.narrow(spec.dim, b * block + r * piece, piece)
            assert torch.equal(shard.narrow(spec.dim, b * piece, piece), want)


@st.composite
def mesh_case(draw):  # type: ignore[no-untyped-def]
    dp, tp = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 8), min_size=1, max_size=3)))
    tp_dim = draw(st.integers(0, len(shape) - 1))
    tp_spec = ShardSpec("tp", tp_dim, tp, shape)
    zero_dim = draw(st.integers(0, len(shape) - 1))
    zero_spec = ShardSpec("dp", zero_dim, dp, tp_spec.shard_shape)  # ZeRO on the tp slice
    return Mesh.of(dp=dp, tp=tp), [tp_spec, zero_spec], torch.randn(shape)


@settings(max_examples=100, deadline=None)
@given(mesh_case())
def test_tp_then_zero_round_trips_on_a_2d_mesh(case) -> None:  # type: ignore[no-untyped-def]
    mesh, specs, full = case

    class Program:  # what runtime.state.unshard reads of a DistProgram
        tp_specs = {"w": specs[0]}
        shard_specs = {"w": specs[1]}

    Program.mesh = mesh  # type: ignore[attr-defined]
    pieces = {r: local_shard(full, specs, mesh.coords(r)) for r in range(mesh.world_size)}
    for rank in range(mesh.world_size):
        assert torch.equal(unshard(Program, "w", rank, lambda r: pieces[r]), full)  # type: ignore[arg-type]
