"""The local backend: results, and clear errors (never a hang) when ranks disagree or fail."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from shardfx import CollectiveError
from shardfx.graphs.program import Mesh
from shardfx.runtime.local_comm import LocalWorld


def run_ranks(world: LocalWorld, fns):
    results, errors = {}, {}

    def target(rank):
        try:
            results[rank] = fns[rank](world.comm(rank))
        except BaseException as exc:  # noqa: BLE001
            errors[rank] = exc
            world.abort(rank, exc)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "a rank hung"
    return results, errors


def test_collectives_compute_the_right_values() -> None:
    world = LocalWorld(Mesh.of(dp=3))
    xs = [torch.arange(6, dtype=torch.float32) * (r + 1) for r in range(3)]
    res, err = run_ranks(
        world,
        [
            lambda c, r=r: (
                c.all_reduce(xs[r], "dp", "avg"),
                c.all_gather(xs[r][:2], "dp", 0),
                c.reduce_scatter(xs[r], "dp", "sum", 0),
            )
            for r in range(3)
        ],
    )
    assert not err
    total = sum(xs)
    for r in range(3):
        torch.testing.assert_close(res[r][0], total / 3)
        torch.testing.assert_close(res[r][1], torch.cat([x[:2] for x in xs]))
        torch.testing.assert_close(res[r][2], total[2 * r : 2 * r + 2])


def test_mismatched_collective_names_both_ranks_and_nodes() -> None:
    world = LocalWorld(Mesh.of(dp=2), timeout=20)
    x = torch.zeros(4)
    start = time.monotonic()
    _, err = run_ranks(
        world,
        [
            lambda c: c.all_gather(x, "dp", 0, where="node all_gather_3 (layers.0)"),
            lambda c: c.reduce_scatter(x, "dp", "avg", 0, where="node reduce_scatter_1 (layers.1)"),
        ],
    )
    assert time.monotonic() - start < 5
    assert set(err) == {0, 1}
    text = str(err[0])
    assert isinstance(err[0], CollectiveError)
    assert "rank 0: all_gather" in text and "all_gather_3 (layers.0)" in text
    assert "rank 1: reduce_scatter" in text and "reduce_scatter_1 (layers.1)" in text


def test_mismatched_shapes_are_named() -> None:
    world = LocalWorld(Mesh.of(dp=2), timeout=20)
    _, err = run_ranks(
        world,
        [lambda c: c.all_reduce(torch.zeros(4), "dp", "sum"), lambda c: c.all_reduce(torch.zeros(5), "dp", "sum")],
    )
    assert "shape=[4]" in str(err[0]) and "shape=[5]" in str(err[0])


def test_a_rank_that_never_arrives_times_out() -> None:
    world = LocalWorld(Mesh.of(dp=2), timeout=0.5)
    _, err = run_ranks(world, [lambda c: c.all_reduce(torch.zeros(2), "dp", "sum", where="node ar"), lambda c: None])
    assert "ranks [1]" in str(err[0]) and "never arrived" in str(err[0])


def test_a_failed_rank_aborts_the_others() -> None:
    world = LocalWorld(Mesh.of(dp=2), timeout=20)

    def boom(c):
        raise RuntimeError("out of memory on purpose")

    start = time.monotonic()
    _, err = run_ranks(world, [lambda c: c.all_reduce(torch.zeros(2), "dp", "sum"), boom])
    assert time.monotonic() - start < 5
    assert "rank 1 failed" in str(err[0]) and "out of memory on purpose" in str(err[0])


def test_mismatch_inside_a_compiled_program_names_the_graph_nodes() -> None:
    """Two ranks running different programs: the error names each rank's graph node."""
    import torch.nn as nn
    import torch.nn.functional as F

    import shardfx

    torch.manual_seed(0)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    zero0 = shardfx.compile_distributed(nn.Linear(8, 8), 2, example_inputs=(x, y), loss_fn=F.mse_loss)
    zero3 = shardfx.compile_distributed(
        nn.Linear(8, 8), 2, example_inputs=(x, y), loss_fn=F.mse_loss, config=shardfx.Config(zero_stage=3)
    )
    runtime = zero0.runtime
    from shardfx.runtime.executor import Executor

    ex0, ex3 = Executor(zero0.program), Executor(zero3.program)
    state0, state3 = runtime.states[0], zero3.runtime.states[1]
    world = LocalWorld(Mesh.of(dp=2), timeout=20)
    _, err = run_ranks(
        world,
        [
            lambda c: ex0.run(c, state0.params, state0.buffers, (x[:2], y[:2])),
            lambda c: ex3.run(c, state3.params, state3.buffers, (x[2:], y[2:])),
        ],
    )
    text = str(err[0])
    assert "rank 0: all_reduce" in text and "rank 1: all_gather" in text
    assert "node all_reduce" in text and "node all_gather" in text


@pytest.mark.parametrize("op", ["sum", "avg", "max"])
def test_single_rank_group_is_identity_like(op: str) -> None:
    world = LocalWorld(Mesh.of(dp=1))
    x = torch.randn(3)
    torch.testing.assert_close(world.comm(0).all_reduce(x, "dp", op), x)
