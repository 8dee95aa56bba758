"""LocalRuntime: N ranks as threads of one process, on the `local` communicator.

Deterministic (reductions add in rank order), needs no process group, and is
what tests and the debugging tools use. Each step runs every rank's graph in
its own thread; a failure on one rank aborts the others' collectives.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch.nn as nn
from torch import Tensor

from shardfx.errors import CollectiveError
from shardfx.graphs.program import DistProgram
from shardfx.runtime.executor import Executor, StepOutputs
from shardfx.runtime.local_comm import LocalWorld
from shardfx.runtime.state import OptimizerFactory, RankState, full_state_dict
from shardfx.runtime.step_trace import Timeline


def gather_ranks(futures: list[Future]) -> list:
    """Every rank thread's result, in rank order. A rank's own failure is raised before the
    CollectiveErrors it caused on the others."""
    results, errors = [], []
    for r, fut in enumerate(futures):
        try:
            results.append(fut.result())
        except BaseException as exc:  # noqa: BLE001 - re-raised below, root cause first
            errors.append((r, exc))
    if errors:
        errors.sort(key=lambda e: isinstance(e[1], CollectiveError))
        raise errors[0][1]
    return results


class LocalRuntime:
    distributed = False

    def __init__(
        self,
        program: DistProgram,
        model: nn.Module,
        optimizer: OptimizerFactory | None,
        timeout: float = 60.0,
        *,
        keep_outputs: bool = False,
    ) -> None:
        """keep_outputs: keep what every rank's program returned in the last step (`outputs[rank]`),
        for tools that compare every rank's loss and gradients (bisect)."""
        self.program = program
        self.model = model
        self.world_size = program.mesh.world_size
        self.world = LocalWorld(program.mesh, timeout=timeout)
        self.comms = [self.world.comm(r) for r in range(self.world_size)]
        self.states = [RankState(program, model, r, optimizer) for r in range(self.world_size)]
        self.executor = Executor(program)
        self.keep_outputs = keep_outputs
        self.outputs: dict[int, StepOutputs] = {}
        self._pool = ThreadPoolExecutor(max_workers=self.world_size, thread_name_prefix="shardfx-rank")

    def held_states(self) -> list[tuple[int, RankState]]:
        return list(enumerate(self.states))

    def use(self, program: DistProgram, executor: Executor) -> None:
        self.program, self.executor = program, executor

    def step(
        self, shards: list[tuple[Tensor, ...]], reset_stats: bool = True, timelines: dict[int, Timeline] | None = None
    ) -> Tensor:
        """Run one training step; `shards[r]` is rank r's part of the batch. Returns rank 0's loss.

        reset_stats=False adds this step's collectives to the counts of the steps before it.
        `timelines[r]`: time every node of rank r's program into it (runtime/step_trace.py).
        """
        self.world.reset()
        if reset_stats:
            for comm in self.comms:
                comm.stats.reset()
        timeline = (timelines or {}).get
        futures = [self._pool.submit(self._rank_step, r, shards[r], timeline(r)) for r in range(self.world_size)]
        return gather_ranks(futures)[0]

    def _rank_step(self, rank: int, batch: tuple[Tensor, ...], timeline: Timeline | None = None) -> Tensor:
        state = self.states[rank]
        try:
            out = self.executor.run(
                self.comms[rank],
                state.params,
                state.buffers,
                batch,
                state.grad_acc,
                state.replicas,
                loss_scale=state.loss_scale,
                timeline=timeline,
            )
            if self.keep_outputs:
                self.outputs[rank] = out
            state.apply(out)
            return out.loss.detach()
        except BaseException as exc:
            self.world.abort(rank, exc)
            raise

    def evaluate(self, executor: Executor, shards: list[tuple[Tensor, ...]]) -> Tensor:
        """Run a forward-only program on every rank's state; nothing is updated. Returns rank 0's loss."""
        self.world.reset()

        def rank_eval(rank: int) -> Tensor:
            state = self.states[rank]
            try:
                return executor.run(self.comms[rank], state.params, state.buffers, shards[rank]).loss.detach()
            except BaseException as exc:
                self.world.abort(rank, exc)
                raise

        futures = [self._pool.submit(rank_eval, r) for r in range(self.world_size)]
        # every rank done before returning or raising: a rank left waiting in a collective of this
        # program would hold its pool thread into the next one, which then never completes
        return gather_ranks(futures)[0]

    def state_dict(self) -> dict[str, Tensor]:
        return full_state_dict(self.program, self.model, self.states)

    def comm_stats(self, rank: int = 0) -> dict[str, dict[str, int]]:
        return self.comms[rank].stats.snapshot()

    def memory(self, rank: int = 0) -> dict[str, int]:
        return self.states[rank].local_bytes()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
