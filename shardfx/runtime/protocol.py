"""The protocol both runtimes implement: what the Engine and checkpoints may ask of a runtime.

`LocalRuntime` holds every rank in one process (`distributed` False,
`held_states()` lists them all); `DistributedRuntime` is one rank of a
torch.distributed job (`distributed` True, `held_states()` is its own rank).
"""

from __future__ import annotations

from typing import Protocol

import torch.nn as nn
from torch import Tensor

from shardfx.graphs.program import DistProgram
from shardfx.runtime.executor import Executor
from shardfx.runtime.state import RankState
from shardfx.runtime.step_trace import Timeline


class Runtime(Protocol):
    program: DistProgram  # the program step() runs
    executor: Executor  # its executor
    model: nn.Module
    distributed: bool  # one rank per process (collectives outside the program go through torch.distributed)

    def held_states(self) -> list[tuple[int, RankState]]:
        """(rank, state) of every rank this process holds."""
        ...

    def use(self, program: DistProgram, executor: Executor) -> None:
        """Run `program` (with its executor) from the next step on."""
        ...

    def step(
        self, shards: list[tuple[Tensor, ...]], reset_stats: bool = True, timelines: dict[int, Timeline] | None = None
    ) -> Tensor:
        """One step on every held rank (`shards[r]`: rank r's batch); `timelines`: time each held rank's
        nodes into its Timeline (runtime/step_trace.py; a pipeline refuses)."""
        ...

    def evaluate(self, executor: Executor, shards: list[tuple[Tensor, ...]]) -> Tensor: ...
    def state_dict(self) -> dict[str, Tensor]: ...
    def comm_stats(self, rank: int = 0) -> dict[str, dict[str, int]]: ...
    def memory(self, rank: int = 0) -> dict[str, int]: ...
