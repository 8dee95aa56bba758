"""Every subcommand compiles through the one driver: a Config means the same mesh everywhere.

Before the driver the tools built Mesh.of(dp=world_size) themselves, so
`shardfx passes gpt --world-size 4 --config tp_size=2` failed with
KeyError: "mesh has no axis 'tp'".
"""

from __future__ import annotations

import json

import pytest

from shardfx.tools.cli import main
from tests.fixtures import run_cli

TP = ["gpt", "--preset", "tiny", "--set", "bias=False", "--world-size", "4", "--config", "tp_size=2", "--no-progress"]


@pytest.mark.parametrize("zero", ["0", "3"])
def test_passes_with_tp_shows_the_tp_and_dp_collectives(zero: str, tmp_path) -> None:
    path = tmp_path / "rows.json"
    code, out, err = run_cli(["passes", *TP, "--zero", zero, "--json", str(path)])
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(path.read_text())}
    # 2 per block each way, 2 blocks; the vocab: the embedding and 3 in the loss forward, 2 backward
    assert rows["tensor_parallel"]["collectives"] == {"all_reduce": 8 + 4 + 2}
    last = rows["grad_norm"]["collectives"]
    if zero == "3":
        assert last["all_gather"] > 0 and last["reduce_scatter"] > 0
    else:
        assert "all_gather" not in last and last["all_reduce"] > 14


@pytest.mark.parametrize("zero", ["0", "3"])
def test_bisect_with_tp_matches_eager_at_every_stage(zero: str) -> None:
    code, out, err = run_cli(["bisect", *TP, "--zero", zero])
    assert code == 0, out + err
    assert "tensor_parallel" in out and "no divergence" in out


def test_viz_with_tp_and_zero3(tmp_path) -> None:
    out = tmp_path / "program.html"
    assert main(["viz", *TP, "--zero", "3", "-o", str(out)]) == 0
    assert "shardfx.all_gather" in out.read_text()


def test_estimate_simulates_the_tp_mesh(capsys) -> None:
    argv = ["estimate", "--model", "gpt", "--preset", "tiny", "--world-size", "4", "--tp", "2", "--simulate", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ZeRO-3 x tp2 " in out and "ZeRO-3 x tp2 + bucket" in out


def test_a_world_size_tp_does_not_divide_is_one_line(capsys) -> None:
    assert main(["passes", "gpt", "--preset", "tiny", "--world-size", "3", "--config", "tp_size=2"]) == 2
    assert "world size 3 is not a multiple of Config.tp_size=2" in capsys.readouterr().err


def test_disabling_accumulate_gradients_reduces_every_micro_batch(tmp_path) -> None:
    """A pass of another pipeline may be disabled: without accumulate_gradients every micro-batch reduces
    its own gradients and the last adds the kept sum in (sum_gradients), so the norm covers the step."""
    path = tmp_path / "rows.json"
    argv = ["passes", "mlp", "--config", "grad_accum_steps=2", "--disable", "accumulate_gradients", "--no-progress"]
    code, out, err = run_cli([*argv, "--json", str(path)])
    assert code == 0, err
    names = [r["name"] for r in json.loads(path.read_text())]
    assert "sum_gradients" in names and "accumulate_gradients" not in names


def test_passes_prints_the_tensor_parallel_plan() -> None:
    code, out, err = run_cli(["passes", *TP])
    assert code == 0, err
    assert "tensor-parallel plan: 8 of 8 Linear layers split (100% of their bytes); vocab split (64 classes)" in out
    row = next(line for line in out.splitlines() if line.startswith("blocks.0.attn.qkv "))
    assert "colwise" in row and "6.0 KiB/12.0 KiB" in row and "into blocks.0.attn.proj (3 parts)" in row


def test_estimate_reports_what_the_plan_holds() -> None:
    code, out, err = run_cli(["estimate", "--model", "gpt", "--preset", "tiny", "--world-size", "4", "--tp", "2"])
    assert code == 0, err
    assert "tensor-parallel plan at tp=2" in out and "rank 0 holds 14.5K of 28K parameters" in out
