"""The collective ops of the IR: `torch.ops.shardfx.*`, one graph node each.

An op names a mesh axis ("dp", "tp"), never a process group, so one graph is
valid on every rank and every backend. The graph layer only defines the ops
and their fake (shape) implementations; the runtime binds a communicator to
the running thread and the real implementation forwards to it.

Volumes below use the ZeRO paper's unit (bytes of the full tensor that one
rank's collective moves): all-gather counts its output, reduce-scatter its
input, all-reduce twice its input (a reduce-scatter then an all-gather).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.fx as fx
from torch import Tensor

REDUCE_OPS = ("sum", "avg", "max")


class Communicator(Protocol):
    """What the runtime provides to run collectives for one rank."""

    def all_reduce(self, x: Tensor, axis: str, op: str) -> Tensor: ...
    def all_gather(self, x: Tensor, axis: str, dim: int) -> Tensor: ...
    def reduce_scatter(self, x: Tensor, axis: str, op: str, dim: int) -> Tensor: ...
    def axis_size(self, axis: str) -> int: ...
    def coordinate(self, axis: str) -> int: ...
    def start(self, kind: str, x: Tensor, axis: str, **kwargs: Any) -> Tensor: ...
    def wait(self, t: Tensor) -> Tensor: ...
    def send(self, x: Tensor, axis: str, peer: int, tag: int) -> None: ...
    def recv(
        self, shape: list[int], dtype: torch.dtype, device: torch.device, axis: str, peer: int, tag: int
    ) -> Tensor: ...


_bound = threading.local()


@contextmanager
def bind(comm: Communicator) -> Iterator[None]:
    """Run the collective ops of this thread on `comm`."""
    previous = getattr(_bound, "comm", None)
    _bound.comm = comm
    try:
        yield
    finally:
        _bound.comm = previous


def current() -> Communicator:
    comm = getattr(_bound, "comm", None)
    if comm is None:
        raise RuntimeError(
            "a shardfx collective ran with no communicator bound; run programs through a shardfx runtime"
        )
    return comm


def _axis_size_for_fake(axis: str) -> int:
    comm = getattr(_bound, "comm", None)
    if comm is not None:
        return comm.axis_size(axis)
    sizes = getattr(_bound, "fake_axis_sizes", None)
    if sizes is None or axis not in sizes:
        raise RuntimeError(f"shape of a collective on axis {axis!r} needs the mesh; use collectives.mesh_sizes()")
    return sizes[axis]


@contextmanager
def mesh_sizes(sizes: dict[str, int]) -> Iterator[None]:
    """Axis sizes for the fake (shape-only) implementations, while passes build graphs."""
    previous = getattr(_bound, "fake_axis_sizes", None)
    _bound.fake_axis_sizes = dict(sizes)
    try:
        yield
    finally:
        _bound.fake_axis_sizes = previous


@torch.library.custom_op("shardfx::all_reduce", mutates_args=())
def all_reduce(x: Tensor, axis: str, op: str) -> Tensor:
    return current().all_reduce(x, axis, op)


def _reduced_fake(x: Tensor, axis: str, op: str) -> Tensor:
    return torch.empty_like(x)


all_reduce.register_fake(_reduced_fake)


@torch.library.custom_op("shardfx::all_gather", mutates_args=())
def all_gather(x: Tensor, axis: str, dim: int) -> Tensor:
    return current().all_gather(x, axis, dim)


def _gathered_fake(x: Tensor, axis: str, dim: int) -> Tensor:
    shape = list(x.shape)
    shape[dim] *= _axis_size_for_fake(axis)
    return x.new_empty(shape)


all_gather.register_fake(_gathered_fake)


@torch.library.custom_op("shardfx::reduce_scatter", mutates_args=())
def reduce_scatter(x: Tensor, axis: str, op: str, dim: int) -> Tensor:
    return current().reduce_scatter(x, axis, op, dim)


def _scattered_fake(x: Tensor, axis: str, op: str, dim: int) -> Tensor:
    n = _axis_size_for_fake(axis)
    shape = list(x.shape)
    assert shape[dim] % n == 0, f"reduce_scatter of dim {dim} size {shape[dim]} over {n} ranks"
    shape[dim] //= n
    return x.new_empty(shape)


reduce_scatter.register_fake(_scattered_fake)


# Async pairs: `*_start` launches the collective and returns its output buffer, which
# must not be read before `shardfx.wait(buffer)` (an alias of it) says the data is there.
# The local backend completes at start (same semantics, no overlap); torch.distributed
# really overlaps through async work handles.


@torch.library.custom_op("shardfx::all_reduce_start", mutates_args=())
def all_reduce_start(x: Tensor, axis: str, op: str) -> Tensor:
    return current().start("all_reduce", x, axis, op=op)


all_reduce_start.register_fake(_reduced_fake)


@torch.library.custom_op("shardfx::all_gather_start", mutates_args=())
def all_gather_start(x: Tensor, axis: str, dim: int) -> Tensor:
    return current().start("all_gather", x, axis, dim=dim)


all_gather_start.register_fake(_gathered_fake)


@torch.library.custom_op("shardfx::reduce_scatter_start", mutates_args=())
def reduce_scatter_start(x: Tensor, axis: str, op: str, dim: int) -> Tensor:
    return current().start("reduce_scatter", x, axis, op=op, dim=dim)


reduce_scatter_start.register_fake(_scattered_fake)


@torch.library.custom_op("shardfx::chunk", mutates_args=())
def chunk(x: Tensor, axis: str, dim: int, blocks: int) -> Tensor:
    """This rank's slice of a replicated tensor along `dim` (per block when blocks > 1): no communication."""
    comm = current()
    n, r = comm.axis_size(axis), comm.coordinate(axis)
    parts = x.tensor_split(blocks, dim=dim)
    return torch.cat([p.tensor_split(n, dim=dim)[r] for p in parts], dim=dim).contiguous()


