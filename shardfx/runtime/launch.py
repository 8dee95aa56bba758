"""Start N worker processes through torch's own elastic launcher (what torchrun uses).

Rendezvous binds to 127.0.0.1 unless told otherwise. Each worker joins a gloo
(or NCCL, on CUDA) process group with the given timeout, runs `fn(*args)`, and
its return value comes back to the caller by rank. If one worker fails, the
launcher stops the others and this raises WorkerFailed naming the rank.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class WorkerFailed(RuntimeError):
    """A worker process failed; the message names its rank and what it said."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _worker(fn: Callable[..., Any], args: tuple[Any, ...], timeout: float, backend: str) -> Any:
    # N processes on one machine: share its cores instead of each taking all of them.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    try:
        return fn(*args)
    finally:
        dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    nprocs: int,
    *,
    timeout: float = 60.0,
    host: str = "127.0.0.1",
    backend: str | None = None,
    quiet: bool = True,
) -> dict[int, Any]:
    """Run fn(*args) on `nprocs` ranks; returns {rank: return value}. fn must be importable (module level)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nprocs,
        run_id=f"shardfx-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"{host}:{free_port(host)}",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
        local_addr=host,
    )
    if quiet:
        os.environ.setdefault("LOGLEVEL", "ERROR")
        import logging

        # The launcher logs each failed worker's traceback; WorkerFailed carries the message instead.
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
        logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    try:
        return elastic_launch(config, _worker)(fn, args, timeout, backend)
    except ChildFailedError as exc:
        raise WorkerFailed(_describe_failure(exc)) from None


def _describe_failure(exc: Any) -> str:
    lines = []
    for rank, failure in sorted(exc.failures.items()):
        message = ""
        data = getattr(failure, "error_file_data", None) or {}
        msg = data.get("message") if isinstance(data, dict) else None
        if isinstance(msg, dict):
            message = msg.get("message", "")
        elif isinstance(msg, str):
            message = msg
        if not message or message.strip() == "<NONE>":  # killed: no error file was written
            message = f"exit code {failure.exitcode}" + (
                f" (signal {failure.signal_name()})" if failure.exitcode < 0 else ""
            )
        lines.append(f"rank {rank} failed: {message.strip().splitlines()[-1] if message.strip() else message}")
    return "; ".join(lines) if lines else str(exc)
