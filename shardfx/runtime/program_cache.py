"""The engine's compiled programs, one set per batch shape, least recently used dropped.

A set is what one batch shape needs: the step's variants ("step", or "first" /
"middle" / "last" under accumulation), or eval_step's one program. A new shape
is compiled by the callback the compile driver handed the engine; beyond
Config.max_batch_shapes the least recently used set is dropped (with a line in
the log). With max_batch_shapes=1 a new shape is an error naming what changed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from shardfx.errors import ShardfxError
from shardfx.graphs.program import DistProgram
from shardfx.runtime.executor import Executor

ShapeKey = tuple[tuple[tuple[int, ...], torch.dtype], ...]
Programs = dict[str, tuple[DistProgram, Executor]]


def shape_key(batch: tuple[Tensor, ...]) -> ShapeKey:
    return tuple((tuple(x.shape), x.dtype) for x in batch)


class ProgramCache:
    def __init__(
        self,
        compile_for: Callable[[tuple[Tensor, ...]], dict[str, DistProgram]] | None,
        max_shapes: int,
        log: Callable[[str], None],
        *,
        what: str = "step",
        strict: bool = True,
        executor: Callable[[DistProgram], Any] = Executor,
    ) -> None:
        """strict: with max_shapes=1 a second batch shape is an error instead of a recompile.
        executor: what runs a compiled program (a pipeline stage's: StageExecutor)."""
        self.executor = executor
        self._compile_for = compile_for
        self._max = max_shapes
        self._log = log
        self._what = what
        self._strict = strict
        self._sets: OrderedDict[ShapeKey, Programs] = OrderedDict()

    def add(self, batch: tuple[Tensor, ...], programs: Programs) -> None:
        self._sets[shape_key(batch)] = programs

    def __len__(self) -> int:
        return len(self._sets)

    def latest(self) -> Programs:
        """The set of the batch shape used last."""
        return next(reversed(self._sets.values()))

    def get(
        self, batch: tuple[Tensor, ...], dp: int, validate: Callable[[dict[str, DistProgram]], None] | None = None
    ) -> Programs:
        """The set compiled for this batch shape; compiled now if there is none (the batch's dim 0 must
        split over the `dp` ranks), and checked by `validate` before it is kept."""
        key = shape_key(batch)
        if key in self._sets:
            self._sets.move_to_end(key)
            return self._sets[key]
        change = _difference(batch, next(reversed(self._sets))) if self._sets else f"batch {_describe(key)}"
        if self._compile_for is None or (self._sets and self._max == 1 and self._strict):
            raise ValueError(
                f"{change}. Compile again for a new batch shape (or let the engine recompile: "
                "Config(max_batch_shapes=N > 1))."
            )
        for i, x in enumerate(batch):
            if x.dim() == 0 or x.shape[0] % dp:
                raise ValueError(
                    f"batch[{i}] has shape {list(x.shape)}; dim 0 must divide into {dp} ranks: "
                    f"use a batch size that is a multiple of {dp}"
                )
        if self._sets:
            self._log(f"{change}: compiling a new {self._what} ({len(self._sets)} already kept)")
        try:
            programs = self._compile_for(batch)
        except ShardfxError as exc:  # name the input that changed, not only the op that could not take it
            raise type(exc)(f"{change}, and the {self._what} could not be compiled for it: {exc}") from exc
        if validate is not None:
            validate(programs)
        self._sets[key] = {name: (p, self.executor(p)) for name, p in programs.items()}
        while len(self._sets) > self._max:
            dropped, _ = self._sets.popitem(last=False)
            self._log(f"dropping the {self._what} compiled for {_describe(dropped)} (Config.max_batch_shapes)")
        return self._sets[key]


def _difference(batch: tuple[Tensor, ...], compiled: Any) -> str:
    """'batch[i] has shape ...; the step was compiled for ...' for the first tensor that differs."""
    for i, (x, (shape, dtype)) in enumerate(zip(batch, compiled)):
        if (tuple(x.shape), x.dtype) != (shape, dtype):
            return f"batch[{i}] has shape {list(x.shape)} {x.dtype}; the step was compiled for {list(shape)} {dtype}"
    return "the batch differs"


def _describe(key: ShapeKey) -> str:
    return "(" + ", ".join(f"{list(shape)} {str(dtype).removeprefix('torch.')}" for shape, dtype in key) + ")"
