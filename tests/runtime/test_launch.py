"""shardfx's launcher: what it listens on, and how a job ends when a worker hangs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from shardfx.runtime.launch import WorkerFailed, launch
from tests.runtime import dist_workers

pytestmark = [
    pytest.mark.multiproc,
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the socket table from /proc"),
]


def test_every_listening_socket_is_on_loopback() -> None:
    listeners = launch(dist_workers.listening_sockets, (), 2, timeout=60)[0]
    assert listeners, "the launcher's store listens somewhere; the table shows nothing"
    assert all(a.startswith(("127.0.0.1:", "::1:")) for a in listeners), listeners


def test_a_stopped_worker_ends_the_job_within_the_timeout_naming_it(tmp_path) -> None:
    timeout = 10
    stamp = tmp_path / "stopped_at"
    with pytest.raises(WorkerFailed) as failed:
        launch(dist_workers.stop_rank_mid_training, (1, str(stamp)), 2, timeout=timeout)
    after_stop = time.time() - float(stamp.read_text())
    message = str(failed.value)
    assert message.startswith("rank 1 did not arrive at all_reduce at node "), message
    assert "stopped (SIGSTOP" in message and "rank 0 waited there" in message, message
    assert timeout <= after_stop < timeout + 8, after_stop  # the collective timeout, then a few seconds


def test_a_wait_past_the_timeout_ends_the_job_even_without_a_backend_timeout() -> None:
    timeout = 2
    start = time.monotonic()
    with pytest.raises(WorkerFailed) as failed:
        launch(dist_workers.wait_alone, (120,), 2, timeout=timeout)
    message = str(failed.value)
    assert message.startswith("rank 1 did not arrive at all_reduce at node fake_all_reduce (blocks.0) within the 2 s")
    assert "it is still running" in message, message
    assert time.monotonic() - start < 60  # not the 120 s the ranks sleep


def test_the_rank_that_raised_is_named_not_the_one_that_waited_for_it() -> None:
    with pytest.raises(WorkerFailed) as failed:
        launch(dist_workers.raise_on_rank_1, (), 2, timeout=20)
    assert str(failed.value) == "rank 1 failed: ValueError: batch has 3 rows, expected 4"  # the headline
    assert "hint: pass --batch-size 4" in failed.value.tracebacks[1]


def test_a_rank_that_returned_early_is_named_with_the_collective_left_waiting() -> None:
    with pytest.raises(WorkerFailed) as failed:
        launch(dist_workers.rank_1_returns_early, (), 2, timeout=4)
    message = str(failed.value)
    assert message.startswith("rank 0 waited at all_reduce at node ar_2 (root) for rank(s) 1, which had already "), (
        message
    )
