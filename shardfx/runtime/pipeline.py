"""Running a pipeline: every rank executes its stage's steps of the schedule table.

The compile driver hands over one program per (stage, variant) and the table
(graphs/pp_schedule.PipelineSchedule). A rank runs, for each step of its
stage, the forward part of micro-batch m (keeping what its backward reads) or
the backward part (taking the kept values, adding the gradients up over the
micro-batches as the accumulation variants say). After the last step:

1. a parameter held on several stages (a tied embedding) gets the sum of the
   parts of its gradient each holder computed, added in stage order;
2. every gradient is divided by the number of micro-batches (the loss is the
   mean over the global batch, as eager computes it);
3. the gradient norm is taken over every stage (each parameter counted once),
   and, with Config.grad_clip, every gradient scaled to it.

The returned loss is the mean of the last stage's micro-batch losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
from torch import Tensor

from shardfx.graphs.phases import FORWARD_PART
from shardfx.graphs.pp_schedule import EVAL, PipelineSchedule, stage_key
from shardfx.graphs.program import PIPELINE, DistProgram, Mesh
from shardfx.graphs.signature import BUFFER, GRAD_ACC, GRAD_SUM, PARAM
from shardfx.runtime.executor import StageExecutor
from shardfx.runtime.local import gather_ranks
from shardfx.runtime.local_comm import LocalWorld
from shardfx.runtime.state import OptimizerFactory, RankState, unshard
from shardfx.runtime.step_trace import Timeline

AXIS = "pp"
FORWARD_ONLY_UNBOUND = frozenset({GRAD_ACC, GRAD_SUM})


class StagePrograms:
    """The programs of one batch shape, by stage and variant, with their executors."""

    def __init__(self, programs: dict[str, tuple[DistProgram, StageExecutor]], pipe: PipelineSchedule) -> None:
        self.pipe = pipe
        self.programs = programs

    def program(self, stage: int, variant: str | None = None) -> DistProgram:
        return self.programs[stage_key(stage, variant or self.pipe.variants[-1])][0]

    def executor(self, stage: int, micro_batch: int) -> StageExecutor:
        return self.programs[stage_key(stage, self.pipe.variants[micro_batch])][1]

    def held_program(self, coord: int) -> DistProgram:
        """What the rank at pp coordinate `coord` holds: its stage's program, or (interleaved) one
        program whose signature and shard specs are the union of its stages'."""
        programs = [self.program(s) for s in self.pipe.stages_of(coord)]
        if len(programs) == 1:
            return programs[0]
        from shardfx.graphs.signature import Signature

        inputs, seen = [], set()
        for program in programs:
            for spec in program.signature.inputs:
                if spec.role in (PARAM, BUFFER) and spec.name not in seen:
                    seen.add(spec.name)
                    inputs.append(spec)
        first = programs[0]
        return DistProgram(
            first.gm,
            Signature(inputs, []),
            first.mesh,
            first.fake_mode,
            {k: v for p in programs for k, v in p.shard_specs.items()},
            {k: v for p in programs for k, v in p.tp_specs.items()},
            dict(first.notes),
        )


def run_stage(
    comm: object, state: RankState, coord: int, programs: StagePrograms, micro: Sequence[tuple[Tensor, ...]]
) -> tuple[list[Tensor], int]:
    """One rank's steps of the table: the losses of its micro-batches (the last stage's), and the
    most micro-batches whose saved activations it held at once (and their bytes: state.saved_peak)."""
    pipe = programs.pipe
    saved: dict[tuple[int, int], tuple[Tensor, ...]] = {}
    losses: list[Tensor] = []
    peak = 0
    held = state.saved_peak = 0
    for step in pipe.steps[coord]:
        m, stage = step.micro_batch, pipe.stage(coord, step)
        executor = programs.executor(stage, m)
        # the forward reads no accumulator (binding one would allocate a zero gradient early)
        unbound = FORWARD_ONLY_UNBOUND if step.part == FORWARD_PART else frozenset()
        args = executor.arguments(state.params, state.buffers, micro[m], state.grad_acc, state.replicas, unbound)
        if step.part == FORWARD_PART:
            saved[stage, m] = executor.forward(comm, args)  # type: ignore[arg-type]
            peak = max(peak, len(saved))
            held += _nbytes(saved[stage, m], args)
            state.saved_peak = max(state.saved_peak, held)
            continue
        kept = saved.pop((stage, m))
        held -= _nbytes(kept, args)
        out = executor.backward(comm, args, kept)  # type: ignore[arg-type]
        state.apply(out)
        if out.loss is not None:
            losses.append(out.loss.detach())
    return losses, peak


