"""A model compiled on paper (fake tensors: tools/simulate.build_on_paper) is the program compiled on real ones.

`shardfx estimate --simulate` and the estimate's tp and pp rows compile on paper so that any size fits.
On the meta device the capture was another program: torch's export took the untied head for the
embedding (meta tensors of one shape), and the joint graph had no gradients; the example batch was
also one tensor passed as both tokens and targets.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

import shardfx
from shardfx.driver import build_mesh, compile_step
from shardfx.graphs import collectives, cost_model
from shardfx.graphs.analysis import memory_timeline
from shardfx.graphs.cost_model import hardware, simulate
from shardfx.graphs.signature import GRAD
from shardfx.models import build_model
from shardfx.tools.cli import main
from shardfx.tools.simulate import Scenario, _example_batch, compile_on_paper, simulate_scenarios

GPT = {"vocab_size": 64, "n_layer": 2, "d_model": 32, "n_head": 2, "seq_len": 16, "tie_weights": False}


def _on_cpu(config: shardfx.Config, world_size: int, local_batch: int) -> shardfx.graphs.program.DistProgram:
    mesh = build_mesh(config, world_size)
    model, loss_fn, _ = build_model("gpt", **GPT)
    return compile_step(model, _example_batch(model, local_batch * mesh.size("dp")), loss_fn, config, mesh).program


def _shape(program) -> tuple:
    """What the program does, op by op, with each value's shape: equal for equal programs."""
    rows = []
    for n in program.graph.nodes:
        val = n.meta.get("val")
        rows.append((n.op, str(n.target), tuple(val.shape) if isinstance(val, torch.Tensor) else None))
    return tuple(rows)


@pytest.mark.parametrize(
    "config",
    [
        shardfx.Config(zero_stage=3, hardware="cpu"),
        shardfx.Config(zero_stage=0, mixed_precision="bf16", hardware="cpu"),
        shardfx.Config(zero_stage=2, tp_size=2, hardware="cpu"),
    ],
    ids=["zero3", "zero0-bf16", "zero2-tp2"],
)
def test_a_program_compiled_on_paper_is_the_one_compiled_on_real_tensors(config) -> None:
    paper = compile_on_paper("gpt", GPT, 4, 2, config)
    real = _on_cpu(config, 4, 2)
    grads = [o.target for o in paper.signature.outputs if o.role == GRAD]
    assert len(grads) == sum(1 for _ in build_model("gpt", **GPT)[0].parameters())  # every parameter's gradient
    assert paper.signature.outputs == real.signature.outputs
    assert _shape(paper) == _shape(real)
    kinds = Counter(collectives.kind(n) for n in paper.graph.nodes if collectives.is_collective(n))
    assert kinds == Counter(collectives.kind(n) for n in real.graph.nodes if collectives.is_collective(n))
    a, b = simulate(paper, hardware("cpu")), simulate(real, hardware("cpu"))
    assert (a.step_seconds, a.peak_bytes, a.flops) == (b.step_seconds, b.peak_bytes, b.flops)


def test_estimate_simulate_reports_the_memory_timeline_peak_of_the_program(capsys, monkeypatch) -> None:
    monkeypatch.setattr(cost_model, "_calibrations", lambda: [])  # the built-in profile, whatever ran before
    sets = [arg for k, v in GPT.items() if k != "tie_weights" for arg in ("--set", f"{k}={v}")]
    argv = ["estimate", "--model", "gpt", *sets, "--set", "tie_weights=False", "--world-size", "2"]
    assert main([*argv, "--batch", "2", "--simulate", "cpu"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("ZeRO-3 default"))
    peak_mib = float(row.split()[-1])
    planned = _on_cpu(shardfx.Config(zero_stage=3, hardware="cpu"), 2, 2)
    assert peak_mib == round(memory_timeline(planned).peak / 2**20, 1)
    # in bytes too, on the scenario the command prints (its table rounds to 0.1 MiB)
    default = Scenario("default", shardfx.Config(zero_stage=3, hardware="cpu"))
    ((_, sim),) = simulate_scenarios("gpt", GPT, 2, 2, "cpu", [default])
    assert sim.peak_bytes == memory_timeline(planned).peak
    unplanned = next(line for line in out.splitlines() if line.startswith("ZeRO-3 unplanned"))
    steps = [float(re.split(r"\s{2,}", line.strip())[1]) for line in (unplanned, row)]
    assert steps[1] < steps[0]  # the planned buckets and prefetch hide communication the unplanned step waits on
