"""The `local` backend: N ranks are threads of one process.

Every collective is a rendezvous of the ranks of one group. The last rank to
arrive checks that all of them issued the same collective with the same
shapes, computes every rank's result (reductions add in rank order, so
results are deterministic) and wakes the others. A mismatch, a rank that
failed, or a rank that never arrives within the timeout raises a
CollectiveError naming the ranks and the graph nodes involved: never a hang.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from shardfx.errors import CollectiveError
from shardfx.graphs.collectives import volume_bytes
from shardfx.graphs.program import Mesh
from shardfx.runtime.accounting import CommStats


@dataclass
class _Arrival:
    key: tuple
    where: str
    tensor: Tensor


@dataclass
class _Round:
    arrivals: dict[int, _Arrival] = field(default_factory=dict)
    results: dict[int, Tensor] = field(default_factory=dict)
    done: bool = False


class LocalWorld:
    """Shared state of the N rank threads: one rendezvous per (axis, group)."""

    def __init__(self, mesh: Mesh, timeout: float = 60.0) -> None:
        self.mesh = mesh
        self.timeout = timeout
        self._cond = threading.Condition()
        self._rounds: dict[tuple[int, ...], _Round] = {}
        self._failure: CollectiveError | None = None
        self._mail: dict[tuple[int, int, int], deque[_Arrival]] = {}  # (src, dst, tag) -> sent, not received

    def comm(self, rank: int) -> LocalComm:
        return LocalComm(self, rank)

    def abort(self, rank: int, exc: BaseException) -> None:
        """A rank failed outside a collective: wake everyone waiting so they fail too."""
        with self._cond:
            if self._failure is None:
                self._failure = CollectiveError(f"rank {rank} failed: {type(exc).__name__}: {exc}")
            self._cond.notify_all()

    def reset(self) -> None:
        with self._cond:
            self._rounds.clear()
            self._mail.clear()
            self._failure = None

    def post(self, src: int, dst: int, tag: int, arrival: _Arrival) -> None:
        """A send: queued for `dst` (in order, per tag), never waits."""
        with self._cond:
            if self._failure is not None:
                raise self._failure
            self._mail.setdefault((src, dst, tag), deque()).append(arrival)
            self._cond.notify_all()

    def take(self, src: int, dst: int, tag: int, key: tuple, where: str) -> Tensor:
        """A receive: the oldest message of `tag` from `src` to `dst`, which must be what `dst` expects."""
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while True:
                if self._failure is not None:
                    raise self._failure
                queue = self._mail.get((src, dst, tag))
                if queue:
                    arrival = queue.popleft()
                    if arrival.key != key:
                        self._failure = CollectiveError(
                            "a send and its receive disagree:\n"
                            f"  rank {src} sent {_describe(arrival.key)} at {arrival.where}\n"
                            f"  rank {dst} receives {_describe(key)} at {where}"
                        )
                        self._cond.notify_all()
                        raise self._failure
                    return arrival.tensor
                left = deadline - time.monotonic()
                if left <= 0:
                    self._failure = CollectiveError(
                        f"receive timed out after {self.timeout:.0f}s: rank {dst} waits at {where} "
                        f"for rank {src}, which sent nothing"
                    )
                    self._cond.notify_all()
                    raise self._failure
                self._cond.wait(left)

    def exchange(self, rank: int, group: tuple[int, ...], arrival: _Arrival, combine: Callable) -> Tensor:
        deadline = time.monotonic() + self.timeout
        with self._cond:
            if self._failure is not None:
                raise self._failure
            current = self._rounds.setdefault(group, _Round())
            current.arrivals[rank] = arrival
            if len(current.arrivals) == len(group):
                self._rounds[group] = _Round()
                try:
                    _check_same(group, current.arrivals)
                    tensors = [current.arrivals[r].tensor for r in group]
                    outs = combine(tensors)
                    current.results = {r: out for r, out in zip(group, outs)}
                except CollectiveError as exc:
                    self._failure = exc
                current.done = True
                self._cond.notify_all()
            while not current.done and self._failure is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [r for r in group if r not in current.arrivals]
                    self._failure = CollectiveError(
                        f"collective timed out after {self.timeout:.0f}s: rank {rank} waits at {arrival.where}, "
                        f"ranks {missing} of group {list(group)} never arrived"
                    )
                    self._cond.notify_all()
                    break
                self._cond.wait(left)
            if self._failure is not None:
                raise self._failure
            return current.results[rank]


def _check_same(group: tuple[int, ...], arrivals: dict[int, _Arrival]) -> None:
    first = group[0]
    for r in group[1:]:
        if arrivals[r].key != arrivals[first].key:
            a, b = arrivals[first], arrivals[r]
            raise CollectiveError(
                "ranks disagree on a collective:\n"
                f"  rank {first}: {_describe(a.key)} at {a.where}\n"
                f"  rank {r}: {_describe(b.key)} at {b.where}"
            )


def _describe(key: tuple) -> str:
    kind, axis, shape, dtype, extra = key
    args = ", ".join(f"{k}={v}" for k, v in extra)
    return f"{kind}(axis={axis!r}, {args}{', ' if args else ''}shape={list(shape)}, dtype={dtype})"


def _reduce(tensors: list[Tensor], op: str) -> Tensor:
    out = tensors[0].clone()
    for t in tensors[1:]:
        if op == "max":
            torch.maximum(out, t, out=out)
        else:
            out.add_(t)
    if op == "avg":
        out.div_(len(tensors))
    return out


class LocalComm:
    """One rank's communicator in a LocalWorld."""

    def __init__(self, world: LocalWorld, rank: int) -> None:
        self.world = world
        self.rank = rank
        self.stats = CommStats()
        self.where: Callable[[], str] = lambda: "(no graph node)"

    def axis_size(self, axis: str) -> int:
        return self.world.mesh.size(axis)

    def coordinate(self, axis: str) -> int:
        return self.world.mesh.coords(self.rank)[axis]

    def _group(self, axis: str) -> tuple[int, ...]:
        return tuple(self.world.mesh.group(self.rank, axis))

    def _run(self, kind: str, axis: str, x: Tensor, extra: tuple, combine: Callable, where: str | None) -> Tensor:
        group = self._group(axis)
        key = (kind, axis, tuple(x.shape), x.dtype, extra)
        arrival = _Arrival(key, where or self.where(), x.contiguous())
        if len(group) == 1:
            out = combine([arrival.tensor])[0]
        else:
            out = self.world.exchange(self.rank, group, arrival, combine)
        self.stats.record(kind, volume_bytes(kind, _nbytes(x), _nbytes(out)), len(group))
        return out

    def start(self, kind: str, x: Tensor, axis: str, inplace: bool = False, **kwargs: object) -> Tensor:
        """Async start: the local backend completes here (wait is then a no-op), same results.
        `inplace` (all_reduce): the result is written into x, and x returned."""
        out = getattr(self, kind)(x, axis, **kwargs)
        return x.copy_(out) if inplace else out

    def wait(self, t: Tensor) -> Tensor:
        return t

    def peer_rank(self, axis: str, peer: int) -> int:
        """The global rank `peer` steps along `axis` from this one."""
        other = self.world.mesh.peer(self.rank, axis, peer)
        if other is None:
            raise CollectiveError(f"rank {self.rank} has no peer {peer:+d} on axis {axis!r}")
        return other

    def send(self, x: Tensor, axis: str, peer: int, tag: int = 0, where: str | None = None) -> None:
        key = ("p2p", axis, tuple(x.shape), x.dtype, (("tag", tag),))
        dst = self.peer_rank(axis, peer)
        self.world.post(self.rank, dst, tag, _Arrival(key, where or self.where(), x.detach().clone()))
        self.stats.record_p2p("send", _nbytes(x))

    def recv(
        self,
        shape: list[int],
        dtype: torch.dtype,
        device: torch.device,
        axis: str,
        peer: int,
        tag: int = 0,
        where: str | None = None,
    ) -> Tensor:
        key = ("p2p", axis, tuple(shape), dtype, (("tag", tag),))
        src = self.peer_rank(axis, peer)
        out = self.world.take(src, self.rank, tag, key, where or self.where())
        self.stats.record_p2p("recv", _nbytes(out))
        return out.to(device)

    def all_reduce(self, x: Tensor, axis: str, op: str, where: str | None = None) -> Tensor:
        def combine(ts: list[Tensor]) -> list[Tensor]:
            total = _reduce(ts, op)
            return [total] + [total.clone() for _ in ts[1:]]

        return self._run("all_reduce", axis, x, (("op", op),), combine, where)

    def all_gather(self, x: Tensor, axis: str, dim: int, where: str | None = None) -> Tensor:
        def combine(ts: list[Tensor]) -> list[Tensor]:
            full = torch.cat(ts, dim=dim)
            return [full] + [full.clone() for _ in ts[1:]]

        return self._run("all_gather", axis, x, (("dim", dim),), combine, where)

    def reduce_scatter(self, x: Tensor, axis: str, op: str, dim: int, where: str | None = None) -> Tensor:
        def combine(ts: list[Tensor]) -> list[Tensor]:
            total = _reduce(ts, op)
            return [c.contiguous() for c in total.chunk(len(ts), dim=dim)]

        return self._run("reduce_scatter", axis, x, (("op", op), ("dim", dim)), combine, where)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()