def _nbytes(values: tuple[Tensor, ...], inputs: list[Tensor]) -> int:
    """Bytes of the distinct storages of `values` (views of one count once) that are not the
    program's inputs (a saved view of a parameter holds no memory of its own)."""
    own = {x.untyped_storage().data_ptr() for x in inputs if isinstance(x, Tensor)}
    seen: dict[int, int] = {}
    for v in values:
        if isinstance(v, Tensor) and v.untyped_storage().data_ptr() not in own:
            seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(seen.values())


def run_eval_stage(
    comm: object,
    state: RankState,
    coord: int,
    pipe: PipelineSchedule,
    programs: dict[str, tuple[DistProgram, StageExecutor]],
    micro: Sequence[tuple[Tensor, ...]],
) -> list[Tensor]:
    """One rank's part of eval_step: its stages' forward of each micro-batch in turn; the losses."""
    losses = []
    for batch in micro:
        for stage in pipe.stages_of(coord):
            executor = programs[stage_key(stage, EVAL)][1]
            args = executor.arguments(state.params, state.buffers, batch)
            out = executor.backward(comm, args, executor.forward(comm, args))  # type: ignore[arg-type]
            if out.loss is not None:
                losses.append(out.loss.detach())
    return losses


def tied_groups(program: DistProgram, mesh: Mesh) -> list[tuple[str, list[int]]]:
    """(parameter, the global ranks that hold a copy of the same piece, in stage order) for every
    parameter held on several pipeline ranks (a rank holding two of its stages sums them itself)."""
    tied = program.notes.get(PIPELINE, {}).get("tied", {})
    ranks = program.notes.get(PIPELINE, {}).get("ranks") or mesh.size(AXIS)
    groups = []
    for name, holders in sorted(tied.items()):
        coords = list(dict.fromkeys(h % ranks for h in holders))
        if len(coords) < 2:
            continue
        for r in range(mesh.world_size):
            if mesh.coords(r)[AXIS] == coords[0]:
                line = mesh.group(r, AXIS)
                groups.append((name, [line[c] for c in coords]))
    return groups


def local_square_norm(program: DistProgram, state: RankState, rank: int) -> Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for name, param in state.params.items():
        if param.grad is not None and program.first_holder(name, rank):
            total += param.grad.detach().double().pow(2).sum().cpu()
    return total


def scale_grads(states: Sequence[RankState], factor: float) -> None:
    for state in states:
        for param in state.params.values():
            if param.grad is not None:
                param.grad.mul_(factor)


