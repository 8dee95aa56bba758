"""Engine: what a user trains with. Splits the global batch, runs the step on the runtime."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from shardfx.graphs.program import DistProgram


class Runtime(Protocol):
    program: DistProgram

    def step(self, shards: list[tuple[Tensor, ...]]) -> Tensor: ...
    def state_dict(self) -> dict[str, Tensor]: ...
    def comm_stats(self, rank: int = 0) -> dict[str, dict[str, int]]: ...
    def memory(self, rank: int = 0) -> dict[str, int]: ...


class Engine:
    def __init__(
        self, runtime: Runtime, example_inputs: tuple[Tensor, ...], records: list[Any], capture_seconds: float
    ) -> None:
        self.runtime = runtime
        self.program = runtime.program
        self.pass_records = records
        self.capture_seconds = capture_seconds
        self._shapes = [(tuple(x.shape), x.dtype) for x in example_inputs]
        self.steps = 0

    def train_step(self, *batch: Tensor) -> Tensor:
        """Forward, backward and optimizer step on one global batch; returns the global mean loss."""
        self._check_batch(batch)
        loss = self.runtime.step(self._split(batch))
        self.steps += 1
        return loss

    def state_dict(self) -> dict[str, Tensor]:
        """Full, unpadded tensors under the keys of model.state_dict()."""
        return self.runtime.state_dict()

    def stats(self, rank: int = 0) -> dict[str, Any]:
        """Per-rank bytes held (params, grads, optimizer state) and collectives of the last step."""
        return {"memory": self.runtime.memory(rank), "comm": self.runtime.comm_stats(rank)}

    def _check_batch(self, batch: tuple[Tensor, ...]) -> None:
        if len(batch) != len(self._shapes):
            raise TypeError(f"train_step got {len(batch)} tensors; the step was compiled for {len(self._shapes)}")
        for i, (x, (shape, dtype)) in enumerate(zip(batch, self._shapes)):
            if not isinstance(x, Tensor):
                raise TypeError(f"batch[{i}] must be a tensor; got {type(x).__name__}")
            if tuple(x.shape) != shape or x.dtype != dtype:
                raise ValueError(
                    f"batch[{i}] has shape {list(x.shape)} {x.dtype}; the step was compiled for "
                    f"{list(shape)} {dtype}. Compile again for a new batch shape."
                )

    def _split(self, batch: tuple[Tensor, ...]) -> list[tuple[Tensor, ...]]:
        """Rank r gets the dim-0 slice of its data-parallel coordinate (tp ranks share a slice)."""
        mesh = self.program.mesh
        dp = mesh.size("dp")
        chunks = [torch.chunk(x, dp, dim=0) for x in batch]
        return [tuple(c[mesh.coords(r)["dp"]] for c in chunks) for r in range(mesh.world_size)]