@chunk.register_fake
def _(x: Tensor, axis: str, dim: int, blocks: int) -> Tensor:
    shape = list(x.shape)
    shape[dim] //= _axis_size_for_fake(axis)
    return x.new_empty(shape)


@torch.library.custom_op("shardfx::local_index", mutates_args=())
def local_index(ids: Tensor, axis: str, size: int) -> Tensor:
    """Indices into this rank's rows of a tensor split in blocks of `size` rows along `axis` (a
    vocab-parallel embedding or head): ids - rank * size; outside [0, size) is another rank's row."""
    return ids - current().coordinate(axis) * size


@local_index.register_fake
def _(ids: Tensor, axis: str, size: int) -> Tensor:
    return torch.empty_like(ids)


LOCAL_INDEX = torch.ops.shardfx.local_index.default

_lib = torch.library.Library("shardfx", "FRAGMENT")
_lib.define("wait(Tensor(a) t) -> Tensor(a)")  # returns its input: an alias, so no copy


def _wait(t: Tensor) -> Tensor:
    return current().wait(t)


def _wait_fake(t: Tensor) -> Tensor:
    return t


_lib.impl("wait", _wait, "CompositeExplicitAutograd")
torch.library.register_fake("shardfx::wait", _wait_fake, lib=_lib)

WAIT = torch.ops.shardfx.wait.default

# The in-place all-reduce start, for a reduction whose input nothing else reads (a bucket's
# concatenated gradients, schedule_overlap decides): the transfer runs in the input's own storage,
# so there is no copy of it and no second buffer. It returns its input, reduced once waited for.
_lib.define("all_reduce_start_(Tensor(a!) x, str axis, str op) -> Tensor(a!)")


def _all_reduce_start_(x: Tensor, axis: str, op: str) -> Tensor:
    return current().start("all_reduce", x, axis, op=op, inplace=True)


