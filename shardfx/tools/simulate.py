"""Scale on paper: compile a built-in model for a world size this machine cannot run and simulate it.

The model is built and traced on paper: under a FakeTensorMode (shapes and dtypes,
no memory, any size; not on the meta device, where torch's export takes meta
tensors of one shape for one tensor and the joint graph has no backward). The compile
driver runs the pipeline for `world_size` ranks (dp x tp as the Config says), and
the cost model (shardfx.graphs.cost_model) simulates one rank's step on named
hardware.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import shardfx
from shardfx.driver import build_mesh, compile_step
from shardfx.graphs.cost_model import Simulation, hardware, simulate
from shardfx.graphs.program import DistProgram
from shardfx.graphs.signature import PARAM
from shardfx.models import build_model
from shardfx.passes.pipeline import schedule


@dataclass
class Scenario:
    name: str
    config: shardfx.Config


def build_on_paper(model_name: str, kwargs: dict[str, Any], batch: int) -> tuple[Any, Any, tuple[torch.Tensor, ...]]:
    """(model, loss_fn, example batch of `batch` rows) of a built-in model as fake tensors: shapes and
    dtypes, no memory. The meta device will not do: torch 2.13's export takes two meta tensors of one
    shape for one tensor (an untied head became the embedding) and the joint graph of meta parameters
    has no gradients."""
    with FakeTensorMode():
        model, loss_fn, _ = build_model(model_name, **kwargs)
        return model, loss_fn, _example_batch(model, batch)


def compile_on_paper(
    model_name: str, kwargs: dict[str, Any], world_size: int, local_batch: int, config: shardfx.Config
) -> DistProgram:
    """The step's last program for `world_size` ranks (every mesh axis of `config`), compiled through
    the compile driver with the model and a batch of `local_batch` rows per dp rank built on paper
    (build_on_paper): the program compile_distributed would run, without its memory."""
    mesh = build_mesh(config, world_size)
    model, loss_fn, example = build_on_paper(model_name, kwargs, local_batch * mesh.size("dp"))
    last = schedule(config).micro_batches[-1]  # the plain step, or an accumulating step's last micro-batch
    return compile_step(model, example, loss_fn, config, mesh, variants=[last]).program


def _example_batch(model: torch.nn.Module, batch: int) -> tuple[torch.Tensor, ...]:
    """An example batch of the right shapes for the built-in models (its data is never read)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "seq_len"):  # GPT: (tokens, targets), (B, T) each
        tokens = torch.zeros(batch, config.seq_len, dtype=torch.long)  # (B, T)
        targets = torch.zeros(batch, config.seq_len, dtype=torch.long)  # (B, T), a tensor of its own
        return tokens, targets
    first, last = model.layers[0], model.layers[-1]  # MLP: (x, y)
    return torch.zeros(batch, first.in_features), torch.zeros(batch, last.out_features)


def simulate_scenarios(
    model_name: str,
    kwargs: dict[str, Any],
    world_size: int,
    local_batch: int,
    hardware_name: str,
    scenarios: list[Scenario],
) -> list[tuple[Scenario, Simulation]]:
    hw = hardware(hardware_name)
    return [
        (s, simulate(compile_on_paper(model_name, kwargs, world_size, local_batch, s.config), hw)) for s in scenarios
    ]


def format_simulations(rows: list[tuple[Scenario, Simulation]], hardware_name: str) -> str:
    width = max([len("scenario")] + [len(scenario.name) for scenario, _ in rows])
    lines = [
        f"simulated step per rank on {hardware_name} ({hardware(hardware_name).source})",
        f"{'scenario':<{width}} {'step ms':>9} {'optimizer ms':>12} {'exposed comm':>13} {'peak MiB':>10}",
    ]
    for scenario, sim in rows:
        lines.append(
            f"{scenario.name:<{width}} {sim.step_seconds * 1e3:>9.1f} {sim.optimizer_seconds * 1e3:>12.1f} "
            f"{sim.exposed_comm_seconds * 1e3:>10.1f} ms {sim.peak_bytes / 2**20:>10.1f}"
        )
    lines.append(
        "step: the program (forward, backward, collectives); optimizer: Adam(W)'s update after it. peak: the "
        "step's live tensors per rank (parameters, gradients, activations, buffers: graphs.analysis.memory_timeline, "
        "as `shardfx passes` reports it); optimizer state not included"
    )
    return "\n".join(lines)


