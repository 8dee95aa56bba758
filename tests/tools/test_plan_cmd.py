"""`shardfx plan`: the table of the chosen plan and its alternatives, --help, memory units, errors."""

from __future__ import annotations

import argparse
import json

import pytest

from shardfx.tools.plan_cmd import memory_bytes
from tests.fixtures import run_cli

TINY = ["plan", "gpt", "--preset", "tiny", "--world-size", "2"]


def test_prints_the_plan_and_the_alternatives(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "plan.json"
    code, out, err = run_cli(
        [*TINY, "--memory", "1MiB", "--hardware", "h100", "--alternatives", "2", "--json", str(path)]
    )
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if "configuration" in line and "step ms" in line)
    assert "peak" in lines[header] and "communication" in lines[header]
    assert lines[header + 1].startswith("->")  # the chosen plan heads the table
    assert lines[1].startswith("plan: ") and "h100 profile" in lines[1]
    record = json.loads(path.read_text())
    assert record["hardware"] == "h100" and record["chosen"]["fits"]
    assert record["chosen"]["peak_bytes"] <= 2**20


def test_an_impossible_memory_is_a_usage_error() -> None:
    code, out, err = run_cli([*TINY, "--memory", "1KB", "--keep", "tp_size", "--keep", "pp_size"])
    assert code == 2 and "smallest simulated peak found is" in err, out + err


def test_help() -> None:
    code, out, _ = run_cli(["plan", "--help"])
    assert code == 0 and "--memory" in out and "--world-size" in out and "--hardware" in out


def test_memory_units() -> None:
    assert memory_bytes("80GB") == 80e9
    assert memory_bytes("512MiB") == 512 * 2**20
    assert memory_bytes("1.5e9") == 1.5e9
    for bad in ("80 parsecs", "-1GB", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            memory_bytes(bad)
