"""Scale on paper: compile a built-in model for a world size this machine cannot run and simulate it.

The model is built and traced on the meta device (no memory, any size), the
pipeline runs for `world_size` data-parallel ranks, and the cost model
(shardfx.graphs.cost_model) simulates one rank's step on named hardware.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

import shardfx
from shardfx.graphs.capture import capture
from shardfx.graphs.cost_model import Simulation, hardware, simulate
from shardfx.graphs.program import DistProgram, Mesh
from shardfx.models import build_model
from shardfx.passes.manager import PassContext, run_passes
from shardfx.passes.pipeline import pipeline


@dataclass
class Scenario:
    name: str
    config: shardfx.Config


def compile_on_meta(
    model_name: str, kwargs: dict[str, Any], world_size: int, local_batch: int, config: shardfx.Config
) -> DistProgram:
    with torch.device("meta"):
        model, loss_fn, _ = build_model(model_name, **kwargs)
        example = _meta_batch(model, local_batch)
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" else None
    with warnings.catch_warnings():  # meta tensors: torch warns that some kernels lack autograd registrations
        warnings.simplefilter("ignore", UserWarning)
        cap = capture(model, example, loss_fn, dtype)
    mesh = Mesh.of(dp=world_size)
    program = DistProgram(cap.gm, cap.signature, mesh, cap.fake_mode)
    program, _ = run_passes(program, pipeline(config, mesh), PassContext(config))
    return program


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