def tp_held_params(model_name: str, kwargs: dict[str, Any], tp: int) -> tuple[int, int]:
    """(rank 0's parameter count, the model's) under the tensor-parallel plan that compile_distributed
    would run at tp ranks (the same plan `shardfx passes --config tp_size=N` prints), built on paper."""
    config = shardfx.Config(tp_size=tp)
    mesh = build_mesh(config, tp)
    model, loss_fn, example = build_on_paper(model_name, kwargs, 1)
    program = compile_step(model, example, loss_fn, config, mesh, stop_after="tensor_parallel").program
    held = total = 0
    for spec, node in zip(program.signature.inputs, program.placeholders()):
        if spec.role == PARAM:
            held += node.meta["val"].numel()  # this rank's slice (the pass made every val local)
            shard = program.tp_specs.get(spec.name)
            total += int(torch.Size(shard.full_shape).numel()) if shard is not None else node.meta["val"].numel()
    return held, total


@dataclass
class StageRow:
    stage: int
    start: str  # the module the stage begins at
    params: int  # parameters it holds (a tied one on each holder)
    seconds: float  # the cost model's forward + backward seconds of one micro-batch
    saved_bytes: int  # activations kept from a micro-batch's forward to its backward
    alive: int  # micro-batches the schedule keeps alive at once on this stage


def pp_stage_rows(
    model_name: str, kwargs: dict[str, Any], pp: int, micro_batches: int, kind: str, batch: int = 1
) -> list[StageRow]:
    """Each stage of the pipeline compile_distributed would cut at pp stages (split_stages): what it
    holds, how long a micro-batch takes, what it keeps, for a batch of `batch` sequences per
    micro-batch. Built on paper (build_on_paper)."""
    from shardfx.graphs.phases import split_phases
    from shardfx.graphs.pp_schedule import alive_peak, stage_key, table

    config = shardfx.Config(pp_size=pp, pp_microbatches=micro_batches, pp_schedule=kind)
    mesh = build_mesh(config, pp)
    steps = table(kind, pp, micro_batches)
    model, loss_fn, example = build_on_paper(model_name, kwargs, batch * micro_batches)
    last = schedule(config).micro_batches[-1]
    names = [stage_key(s, last) for s in range(pp)]
    compiled = compile_step(model, example, loss_fn, config, mesh, variants=names, stop_after="split_stages")
    rows = []
    for s, name in enumerate(names):
        program = compiled.programs[name]
        plan = program.notes["pipeline"]
        held = sum(
            n.meta["val"].numel()
            for spec, n in zip(program.signature.inputs, program.placeholders())
            if spec.role == PARAM
        )
        rows.append(
            StageRow(
                s,
                plan["starts"][s] or "(input)",
                held,
                plan["seconds"][s],
                split_phases(program).saved_bytes,
                alive_peak(list(steps[s])),
            )
        )
    return rows


def format_stage_rows(rows: list[StageRow], micro_batches: int, kind: str) -> str:
    from shardfx.graphs.pp_schedule import bubble_fraction

    pp = len(rows)
    slowest = max(r.seconds for r in rows) or 1.0
    lines = [
        f"pipeline: {pp} stages, {micro_batches} micro-batches, {kind}; the bubble of equal stages is "
        f"(P-1)/(M+P-1) = {bubble_fraction(pp, micro_batches):.1%}",
        f"{'stage':>5}  {'begins at':<22} {'params':>10}  {'fwd+bwd':>9}  {'kept/micro':>10}  {'alive':>5}  {'kept':>9}",
    ]
    for r in rows:
        lines.append(
            f"{r.stage:>5}  {r.start:<22} {r.params:>10,}  {r.seconds * 1e3:>7.2f}ms  {r.saved_bytes / 2**20:>8.2f}Mi"
            f"  {r.alive:>5}  {r.saved_bytes * r.alive / 2**20:>7.2f}Mi"
        )
    balance = sum(r.seconds for r in rows) / pp / slowest
    lines.append(
        f"balance: mean stage time / slowest = {balance:.0%} (the cost model's estimate on the hardware profile)"
    )
    return "\n".join(lines)
