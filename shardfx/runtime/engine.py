"""Engine: what a user trains with. Splits the global batch, runs the step on the runtime.

One compiled graph runs forward AND backward (the joint graph); the optimizer runs
outside it, on each rank's local shards. The verbs map onto that as follows:

    loss = engine(*micro_batch)   runs the whole graph: forward and backward; at the last
                                  micro-batch of an optimizer step also the gradient
                                  collectives (see below)
    engine.backward(loss)         bookkeeping only: the backward already ran
    engine.step()                 at an accumulation boundary (every grad_accum_steps calls):
                                  check the step's loss and gradient norm (the program
                                  computed the norm and clipped), average the kept
                                  gradients, step the optimizer and the LR scheduler;
                                  otherwise nothing
    engine.train_step(*batch)     all three, over grad_accum_steps micro-batches stacked on dim 0
    engine.trace_step(*batch)     train_step with every node of every rank timed: the measured step
                                  (and the cost model's simulated one) as a Chrome / Perfetto trace

With gradient accumulation (Config.grad_accum_steps=k) the step is compiled in up to
three variants, and the compile driver hands over a Schedule saying which runs at which
micro-batch: with grad_accum_sync="boundary", micro-batches
1..k-1 add each rank's unreduced gradients to its accumulators and reduce nothing, and
micro-batch k adds its own and reduces the sum once (passes/accumulate_gradients.py);
"micro_batch" reduces every micro-batch and adds up the reduced shards, and the last
program adds the kept sum in itself (passes/sum_gradients.py). Under ZeRO-1/2
only the first micro-batch gathers the parameters; the others reuse the replicas it
kept (passes/reuse_replicas.py). A non-finite loss or gradient norm is reported
with its step and skipped, stopped on, or ignored per Config.on_nonfinite. Under fp16
with a dynamic loss scale, a non-finite gradient norm is an overflow instead: the step is
skipped (the LR scheduler does not advance) and the scale lowered (runtime/loss_scale.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from shardfx.config import Config
from shardfx.graphs import cost_model
from shardfx.graphs.program import PIPELINE, PLAN, DistProgram, Schedule
from shardfx.graphs.signature import GRAD_ACC
from shardfx.runtime import checkpoint
from shardfx.runtime.executor import Executor, StageExecutor
from shardfx.runtime.loss_scale import LossScaler
from shardfx.runtime.nonfinite import NonFiniteError, NonFinitePolicy
from shardfx.runtime.optimizers import check_sharded_optimizer
from shardfx.runtime.program_cache import ProgramCache
from shardfx.runtime.protocol import Runtime
from shardfx.runtime.rng import rng_state, set_rng_state
from shardfx.runtime.step_trace import OPTIMIZER_TRACK, Timeline, begin_step, chrome_trace

logger = logging.getLogger("shardfx")


@dataclass
class EngineOptions:
    """Everything an Engine is built with besides its runtime (the compile driver fills it in)."""

    example_inputs: tuple[Tensor, ...]
    programs: dict[str, DistProgram]  # the step's programs for the example batch shape, by variant
    schedule: Schedule  # which of them runs at which micro-batch
    config: Config
    records: list[Any]  # the passes' records of the last program (PassRecord)
    capture_seconds: float = 0.0
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    compile_for: Callable[[tuple[Tensor, ...]], dict[str, DistProgram]] | None = None  # a new batch shape
    # a forward-only program (a pipeline: one per stage, by stage_key(s, "eval"))
    compile_eval_for: Callable[[tuple[Tensor, ...]], DistProgram | dict[str, DistProgram]] | None = None
    model: torch.nn.Module | None = None
    loss_fn: Callable[..., Tensor] | None = None
    log: Callable[[str], None] | None = None


class Engine:
    def __init__(self, runtime: Runtime, options: EngineOptions) -> None:
        self.runtime = runtime
        self.program = runtime.program
        self.pass_records = options.records
        self.capture_seconds = options.capture_seconds
        self.config = options.config
        self.schedule = options.schedule
        self.plan: Any = None  # Config(plan="auto"): the planner's Plan (compile_distributed sets it)
        self._model, self._loss_fn = options.model, options.loss_fn
        self._log = options.log or logger.warning
        self._arity = len(options.example_inputs)
        # what every batch must match (a new shape recompiles; a new dtype or device is refused)
        self._compiled_for = [(tuple(x.shape), x.dtype, x.device.type) for x in options.example_inputs]
        # Under pipeline parallelism the runtime runs every stage's programs over the micro-batches
        # of one call; the Engine sees one program per optimizer step.
        self._pipeline = hasattr(runtime, "use_stages")
        self._splits = self.program.mesh.size("dp") * (self.config.pp_microbatches if self._pipeline else 1)
        # per batch shape: variant ("step", or "first" / "middle" / "last"; "stage{s}/{variant}" in a
        # pipeline) -> (program, executor)
        self._programs = ProgramCache(
            options.compile_for,
            self.config.max_batch_shapes,
            lambda line: self._log(line),
            executor=StageExecutor if self._pipeline else Executor,
        )
        if self._pipeline:
            self._programs.add(options.example_inputs, dict(runtime.stages.programs))
        else:
            self._programs.add(
                options.example_inputs,
                {
                    n: (p, runtime.executor if p is runtime.program else Executor(p))
                    for n, p in options.programs.items()
                },
            )
        compile_eval = options.compile_eval_for
        self._can_eval = compile_eval is not None

        def eval_programs(batch: tuple[Tensor, ...]) -> dict[str, DistProgram]:
            assert compile_eval is not None
            programs = compile_eval(batch)
            return programs if isinstance(programs, dict) else {"eval": programs}

        self._eval_programs = ProgramCache(
            None if compile_eval is None else eval_programs,
            self.config.max_batch_shapes,
            lambda line: None,
            what="eval program",
            strict=False,
            executor=StageExecutor if self._pipeline else Executor,
        )
        self._nonfinite = NonFinitePolicy(self.config.on_nonfinite, lambda line: self._log(line))
        self.loss_scaler = LossScaler(self.config) if self.config.mixed_precision == "fp16" else None
        self._variant = self.schedule.micro_batches[-1]  # the variant that ran last
        self._states = [s for _, s in runtime.held_states()]
        self._check_optimizer()
        self._warned_no_optimizer = False
        for state in self._states:
            state.auto_step = False  # the engine decides when the optimizer runs
            if options.scheduler is not None and state.optimizer is not None:
                state.scheduler = options.scheduler(state.optimizer)
        self._set_loss_scale()
        self.steps = 0  # optimizer steps, skipped ones included
        self.micro_steps = 0  # engine(*batch) calls
        self.samples = 0  # global samples seen (dim 0 of the batches)
        self.skipped_steps = 0
        self.last_grad_norm: float | None = None
        self._phase = "idle"  # idle -> forward -> backward -> (step) idle
        self._last_loss: Tensor | None = None
        self._timelines: dict[int, Timeline] | None = None  # set while trace_step runs

    # --- training -----------------------------------------------------------------------------

    def train_step(self, *batch: Tensor) -> Tensor:
        """Forward, backward and one optimizer step on one global batch; returns the global mean loss.

        With grad_accum_steps=k, `batch` holds k micro-batches stacked on dim 0 (k times the
        example batch); they run one after another and the optimizer steps once.
        """
        self._check_batch(batch, "train_step")
        k = self.config.grad_accum_steps
        if k == 1:
            micro = [batch]
        else:
            for i, x in enumerate(batch):
                if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] % k:
                    raise ValueError(
                        f"train_step with grad_accum_steps={k} needs batch[{i}] with a dim 0 that divides by {k}; "
                        f"got {getattr(x, 'shape', type(x).__name__)}"
                    )
            micro = list(zip(*(torch.chunk(x, k, dim=0) for x in batch)))
        losses = []
        for part in micro:
            loss = self(*part)
            self.backward(loss)
            self.step()
            losses.append(loss)
        return losses[0] if k == 1 else torch.stack(losses).mean()

    def __call__(self, *batch: Tensor) -> Tensor:
        """Run the step's graph on one micro-batch (forward and backward); returns the global mean loss."""
        if self._phase != "idle":
            raise RuntimeError(
                f"engine(*batch) called again before engine.backward(loss) and engine.step() (state: {self._phase})"
            )
        self._check_batch(batch, "engine(*batch)")
        k = self.config.grad_accum_steps
        variants = self._select_program(batch)
        self._variant = self.schedule.program_for(self.micro_steps)
        if self._pipeline:
            self.runtime.use_stages(variants)
            self.program = self.runtime.program
        else:
            self._use(*variants[self._variant])
        # the collective counts of engine.stats() cover every micro-batch of the last optimizer step
        loss = self.runtime.step(self._split(batch), reset_stats=self.micro_steps % k == 0, timelines=self._timelines)
        self.micro_steps += 1
        self.samples += batch[0].shape[0]
        self._nonfinite.record_loss((self.micro_steps - 1) % k, float(loss))
        self._phase, self._last_loss = "forward", loss
        return loss

    forward = __call__

    def backward(self, loss: Tensor) -> None:
        """Bookkeeping: the compiled graph already ran the backward of the loss engine(*batch) returned."""
        if self._phase != "forward" or loss is not self._last_loss:
            raise RuntimeError(
                "engine.backward(loss) takes the loss the last engine(*batch) returned, once; "
                f"state: {self._phase}" + ("" if loss is self._last_loss else ", and this is another tensor")
            )
        self._phase = "backward"

    def step(self) -> None:
        """Apply the optimizer at an accumulation boundary (every grad_accum_steps micro-batches)."""
        if self._phase != "backward":
            raise RuntimeError(
                f"engine.step() comes after engine(*batch) and engine.backward(loss); state: {self._phase}"
            )
        self._phase = "idle"
        k = self.config.grad_accum_steps
        if self.micro_steps % k:
            return
        self.steps += 1
        scale = 1.0 / k
        # The program that holds the whole step's gradient computed its norm (and clipped to it): the
        # norm of the sum of k micro-batches' gradients, k times the mean's. None: no norm was computed
        # (no trainable parameter, or the norm pass force-disabled).
        measured = self._states[0].grad_norm if self._variant in self.schedule.whole_step else None
        norm = None if measured is None else float(measured) * scale
        self.last_grad_norm = norm
        scaler = self.loss_scaler
        if scaler is not None and scaler.dynamic and norm is not None:  # None: nothing to overflow (no gradients)
            overflow = not math.isfinite(norm)
            try:
                line = scaler.update(overflow, self.steps)
            except NonFiniteError:  # overflow at the minimum scale: nothing of the step is kept
                for state in self._states:
                    state.zero_grad()
                raise
            finally:
                self._set_loss_scale()
            if overflow:
                self._log(line)
                self._nonfinite.forget()
                for state in self._states:
                    state.zero_grad()
                self.skipped_steps += 1
                return
        try:
            allowed = self._nonfinite.allows_step(self.steps, norm)
        except NonFiniteError:  # "stop": nothing of the step is kept
            for state in self._states:
                state.zero_grad()
            raise
        if not allowed:  # "skip"
            for state in self._states:
                state.zero_grad()
            self.skipped_steps += 1
            return
        if not self._warned_no_optimizer and all(s.optimizer is None for s in self._states):
            self._warned_no_optimizer = True
            self._log(
                "engine.step: there is no optimizer (compile_distributed(optimizer=None), or no trainable "
                "parameter): the gradients are computed and dropped, nothing trains"
            )
        for state in self._states:
            if self._timelines is None:
                state.optimizer_step(scale if k > 1 else None)
                continue
            with self._timelines[state.rank].span(OPTIMIZER_TRACK, "optimizer.step", "optimizer"):
                state.optimizer_step(scale if k > 1 else None)

    def trace_step(self, *batch: Tensor, hardware: str | None = cost_model.AUTO) -> dict[str, Any]:
        """train_step(*batch), every node of every rank's program timed: the measured step as a Chrome /
        Perfetto trace (open it in ui.perfetto.dev; layout in runtime/step_trace.py), with the cost model's
        simulated step of the same programs beside it on the `hardware` profile (None: measured only).

        The state changes exactly as train_step changes it (the same ops run); the loss is
        otherData["loss"], the measured step_ms and simulated_step_ms are in otherData too. Under the
        distributed runtime it is a collective: every rank calls it and gets every rank's events. Trace a
        step after the first, which also allocates the optimizer's state and warms the caches. A pipeline
        (pp_size > 1) runs several stages' programs interleaved and is not supported.
        """
        if self._pipeline:
            raise ValueError(
                f"trace_step times one program per rank; this engine is a pipeline (pp_size={self.config.pp_size}), "
                "whose ranks interleave several stages' programs: not supported; trace a pp_size=1 engine"
            )
        if self._phase != "idle" or self.micro_steps % self.config.grad_accum_steps:
            raise RuntimeError(
                f"trace_step runs a whole optimizer step; {self.micro_steps % self.config.grad_accum_steps} of "
                f"{self.config.grad_accum_steps} micro-batches of this one have run (state: {self._phase})"
            )
        hw = None if hardware is None else cost_model.hardware(hardware)  # an unknown profile fails before the step
        held = [rank for rank, _ in self.runtime.held_states()]
        # every rank's loss_scale lives where its parameters do: CUDA steps are synchronised node by node
        self._timelines = begin_step(held, self.runtime.distributed, self._states[0].loss_scale.device)
        try:
            loss = self.train_step(*batch)
            timelines = self._timelines
        finally:
            self._timelines = None
        return chrome_trace(
            timelines,
            world_size=self.program.mesh.world_size,
            distributed=self.runtime.distributed,
            hardware=hw,
            other={"step": self.steps, "loss": float(loss)},
        )

    def _check_optimizer(self) -> None:
        split = []
        if self.program.shard_specs:
            split.append(f"ZeRO stage {self.config.zero_stage}")
        if self.program.tp_specs:
            split.append(f"tensor parallelism (tp_size={self.config.tp_size})")
        for state in self._states:
            if state.optimizer is not None:
                check_sharded_optimizer(state.optimizer, split, self.config.allow_untested_optimizer)

    def _set_loss_scale(self) -> None:
        """Hand the loss scale to every rank's state: the next step's program multiplies its loss by it."""
        if self.loss_scaler is not None:
            for state in self._states:
                state.loss_scale.fill_(self.loss_scaler.scale)

    def get_lr(self) -> list[float]:
        """The learning rate of every optimizer param group (the same on every rank)."""
        optimizer = self._states[0].optimizer
        return [float(g["lr"]) for g in optimizer.param_groups] if optimizer is not None else []

    def programs(self) -> dict[str, DistProgram]:
        """The programs of the batch shape used last, by variant: "step" without accumulation, else
        "first" / "middle" / "last" (engine.schedule says which runs when); print one with graphs.format.format_program."""
        return {name: program for name, (program, _) in self._programs.latest().items()}

    # --- evaluation -----------------------------------------------------------------------------

    def eval_program(self) -> DistProgram:
        """The forward-only program eval_step ran last (for graphs.format.format_program)."""
        if not len(self._eval_programs):
            raise RuntimeError("no eval_step has run yet")
        programs = self._eval_programs.latest()
        if "eval" in programs:
            return programs["eval"][0]
        last = max(programs, key=lambda name: int(name.split("/")[0][len("stage") :]))  # the model's last stage
        return programs[last][0]

    def eval_step(self, *batch: Tensor) -> Tensor:
        """The global mean loss on `batch`, forward only, in eval mode: its own traced program.

        The program is the model's loss traced in eval mode without a backward, rewritten by the
        same passes (ZeRO gathers, tensor parallelism, ...) and run on every rank's current state;
        nothing is updated. One program is kept per batch shape (Config.max_batch_shapes).
        """
        self._check_batch(batch, "eval_step")
        if not self._can_eval:
            raise RuntimeError("eval_step needs the engine built by shardfx.compile_distributed")
        programs = self._eval_programs.get(batch, self._splits)
        if self._pipeline:  # every stage's forward: the runtime takes them all
            return self.runtime.evaluate(programs, self._split(batch)).float()
        return self.runtime.evaluate(programs["eval"][1], self._split(batch)).float()

    # --- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        """Full, unpadded tensors under the keys of model.state_dict()."""
        return self.runtime.state_dict()

    def save_checkpoint(self, path: str, client_state: dict[str, Any] | None = None) -> None:
        """Write model, optimizer, scheduler, step, data position, RNG and `client_state` (JSON) to the folder `path`.

        Atomic (see shardfx.runtime.checkpoint). Call at an optimizer-step boundary; under the
        distributed runtime every rank calls it.
        """
        if self._phase != "idle" or self.micro_steps % self.config.grad_accum_steps:
            raise RuntimeError(
                f"save_checkpoint at an optimizer-step boundary; {self.micro_steps % self.config.grad_accum_steps} "
                f"of {self.config.grad_accum_steps} micro-batches have run (state: {self._phase})"
            )
        scheduler = self._states[0].scheduler
        meta = {
            "world_size": self.program.mesh.world_size,
            "zero_stage": self.config.zero_stage,
            "steps": self.steps,
            "micro_steps": self.micro_steps,
            "grad_accum_steps": self.config.grad_accum_steps,
            "samples": self.samples,
            "skipped_steps": self.skipped_steps,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "client_state": client_state or {},
        }
        if self.loss_scaler is not None:
            meta["loss_scaler"] = self.loss_scaler.state_dict()
        checkpoint.save(path, self.runtime, meta)

    def load_checkpoint(self, path: str, *, load_rng: bool = True) -> dict[str, Any]:
        """Resume from a checkpoint folder (any world size or ZeRO stage); returns its client_state."""
        if self._phase != "idle":
            raise RuntimeError(f"load_checkpoint between steps; state: {self._phase}")
        meta = checkpoint.load(path, self.runtime)
        for state in self._states:
            state.zero_grad()
            if meta["scheduler"] is not None and state.scheduler is not None:
                state.scheduler.load_state_dict(meta["scheduler"])
        # Saved at an optimizer-step boundary; this engine may accumulate over another number of
        # micro-batches, so count its micro-batches in its own steps (the next one starts a step).
        self.steps = meta["steps"]
        self.micro_steps = self.steps * self.config.grad_accum_steps
        self._nonfinite.forget()
        self.samples, self.skipped_steps = meta["samples"], meta["skipped_steps"]
        if self.loss_scaler is not None and "loss_scaler" in meta:  # else: a checkpoint of an fp32/bf16 run
            self.loss_scaler.load_state_dict(meta["loss_scaler"])
            self._set_loss_scale()
        if load_rng:
            set_rng_state(meta["rng"])
        return meta["client_state"]

    def stats(self, rank: int = 0) -> dict[str, Any]:
        """Per-rank bytes held between steps (params, grads, optimizer state), the bytes of the gradient
        accumulators a rank holds while accumulating (0 when nothing is deferred), the collectives of
        the last optimizer step (all its micro-batches), and step counters."""
        accumulators = max((p.placeholders_of(GRAD_ACC) for p in self.programs().values()), key=len)
        accumulators = [n.meta["val"] for n in accumulators]
        return {
            "memory": self.runtime.memory(rank),
            "grad_accum_bytes": sum(v.numel() * v.element_size() for v in accumulators),
            "comm": self.runtime.comm_stats(rank),
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "grad_norm": self.last_grad_norm,
            "lr": self.get_lr(),
            "loss_scale": None if self.loss_scaler is None else self.loss_scaler.scale,
            "compiled_shapes": len(self._programs),
            "plan": self.program.notes.get(PLAN),  # Config(plan="auto"): what the planner chose (Plan.as_dict)
        }

    # --- batches ----------------------------------------------------------------------------------

    def _check_batch(self, batch: tuple[Any, ...], verb: str) -> None:
        """Each element a tensor of the dtype and on the device the step was compiled for, with rows to split
        (a new shape is compiled: program_cache). A dtype the program was not traced with would fail inside
        the generated code (or, recompiled, compute in another precision than the model's)."""
        if len(batch) != self._arity:
            raise TypeError(
                f"{verb} got {len(batch)} tensors; the step was compiled for {self._arity}: "
                f"{_describe(self._compiled_for)}"
            )
        for i, x in enumerate(batch):
            shape, dtype, device = self._compiled_for[i]
            compiled = f"the step was compiled for {list(shape)} {dtype} on {device}"
            if not isinstance(x, Tensor):
                raise TypeError(
                    f"{verb}: batch[{i}] has type {type(x).__name__}, not a tensor; {compiled}: "
                    f"pass torch.as_tensor(batch[{i}], dtype={dtype})"
                )
            if x.dtype != dtype:
                raise TypeError(
                    f"{verb}: batch[{i}] is {list(x.shape)} {x.dtype}; {compiled}: pass batch[{i}].to({dtype}), "
                    "or compile again with example_inputs of that dtype"
                )
            if x.device.type != device:
                raise ValueError(f"{verb}: batch[{i}] is on {x.device}; {compiled}: pass batch[{i}].to({device!r})")
            rows, first = (x.shape[0] if x.dim() else 0), self._compiled_for[0][0][0]
            if i and batch[0].dim() and rows * first != batch[0].shape[0] * shape[0]:
                # each rank takes its slice of every element: rows that do not scale together pair
                # one sample's input with another's target, and broadcasting can hide it
                raise ValueError(
                    f"{verb}: batch[{i}] has {rows} rows (dim 0) and batch[0] {batch[0].shape[0]}; the step was "
                    f"compiled for {shape[0]} and {first}: give every element the same samples, in the rows it was "
                    "compiled with"
                )
            if x.dim() == 0 or x.shape[0] == 0:
                what = "a scalar" if x.dim() == 0 else f"{list(x.shape)}: no rows"
                raise ValueError(
                    f"{verb}: batch[{i}] is {what}; {compiled}: every element needs rows on dim 0 "
                    f"(a multiple of {self._splits * (self.config.grad_accum_steps if verb == 'train_step' else 1)})"
                )

    def _select_program(self, batch: tuple[Tensor, ...]) -> dict[str, tuple[DistProgram, Executor]]:
        """The step's variants compiled for this batch shape (compiled now if new: program_cache)."""
        return self._programs.get(batch, self._splits, self._same_sharding)

    def _same_sharding(self, programs: dict[str, DistProgram]) -> None:
        """A new batch shape's programs must shard the parameters as the state the ranks hold."""
        held = {name: program for name, (program, _) in self._programs.latest().items()}
        for name, p in programs.items():
            ref = held.get(name, self.program)
            if p.shard_specs != ref.shard_specs or p.tp_specs != ref.tp_specs:
                raise RuntimeError("recompiling for a new batch shape changed how parameters are sharded")
            stages = [q.notes.get(PIPELINE, {}).get("holders") for q in (p, ref)]
            if stages[0] != stages[1]:
                raise RuntimeError(
                    "recompiling for a new batch shape changed which pipeline stage holds which parameter"
                )

    def _use(self, program: DistProgram, executor: Executor) -> None:
        self.program = program
        self.runtime.use(program, executor)

    def _split(self, batch: tuple[Tensor, ...]) -> list[tuple[Tensor, ...]]:
        """Rank r gets the dim-0 slice of its data-parallel coordinate (tp ranks share a slice)."""
        mesh = self.program.mesh
        dp = mesh.size("dp")
        # contiguous: the program was traced on contiguous slices (its views assume their strides)
        chunks = [[c.contiguous() for c in torch.chunk(x, dp, dim=0)] for x in batch]
        return [tuple(c[mesh.coords(r)["dp"]] for c in chunks) for r in range(mesh.world_size)]


def _describe(compiled: list[tuple[tuple[int, ...], torch.dtype, str]]) -> str:
    return "(" + ", ".join(f"{list(shape)} {dtype}" for shape, dtype, _ in compiled) + ")"