def _all_reduce_start_fake(x: Tensor, axis: str, op: str) -> Tensor:
    return x


_lib.impl("all_reduce_start_", _all_reduce_start_, "CompositeExplicitAutograd")
torch.library.register_fake("shardfx::all_reduce_start_", _all_reduce_start_fake, lib=_lib)

ALL_REDUCE_START_ = torch.ops.shardfx.all_reduce_start_.default

# Point-to-point, between the ranks of a pipeline: `peer` is relative along `axis` (+1 the next
# stage, -1 the previous one), never a rank. `tag` names the value (and the stage it goes to): a
# receive takes the oldest message of its tag, so two stages of one rank (interleaved) can receive
# from one peer in their own orders. `send` returns nothing and is declared to write its input,
# so no dead-code elimination drops it; `recv` makes a new tensor of the given shape.
_lib.define("send(Tensor(a!) x, str axis, int peer, int tag) -> ()")
_lib.define("recv(SymInt[] shape, ScalarType dtype, Device device, str axis, int peer, int tag) -> Tensor")


def _send(x: Tensor, axis: str, peer: int, tag: int) -> None:
    current().send(x, axis, peer, tag)


def _recv(shape: list[int], dtype: torch.dtype, device: torch.device, axis: str, peer: int, tag: int) -> Tensor:
    return current().recv(list(shape), dtype, device, axis, peer, tag)


def _send_fake(x: Tensor, axis: str, peer: int, tag: int) -> None:
    return None


def _recv_fake(shape: list[int], dtype: torch.dtype, device: torch.device, axis: str, peer: int, tag: int) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


_lib.impl("send", _send, "CompositeExplicitAutograd")
_lib.impl("recv", _recv, "CompositeExplicitAutograd")
torch.library.register_fake("shardfx::send", _send_fake, lib=_lib)
torch.library.register_fake("shardfx::recv", _recv_fake, lib=_lib)

SEND = torch.ops.shardfx.send.default
RECV = torch.ops.shardfx.recv.default

OPS = {
    torch.ops.shardfx.all_reduce.default: "all_reduce",
    torch.ops.shardfx.all_gather.default: "all_gather",
    torch.ops.shardfx.reduce_scatter.default: "reduce_scatter",
    torch.ops.shardfx.all_reduce_start.default: "all_reduce",
    torch.ops.shardfx.all_gather_start.default: "all_gather",
    torch.ops.shardfx.reduce_scatter_start.default: "reduce_scatter",
    ALL_REDUCE_START_: "all_reduce",
}
START_OPS = {
    "all_reduce": torch.ops.shardfx.all_reduce_start.default,
    "all_gather": torch.ops.shardfx.all_gather_start.default,
    "reduce_scatter": torch.ops.shardfx.reduce_scatter_start.default,
}
SYNC_OPS = {
    "all_reduce": torch.ops.shardfx.all_reduce.default,
    "all_gather": torch.ops.shardfx.all_gather.default,
    "reduce_scatter": torch.ops.shardfx.reduce_scatter.default,
}


def is_collective(node: fx.Node) -> bool:
    """A node that moves data between ranks (sync collectives and `*_start`; not `wait`)."""
    return node.op == "call_function" and node.target in OPS


def is_start(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in START_OPS.values() or node.target is ALL_REDUCE_START_)


def is_wait(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is WAIT


def kind(node: fx.Node) -> str:
    return OPS[node.target]


def axis_of(node: fx.Node) -> str:
    return node.args[1]


def volume_bytes(kind_name: str, in_bytes: int, out_bytes: int) -> int:
    """Bytes of the full tensor moved, in the ZeRO paper's unit (see module docstring)."""
    if kind_name == "all_gather":
        return out_bytes
    if kind_name == "reduce_scatter":
        return in_bytes
    return 2 * in_bytes


def nbytes(val: Any) -> int:
    return val.numel() * val.element_size() if isinstance(val, Tensor) else 0
