"""The main job when a worker dies: every rank stops, and `shardfx train` exits non-zero naming the rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiproc


def _workers(parent: int) -> list[int]:
    """Worker processes started by `parent` through multiprocessing's spawn."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"multiprocessing.spawn" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the worker processes through /proc")
def test_a_killed_worker_stops_the_main_job_naming_the_rank() -> None:
    argv = [sys.executable, "-m", "shardfx.tools.cli", "train", "--world-size", "2", "--preset", "tiny"]
    argv += ["--steps", "100000", "--batch-size", "4", "--no-progress", "--timeout", "30"]
    job = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(_workers(job.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = _workers(job.pid)
        assert len(workers) == 2, "the job did not start its 2 workers"
        time.sleep(8)  # into the training loop (compile takes a few seconds)
        os.kill(workers[-1], signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = job.communicate(timeout=60)
    finally:
        job.kill()
    assert time.monotonic() - killed_at < 40
    assert job.returncode == 1
    assert "worker failed: rank" in err and "SIGKILL" in err, err[-2000:]
    assert "Traceback" not in err and "leaked" not in err, err[-2000:]  # one line, no noise after it
    assert not _workers(job.pid)
