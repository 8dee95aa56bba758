"""Every benchmark runs, in a tiny mode: a benchmark nothing runs rots.

The figures a tiny run prints mean nothing; each test checks only that the
script finishes and prints its table, with the rows it was asked for.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str, timeout: float = 240, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_compile_time() -> None:
    out = run("compile_time.py", "--layers", "1", "--stages", "0,3", "--seq", "32", "--world-size", "2", "--batch", "2")
    rows = [line for line in out.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 2, out


def test_recompute_vs_torch() -> None:
    out = run(
        "recompute_vs_torch.py", "--layers", "1", "--seq", "32", "--batch", "2", "--budgets", "0.8",
        "--torch-budgets", "1.0,0.5",
    )  # fmt: skip
    assert "| full |" in out and "| selective |" in out and "torch min-cut" in out, out


def test_triton_regions_static() -> None:
    out = run(
        "triton_regions.py", "--static", "--no-inductor", "--layers", "1", "--d-model", "64", "--seq", "32",
        "--vocab", "128", "--batch", "2", "--heads", "2", env={"TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert "kernels per step:" in out and "fused regions" in out, out


@pytest.mark.multiproc
def test_zero_vs_fsdp2() -> None:
    out = run(
        "zero_vs_fsdp2.py", "--tiny", "--world-sizes", "2", "--steps", "1", "--batch", "4",
        "--only", "FSDP2 reshard,shardfx ZeRO-3",
    )  # fmt: skip
    for row in ("| DDP |", "| FSDP2 reshard |", "| shardfx ZeRO-3 |"):
        assert row in out, out


@pytest.mark.multiproc
def test_planner_sweep() -> None:
    out = run("planner_sweep.py", "--tiny", "--world-sizes", "2", "--steps", "1", "--warmup", "1", "--batch", "4")
    assert "| **planner pick**:" in out and "fastest measured fit:" in out and "planner compile time" in out, out
    assert out.count("| ZeRO-") >= 12, out


@pytest.mark.multiproc
def test_grad_accumulation() -> None:
    out = run(
        "grad_accumulation.py", "--tiny", "--steps", "1", "--accum", "2", "--batch", "4",
        "--only", "shardfx ZeRO-2 boundary",
    )  # fmt: skip
    assert "| DDP no_sync |" in out and "| shardfx ZeRO-2 boundary |" in out, out


def test_tp_vs_torch() -> None:
    out = run("tp_vs_torch.py", "--tiny", "--tp-sizes", "2", "--steps", "1", "--warmup", "1")
    assert "| torch TP |" in out and "| shardfx tp |" in out and "| shardfx tp+SP |" in out, out
    assert "MISMATCH" not in out, out


@pytest.mark.multiproc
def test_pipeline_vs_torch() -> None:
    out = run(
        "pipeline_vs_torch.py", "--tiny", "--pp-sizes", "2", "--microbatches", "2", "--steps", "1", "--warmup", "1"
    )
    for row in ("| torch GPipe |", "| shardfx gpipe |", "| torch 1F1B |", "| shardfx 1f1b |", "| shardfx 1f1b even |"):
        assert row in out, out


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    """The one GPU run must not be spent on a typo: every step but the regions (test_triton_regions_static
    runs that mode) at tiny sizes on CPU, kernels in Triton's interpreter."""
    out = run("gpu_check.py", "--dry-run", "--out", str(tmp_path), "--only", "env,tests,steps,ops")
    summary = (tmp_path / "summary.md").read_text()
    assert "FAILED" not in summary, summary + "".join(p.read_text() for p in tmp_path.glob("*.error.txt"))
    assert [line.split("|")[1].strip() for line in summary.splitlines()[4:]] == ["env", "tests", "steps", "ops"], out
    assert "tests collected" in (tmp_path / "tests.txt").read_text()
    for name in ("env.json", "steps.json", "ops.json", "calibrated_profile.json"):
        assert (tmp_path / name).stat().st_size > 0, name
