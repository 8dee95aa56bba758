"""A launched gloo job on a CPU calibrates the cost model once per machine and rank count."""

from __future__ import annotations

import json

import pytest
import torch

from shardfx.graphs import cost_model
from shardfx.runtime.launch import launch
from tests.runtime import dist_workers

pytestmark = pytest.mark.multiproc


def test_the_first_job_at_a_rank_count_measures_the_machine_and_later_ones_reuse_it(tmp_path, monkeypatch) -> None:
    path = tmp_path / "hardware.json"
    monkeypatch.setenv("SHARDFX_HARDWARE_FILE", str(path))  # the workers' cost model reads this file
    monkeypatch.setenv("SHARDFX_CALIBRATE", "1")  # the suite turns it off elsewhere (tests/conftest.py)
    results = launch(dist_workers.compile_calibrating_twice, (), 2, timeout=240)
    first, second = results[0]["printed"]
    assert len(first) == 2 and first[0].startswith("shardfx: measuring this machine for the cost model at 2 ranks")
    assert str(path) in first[0] and first[1].startswith("shardfx: measured in ")
    assert second == [] and results[1]["printed"] == [[], []]  # rank 0 speaks; the second compile measures nothing
    saved = json.loads(path.read_text())
    assert saved["machine"] == cost_model.machine_id() and [p["ranks"] for p in saved["profiles"]] == [2]
    profile = results[0]["profile"]  # what the second compile planned on: the saved calibration
    assert profile.source == "calibrated on this machine by a 2-rank job" == results[1]["profile"].source
    assert profile.alpha > 0 and profile.link_bw > 0 and profile.fp32_flops > 0 and profile.mem_bw > 0
    assert profile.attention_flops > 0 and profile.skew < 1.0  # the slowest rank less than twice the mean's
    first_draws, second_draws = results[0]["draws"]  # measuring drew from no generator of the job's
    assert torch.equal(first_draws, second_draws)
