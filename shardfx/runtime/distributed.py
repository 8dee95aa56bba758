"""DistributedRuntime: this process is one rank of a torch.distributed job (torchrun or `shardfx train`).

At start, rank 0's parameters and buffers are broadcast so every rank begins
from the same model (as DDP does); then each rank keeps only its own state.
`state_dict()` is a collective: every rank must call it; each gets the full
tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from shardfx.graphs.program import DistProgram
from shardfx.runtime.dist_comm import DistComm
from shardfx.runtime.executor import Executor
from shardfx.runtime.state import OptimizerFactory, RankState
from shardfx.runtime.step_trace import Timeline


class DistributedRuntime:
    distributed = True

    def __init__(
        self, program: DistProgram, model: nn.Module, optimizer: OptimizerFactory | None, timeout: float | None = None
    ) -> None:
        self.program = program
        self.model = model
        self.comm = DistComm(program.mesh, timeout)
        self.rank = self.comm.rank
        self.world_size = program.mesh.world_size
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)
        self.state = RankState(program, model, self.rank, optimizer)
        self.executor = Executor(program)

    def held_states(self) -> list[tuple[int, RankState]]:
        return [(self.rank, self.state)]

    def use(self, program: DistProgram, executor: Executor) -> None:
        self.program, self.executor = program, executor

    def step(
        self, shards: list[tuple[Tensor, ...]], reset_stats: bool = True, timelines: dict[int, Timeline] | None = None
    ) -> Tensor:
        """Run this rank's step on shards[rank]; reset_stats=False adds to the last step's collective counts;
        `timelines[rank]`: time every node into it (runtime/step_trace.py)."""
        if reset_stats:
            self.comm.stats.reset()
        state = self.state
        out = self.executor.run(
            self.comm,
            state.params,
            state.buffers,
            shards[self.rank],
            state.grad_acc,
            state.replicas,
            loss_scale=state.loss_scale,
            timeline=(timelines or {}).get(self.rank),
        )
        state.apply(out)
        return out.loss.detach()

    def evaluate(self, executor: Executor, shards: list[tuple[Tensor, ...]]) -> Tensor:
        """Run a forward-only program on this rank's state; nothing is updated."""
        return executor.run(self.comm, self.state.params, self.state.buffers, shards[self.rank]).loss.detach()

    def state_dict(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for spec in self.program.signature.params():
            value = self.state.params[spec.name].detach()
            for shard in reversed(self.program.specs(spec.name)):  # undo ZeRO, then tensor parallel
                gathered = self.comm.all_gather(value, shard.axis, shard.dim)
                value = shard.unshard(list(gathered.tensor_split(shard.world, dim=shard.dim)))
            for name in (spec.name, *spec.aliases):
                out[name] = value
        for name, buf in self.state.buffers.items():
            out[name] = buf.clone()
        return {k: out[k] if k in out else v.detach().clone() for k, v in self.model.state_dict().items()}

    def comm_stats(self, rank: int = 0) -> dict[str, dict[str, int]]:
        return self.comm.stats.snapshot()

    def memory(self, rank: int = 0) -> dict[str, int]:
        return self.state.local_bytes()
