"""Ctrl-C in `shardfx train`, and user errors the command refuses before any worker starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from shardfx.tools.cli import main


@pytest.mark.multiproc
@pytest.mark.parametrize("runtime", ["process", "local"])
def test_ctrl_c_stops_at_a_step_saves_and_exits_130(tmp_path, runtime: str) -> None:
    argv = [sys.executable, "-m", "shardfx.tools.cli", "train", "--world-size", "2", "--preset", "tiny"]
    argv += ["--runtime", runtime, "--steps", "100000", "--batch-size", "4", "--no-progress", "--log-every", "1"]
    argv += ["--save-every", "100000", "--checkpoint-dir", str(tmp_path), "--timeout", "30"]
    # its own session: the SIGINT goes to the job's whole process group, as a terminal's Ctrl-C does
    job = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert job.stdout is not None
        for line in job.stdout:
            if line.startswith("step"):  # training is under way
                break
        os.killpg(job.pid, signal.SIGINT)
        pressed = time.monotonic()
        out, err = job.communicate(timeout=90)
    finally:
        job.kill()
    assert job.returncode == 130, err[-2000:]
    assert time.monotonic() - pressed < 30
    last = err.strip().splitlines()[-1]
    assert last.startswith("shardfx train: interrupted at step "), err[-2000:]
    step = int(last.split("interrupted at step ")[1].split(";")[0])
    assert step >= 1 and f"checkpoint {tmp_path / f'step-{step:06d}'}" in last
    assert (tmp_path / "latest").read_text().strip() == f"step-{step:06d}"
    assert "Traceback" not in err and "leaked" not in err, err[-2000:]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "n_layer=abc"], "GPTConfig n_layer must be an integer >= 1; got 'abc' (str)"),
        (["--set", "bias=1"], "GPTConfig bias must be True or False; got 1 (int)"),
        (["--json", "/proc/no/such.json"], "--json /proc/no/such.json: cannot write there"),
        (["--json", "/"], "--json /: is a directory"),
        (["--dump-dir", "/proc/no-dir"], "--dump-dir /proc/no-dir: cannot write there"),
        (["--checkpoint-dir", "/dev/null", "--save-every", "1"], "--checkpoint-dir /dev/null: exists and is not a dir"),
    ],
)
def test_user_errors_are_one_line_before_training(capsys, args: list[str], expected: str) -> None:
    code = main(["train", "--runtime", "local", "--world-size", "2", "--preset", "tiny", "--steps", "1", *args])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2
    assert err.startswith("shardfx train: error: ") and expected in err and "\n" not in err, err
    assert "compiling" not in captured.out  # refused before the model is compiled
