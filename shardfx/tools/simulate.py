"""Scale on paper: compile a built-in model for a world size this machine cannot run and simulate it.

The model is built and traced on the meta device (no memory, any size), the
compile driver runs the pipeline for `world_size` ranks (dp x tp as the Config
says), and the cost model
(shardfx.graphs.cost_model) simulates one rank's step on named hardware.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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


def compile_on_meta(
    model_name: str, kwargs: dict[str, Any], world_size: int, local_batch: int, config: shardfx.Config
) -> DistProgram:
    """The step's last program for `world_size` ranks (every mesh axis of `config`), compiled through
    the compile driver with the model and a batch of `local_batch` rows per dp rank on the meta device."""
    mesh = build_mesh(config, world_size)
    with torch.device("meta"):
        model, loss_fn, _ = build_model(model_name, **kwargs)
        example = _meta_batch(model, local_batch * mesh.size("dp"))
    last = schedule(config).micro_batches[-1]  # the plain step, or an accumulating step's last micro-batch
    return compile_step(model, example, loss_fn, config, mesh, variants=[last]).program


def _meta_batch(model: torch.nn.Module, batch: int) -> tuple[torch.Tensor, ...]:
    """An example batch of the right shapes for the built-in models (data is never read on meta)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "seq_len"):  # GPT: (tokens, targets), (B, T) each
        tokens = torch.zeros(batch, config.seq_len, dtype=torch.long)
        return tokens, tokens
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
        (s, simulate(compile_on_meta(model_name, kwargs, world_size, local_batch, s.config), hw)) for s in scenarios
    ]


def format_simulations(rows: list[tuple[Scenario, Simulation]], hardware_name: str) -> str:
    lines = [
        f"simulated step per rank on {hardware_name} ({hardware(hardware_name).source})",
        f"{'scenario':<30} {'step ms':>9} {'exposed comm':>13} {'peak GiB':>9}",
    ]
    for scenario, sim in rows:
        lines.append(
            f"{scenario.name:<30} {sim.step_seconds * 1e3:>9.1f} {sim.exposed_comm_seconds * 1e3:>10.1f} ms "
            f"{sim.peak_bytes / 2**30:>9.2f}"
        )
    lines.append(
        "peak: the step's live tensors per rank (parameters, gradients, activations, buffers); optimizer state not included"
    )
    return "\n".join(lines)


def tp_held_params(model_name: str, kwargs: dict[str, Any], tp: int) -> tuple[int, int]:
    """(rank 0's parameter count, the model's) under the tensor-parallel plan that compile_distributed
    would run at tp ranks (the same plan `shardfx passes --config tp_size=N` prints), on the meta device."""
    config = shardfx.Config(tp_size=tp)
    mesh = build_mesh(config, tp)
    with torch.device("meta"):
        model, loss_fn, _ = build_model(model_name, **kwargs)
        example = _meta_batch(model, 1)
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
    micro-batch. Built on the CPU: a capture on the meta device has no backward (torch 2.13's
    joint export returns no gradients for meta parameters), and the backward is half the cut's cost."""
    from shardfx.graphs.phases import split_phases
    from shardfx.graphs.pp_schedule import alive_peak, stage_key, table

    config = shardfx.Config(pp_size=pp, pp_microbatches=micro_batches, pp_schedule=kind)
    mesh = build_mesh(config, pp)
    steps = table(kind, pp, micro_batches)
    model, loss_fn, _ = build_model(model_name, **kwargs)
    example = _meta_batch(model, batch * micro_batches)
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