def clip_factor(norm: float, max_norm: float | None) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor: max_norm / (norm + 1e-6), at most 1."""
    if max_norm is None or not math.isfinite(norm):
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))


class LocalPipelineRuntime:
    """Every rank of a pipeline as a thread of this process, on the `local` communicator."""

    distributed = False

    def __init__(
        self,
        programs: dict[str, DistProgram],
        pipe: PipelineSchedule,
        model: nn.Module,
        optimizer: OptimizerFactory | None,
        timeout: float = 60.0,
        *,
        grad_clip: float | None = None,
    ) -> None:
        self.pipe = pipe
        self.model = model
        self.grad_clip = grad_clip
        self.stages = StagePrograms({n: (p, StageExecutor(p)) for n, p in programs.items()}, pipe)
        self.program = self.stages.program(pipe.stages - 1)
        self.executor = self.stages.executor(pipe.stages - 1, pipe.micro_batches - 1)
        mesh = self.program.mesh
        self.mesh = mesh
        self.world_size = mesh.world_size
        self.world = LocalWorld(mesh, timeout=timeout)
        self.comms = [self.world.comm(r) for r in range(self.world_size)]
        self.coord_of = [mesh.coords(r)[AXIS] for r in range(self.world_size)]
        self.held = [self.stages.held_program(self.coord_of[r]) for r in range(self.world_size)]
        self.states = [RankState(self.held[r], model, r, optimizer) for r in range(self.world_size)]
        self._pool = ThreadPoolExecutor(max_workers=self.world_size, thread_name_prefix="shardfx-stage")
        self.peak_alive: list[int] = [0] * pipe.ranks  # measured: micro-batches alive at once, per pp rank

    def held_states(self) -> list[tuple[int, RankState]]:
        return list(enumerate(self.states))

    def use(self, program: DistProgram, executor: object) -> None:  # the Engine's single-program verb
        raise RuntimeError("a pipeline runs every stage's programs: use use_stages")

    def use_stages(self, programs: dict[str, tuple[DistProgram, StageExecutor]]) -> None:
        self.stages = StagePrograms(programs, self.pipe)
        self.program = self.stages.program(self.pipe.stages - 1)

    def step(
        self, shards: list[tuple[Tensor, ...]], reset_stats: bool = True, timelines: dict[int, Timeline] | None = None
    ) -> Tensor:
        """Run the whole table on every rank; shards[r] is rank r's slice of the global batch."""
        _untraced(timelines)
        self.world.reset()
        if reset_stats:
            for comm in self.comms:
                comm.stats.reset()
        micro = [list(zip(*(torch.chunk(x, self.pipe.micro_batches, dim=0) for x in shard))) for shard in shards]
        futures = [self._pool.submit(self._rank, r, micro[r]) for r in range(self.world_size)]
        losses, peaks = zip(*gather_ranks(futures))
        for r in range(self.world_size):
            self.peak_alive[self.coord_of[r]] = peaks[r]
        self._finish()
        return torch.stack(losses[self._last_rank()]).mean()

    def _last_rank(self) -> int:
        """The first rank that runs the model's last stage (it computes the loss)."""
        last = self.pipe.coord(self.pipe.stages - 1)
        return next(r for r in range(self.world_size) if self.coord_of[r] == last)

    def _rank(self, rank: int, micro: list[tuple[Tensor, ...]]) -> tuple[list[Tensor], int]:
        try:
            return run_stage(self.comms[rank], self.states[rank], self.coord_of[rank], self.stages, micro)
        except BaseException as exc:
            self.world.abort(rank, exc)
            raise

    def _finish(self) -> None:
        """Tied sums, the mean over micro-batches, the norm over every stage, the clip."""
        for name, ranks in tied_groups(self.program, self.mesh):
            parts = [self.states[r].params[name].grad for r in ranks]
            if any(p is None for p in parts):
                continue
            total = parts[0].clone()
            for part in parts[1:]:
                total.add_(part)
            for r in ranks:
                self.states[r].params[name].grad = total.clone()
        scale_grads(self.states, 1.0 / self.pipe.micro_batches)
        square = sum(local_square_norm(self.held[r], self.states[r], r) for r in range(self.world_size))
        norm = float(square) ** 0.5
        factor = clip_factor(norm, self.grad_clip)
        if factor < 1.0:
            scale_grads(self.states, factor)
        for state in self.states:
            state.grad_norm = torch.tensor(norm)

    def evaluate(
        self, programs: dict[str, tuple[DistProgram, StageExecutor]], shards: list[tuple[Tensor, ...]]
    ) -> Tensor:
        """Every stage's forward-only program on its ranks' state; returns the mean loss."""
        self.world.reset()
        micro = [list(zip(*(torch.chunk(x, self.pipe.micro_batches, dim=0) for x in shard))) for shard in shards]

        def rank_eval(rank: int) -> list[Tensor]:
            try:
                return run_eval_stage(
                    self.comms[rank], self.states[rank], self.coord_of[rank], self.pipe, programs, micro[rank]
                )
            except BaseException as exc:
                self.world.abort(rank, exc)
                raise

        futures = [self._pool.submit(rank_eval, r) for r in range(self.world_size)]
        results = gather_ranks(futures)
        return torch.stack(results[self._last_rank()]).mean()

    def state_dict(self) -> dict[str, Tensor]:
        return pipeline_state_dict(self.stages, self.mesh, self.model, lambda r: self.states[r])

    def held_program(self, rank: int) -> DistProgram:
        return self.held[rank]

    def comm_stats(self, rank: int = 0) -> dict[str, dict[str, int]]:
        return self.comms[rank].stats.snapshot()

    def memory(self, rank: int = 0) -> dict[str, int]:
        return self.states[rank].local_bytes()

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class DistributedPipelineRuntime:
    """This process is one rank of a pipeline over torch.distributed: it runs its stage's steps."""

    distributed = True

    def __init__(
        self,
        programs: dict[str, DistProgram],
        pipe: PipelineSchedule,
        model: nn.Module,
        optimizer: OptimizerFactory | None,
        timeout: float | None = None,
        *,
        grad_clip: float | None = None,
    ) -> None:
        import torch.distributed as dist

        from shardfx.runtime.dist_comm import DistComm

        if pipe.chunks > 1 and dist.get_backend() == "nccl":
            raise NotImplementedError(
                "the interleaved schedule matches sends to receives by tag, which NCCL ignores; "
                "use pp_schedule='1f1b' or 'gpipe' on NCCL (their receives come in the order of the sends)"
            )
        self.pipe, self.model, self.grad_clip = pipe, model, grad_clip
        self.stages = StagePrograms({n: (p, StageExecutor(p)) for n, p in programs.items()}, pipe)
        self.mesh = self.stages.program(0).mesh
        self.comm = DistComm(self.mesh, timeout)
        self.rank = self.comm.rank
        self.world_size = self.mesh.world_size
        self.coord = self.mesh.coords(self.rank)[AXIS]
        self.program = self.stages.held_program(self.coord)  # the union of this rank's stages
        self.executor = self.stages.executor(pipe.stages_of(self.coord)[-1], pipe.micro_batches - 1)
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)
        self.state = RankState(self.program, model, self.rank, optimizer)
        # every rank makes every tied group, in the same order, as torch.distributed requires
        self._tied: list[tuple[str, object]] = []
        for name, ranks in tied_groups(self.stages.program(0), self.mesh):
            group = dist.new_group(ranks)
            if self.rank in ranks:
                self._tied.append((name, group))
        last = pipe.coord(pipe.stages - 1)
        self._last = next(r for r in range(self.world_size) if self.mesh.coords(r)[AXIS] == last)
        self.peak_alive = 0

    def held_states(self) -> list[tuple[int, RankState]]:
        return [(self.rank, self.state)]

    def use(self, program: DistProgram, executor: object) -> None:
        raise RuntimeError("a pipeline runs every stage's programs: use use_stages")

    def use_stages(self, programs: dict[str, tuple[DistProgram, StageExecutor]]) -> None:
        self.stages = StagePrograms(programs, self.pipe)
        self.program = self.stages.held_program(self.coord)

    def step(
        self, shards: list[tuple[Tensor, ...]], reset_stats: bool = True, timelines: dict[int, Timeline] | None = None
    ) -> Tensor:
        import torch.distributed as dist

        _untraced(timelines)

        if reset_stats:
            self.comm.stats.reset()
        micro = list(zip(*(torch.chunk(x, self.pipe.micro_batches, dim=0) for x in shards[self.rank])))
        losses, self.peak_alive = run_stage(self.comm, self.state, self.coord, self.stages, micro)
        self.comm.finish_sends()
        for name, group in self._tied:
            grad = self.state.params[name].grad
            if grad is not None:
                dist.all_reduce(grad, group=group)  # type: ignore[arg-type]
        scale_grads([self.state], 1.0 / self.pipe.micro_batches)
        square = local_square_norm(self.program, self.state, self.rank)
        dist.all_reduce(square)
        norm = float(square) ** 0.5
        factor = clip_factor(norm, self.grad_clip)
        if factor < 1.0:
            scale_grads([self.state], factor)
        self.state.grad_norm = torch.tensor(norm)
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        dist.broadcast(loss, src=self._last)  # every rank returns the step's loss
        return loss

    def evaluate(
        self, programs: dict[str, tuple[DistProgram, StageExecutor]], shards: list[tuple[Tensor, ...]]
    ) -> Tensor:
        import torch.distributed as dist

        micro = list(zip(*(torch.chunk(x, self.pipe.micro_batches, dim=0) for x in shards[self.rank])))
        losses = run_eval_stage(self.comm, self.state, self.coord, self.pipe, programs, micro)
        self.comm.finish_sends()
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        dist.broadcast(loss, src=self._last)
        return loss

    def state_dict(self) -> dict[str, Tensor]:
        """A collective: every rank gets every full tensor (each stage's gathered, then broadcast)."""
        import torch.distributed as dist

        full = dict(self.model.state_dict())
        out: dict[str, Tensor] = {}
        for s in range(self.pipe.stages):
            program = self.stages.program(s)
            coord = self.pipe.coord(s)
            first = next(r for r in range(self.world_size) if self.mesh.coords(r)[AXIS] == coord)
            for spec in program.signature.params():
                if spec.name in out:
                    continue
                if self.coord == coord:
                    value = self.state.params[spec.name].detach()
                    for shard in reversed(program.specs(spec.name)):
                        gathered = self.comm.all_gather(value, shard.axis, shard.dim)
                        value = shard.unshard(list(gathered.tensor_split(shard.world, dim=shard.dim)))
                    value = value.contiguous()
                else:
                    ref = full[spec.name]
                    value = torch.empty(ref.shape, dtype=self.state_dtype(ref), device=ref.device)
                dist.broadcast(value, src=first)
                for name in (spec.name, *spec.aliases):
                    out[name] = value
            for spec in program.signature.buffers():
                if spec.name not in out:
                    ref = full[spec.name]
                    value = self.state.buffers[spec.name].clone() if self.coord == coord else torch.empty_like(ref)
                    dist.broadcast(value, src=first)
                    out[spec.name] = value
        return {k: out[k] if k in out else v.detach().clone() for k, v in full.items()}

    def held_program(self, rank: int) -> DistProgram:
        return self.program

    def state_dtype(self, ref: Tensor) -> torch.dtype:
        """The dtype a rank keeps parameters in (the fp32 master, whatever the compute dtype)."""
        mine = next(iter(self.state.params.values()), None)
        return mine.dtype if mine is not None else ref.dtype

    def comm_stats(self, rank: int = 0) -> dict[str, dict[str, int]]:
        return self.comm.stats.snapshot()

    def memory(self, rank: int = 0) -> dict[str, int]:
        return self.state.local_bytes()


def pipeline_state_dict(
    stages: StagePrograms, mesh: Mesh, model: nn.Module, state_of: Callable[[int], RankState]
) -> dict[str, Tensor]:
    """Full, unpadded tensors under every key of model.state_dict(), each from the first stage holding it."""
    out: dict[str, Tensor] = {}
    for s in range(stages.pipe.stages):
        program = stages.program(s)
        coord = stages.pipe.coord(s)
        first = next(r for r in range(mesh.world_size) if mesh.coords(r)[AXIS] == coord)
        for spec in program.signature.params():
            if spec.name in out:
                continue
            value = unshard(program, spec.name, first, lambda r, n=spec.name: state_of(r).params[n])
            for name in (spec.name, *spec.aliases):
                out[name] = value
        for spec in program.signature.buffers():
            out.setdefault(spec.name, state_of(first).buffers[spec.name].clone())
    return {k: out[k] if k in out else v.detach().clone() for k, v in model.state_dict().items()}


def _untraced(timelines: dict[int, Timeline] | None) -> None:
    if timelines is not None:  # Engine.trace_step refuses first; this guards a direct caller
        raise ValueError("a pipeline step cannot be traced node by node (runtime/step_trace.py): give timelines=None")
