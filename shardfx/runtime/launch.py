"""Start N worker processes on this machine, each one rank of a torch.distributed job.

This is shardfx's own launcher, not torch's elastic agent (whose two stores
listen on every interface). It holds:

- one TCPStore, in this process, on a socket bound to `host` (127.0.0.1 unless
  told otherwise); gloo and NCCL are told to use the loopback interface too, so
  with the default host nothing listens beyond this machine;
- N spawned workers. Each joins the process group with the given collective
  timeout, runs `fn(*args)` and sends its return value back. Workers ignore
  Ctrl-C (this process handles it) and die with this process;
- a board in shared memory where each worker notes the collectives it issues
  and the one it waits in (`DistComm` writes it). When a worker fails, exits,
  or waits in one collective past the timeout, the others are killed and
  WorkerFailed names the rank at fault: the one that died, raised, or did
  not arrive at the collective node the others wait in.

Ctrl-C: a job that polls `stop_requested(step)` at each step is asked to stop
at a step all ranks agree on (the launcher picks one no rank has started);
a second Ctrl-C, or a job that never polls, kills the workers and raises
KeyboardInterrupt.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import queue
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

WHERE_BYTES = 160  # a collective site's description, as the board keeps it
GRACE_S = 5.0  # past the collective timeout, a rank still waiting is declared hung
EXIT_S = 10.0  # how long a worker that sent its result may take to exit
SETTLE_S = 1.0  # after the first failure, how long to collect the others' before naming a cause


class WorkerFailed(RuntimeError):
    """A worker process failed; the message names its rank and what it said. `tracebacks`: each
    failed rank's traceback as it sent it (`shardfx --debug` prints them)."""

    def __init__(self, message: str, tracebacks: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.tracebacks = tracebacks or {}


class Board:
    """Shared memory between the launcher and its workers: per rank, the collective it issued last or
    waits in and since when, the step it runs; and the step everyone stops at (-1: none)."""

    def __init__(self, ctx: Any, nprocs: int) -> None:
        self.nprocs = nprocs
        self.waiting_since = ctx.Array("d", nprocs, lock=False)  # time.monotonic(); 0: not waiting
        self.where = ctx.Array("c", nprocs * WHERE_BYTES, lock=False)
        self.step = ctx.Array("q", [-1] * nprocs, lock=False)
        self.stop_at = ctx.Value("q", -1, lock=False)
        self.polled = ctx.Value("b", 0, lock=False)
        self.lock = ctx.Lock()

    def set_where(self, rank: int, text: str) -> None:
        data = _ENCODED.get(text)
        if data is None:  # a program has a fixed set of sites: each is encoded once
            data = _ENCODED[text] = text.encode("utf-8", "replace")[: WHERE_BYTES - 1] + b"\0"
        start = rank * WHERE_BYTES
        self.where[start : start + len(data)] = data

    def where_of(self, rank: int) -> str:
        raw = self.where[rank * WHERE_BYTES : (rank + 1) * WHERE_BYTES]
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


# This process's rank and the launcher's board, in a worker this launcher started (else None).
_board: Board | None = None
_rank = 0
_ENCODED: dict[str, bytes] = {}


def on_board() -> bool:
    """Whether this process is a worker of this launcher (DistComm skips the board otherwise)."""
    return _board is not None


def issued(where: str) -> None:
    """A collective was issued at `where`: the board's "last at" for this rank."""
    if _board is not None:
        _board.set_where(_rank, where)


@contextmanager
def waiting(where: str) -> Iterator[None]:
    """This rank blocks in the collective at `where` for the duration."""
    if _board is None:
        yield
        return
    _board.set_where(_rank, where)
    _board.waiting_since[_rank] = time.monotonic()
    try:
        yield
    finally:
        _board.waiting_since[_rank] = 0.0


def stop_requested(step: int) -> bool:
    """Called by every rank before it starts `step`: True when the user asked to stop (Ctrl-C) and
    every rank stops before this same step. Outside this launcher: False."""
    board = _board
    if board is None:
        return False
    with board.lock:
        board.polled.value = 1
        if 0 <= board.stop_at.value <= step:
            return True
        board.step[_rank] = step
        return False


def launch(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    nprocs: int,
    *,
    timeout: float = 60.0,
    host: str = "127.0.0.1",
    backend: str | None = None,
) -> dict[int, Any]:
    """Run fn(*args) on `nprocs` ranks; returns {rank: return value}. fn must be importable (module level)."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    ctx = mp.get_context("spawn")
    board = Board(ctx, nprocs)
    results = ctx.Queue()
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.bind((host, 0))
    listener.listen(max(64, nprocs * 4))
    port = listener.getsockname()[1]
    fd = listener.detach()  # the store owns (and closes) the socket from here
    store = dist.TCPStore(
        host,
        port,
        nprocs,
        is_master=True,
        timeout=timedelta(seconds=timeout),
        wait_for_workers=False,
        master_listen_fd=fd,
    )
    procs: list[Any] = []
    main = threading.current_thread() is threading.main_thread()  # signals are the main thread's only
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None  # workers ignore Ctrl-C
    try:
        for rank in range(nprocs):
            spec = _WorkerSpec(rank, nprocs, host, port, backend, timeout, os.getpid())
            proc = ctx.Process(target=_worker, args=(spec, board, results, fn, args), name=f"shardfx-rank{rank}")
            proc.start()
            procs.append(proc)
    except BaseException:
        _kill(procs)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    monitor = _Monitor(procs, board, results, timeout)
    # Ctrl-C only counts here; the loop acts on it between reads (never halfway through a result)
    previous = signal.signal(signal.SIGINT, monitor.on_sigint) if main else None
    try:
        values = monitor.run()
        deadline = time.monotonic() + EXIT_S
        for proc in procs:  # each sent its result: let it exit by itself (its exit handlers run)
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        return values
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        _kill(procs)
        results.close()
        del store


@dataclass(frozen=True)
class _WorkerSpec:
    rank: int
    world_size: int
    host: str
    port: int
    backend: str
    timeout: float
    parent: int


def _worker(spec: _WorkerSpec, board: Board, results: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    global _board, _rank
    _die_with_parent(spec.parent)
    _board, _rank = board, spec.rank
    env = {
        "RANK": spec.rank,
        "LOCAL_RANK": spec.rank,
        "WORLD_SIZE": spec.world_size,
        "LOCAL_WORLD_SIZE": spec.world_size,
        "MASTER_ADDR": spec.host,
        "MASTER_PORT": spec.port,
    }
    os.environ.update({k: str(v) for k, v in env.items()})
    if _is_loopback(spec.host):  # the backends' own sockets: loopback too, unless the user chose
        loopback = _loopback_interface()
        if loopback:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)
    _thread_lock_for_tqdm()
    # N processes on one machine: share its cores instead of each taking all of them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
    try:
        store = dist.TCPStore(spec.host, spec.port, spec.world_size, is_master=False, timeout=_td(spec.timeout))
        dist.init_process_group(
            spec.backend, store=store, rank=spec.rank, world_size=spec.world_size, timeout=_td(spec.timeout)
        )
        # by value: torch's queue pickler would pass tensors as shared-memory handles, gone when this exits
        value = pickle.dumps(fn(*args))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the launcher, named
        # Reported before anything else: the process group stays up (this process ends at once), so the
        # peers do not see a closed connection, and report it, before the launcher has this rank's cause.
        detail = "".join(traceback.format_exception(exc))
        headline = (str(exc).strip().splitlines() or [""])[0]
        message = f"{type(exc).__name__}: {headline}" if headline else type(exc).__name__
        results.put(("error", spec.rank, message, _is_comm_error(exc), detail, time.monotonic()))
        results.close()
        results.join_thread()
        os._exit(1)
    dist.destroy_process_group()
    results.put(("ok", spec.rank, value))
    results.close()
    results.join_thread()


def _thread_lock_for_tqdm() -> None:
    """tqdm's default lock is a multiprocessing semaphore: a worker killed on failure would leave it
    behind for the resource tracker to warn about. Each worker's bars need only a thread lock."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def _td(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def _is_comm_error(exc: BaseException) -> bool:
    """A collective that failed because of another rank (a timeout, a closed connection)."""
    from shardfx.errors import CollectiveError

    seen = 0
    while exc is not None and seen < 8:  # an error wrapped around one (ExecutionError from DistError)
        if isinstance(exc, (CollectiveError, dist.DistError)):
            return True
        # gloo's own errors are plain RuntimeErrors (a collective outside DistComm, e.g. a checkpoint's)
        if isinstance(exc, RuntimeError) and any(p in str(exc) for p in _PEER_FAILURES):
            return True
        exc, seen = exc.__cause__, seen + 1
    return False


# What gloo (and NCCL) say when the failure is another rank's
_PEER_FAILURES = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Timed out waiting",
    "timed out",
    "Broken pipe",
)


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return "lo" if "lo" in names else None


def _die_with_parent(parent: int) -> None:
    """Linux: this worker gets SIGKILL when the launcher dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the launcher is already gone
        os._exit(1)


def _kill(procs: list[Any]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()  # SIGKILL: a stopped (SIGSTOP) worker cannot act on SIGTERM
    for proc in procs:
        proc.join(timeout=10)


@dataclass
class _Failure:
    rank: int
    priority: int  # 0: died or hung, 1: raised, 2: a collective failed because of another rank
    message: str
    at: float
    hung: bool = False  # the message reads "did not arrive ...", not a failure's text


class _Monitor:
    """Waits for the workers; on the first failure, names its cause."""

    def __init__(self, procs: list[Any], board: Board, results: Any, timeout: float) -> None:
        self.procs, self.board, self.results, self.timeout = procs, board, results, timeout
        self.values: dict[int, Any] = {}
        self.failures: dict[int, _Failure] = {}
        self.details: dict[int, str] = {}  # rank -> the traceback it sent
        self.interrupts = 0  # Ctrl-C presses counted by on_sigint
        self.handled = 0  # of them, acted on

    def on_sigint(self, signum: int, frame: Any) -> None:
        self.interrupts += 1
        if self.interrupts > 1:  # a second press: stop now, whatever is half done
            _kill(self.procs)
            raise KeyboardInterrupt

    def run(self) -> dict[int, Any]:
        first_failure: float | None = None
        while len(self.values) < len(self.procs):
            self._collect(0.1)
            self._check_exits()
            self._check_hang()
            if self.interrupts > self.handled:
                self.handled = self.interrupts
                self._interrupted()
            if self.failures:
                first_failure = first_failure or time.monotonic()
                settled = all(r in self.values or r in self.failures for r in range(len(self.procs)))
                if settled or time.monotonic() - first_failure > SETTLE_S:
                    raise WorkerFailed(self._describe(), dict(sorted(self.details.items())))
        return dict(sorted(self.values.items()))

    def _collect(self, wait: float) -> None:
        try:
            message = self.results.get(timeout=wait)
        except queue.Empty:
            return
        while True:
            if message[0] == "ok":
                self.values[message[1]] = pickle.loads(message[2])
            else:
                _, rank, text, comm_error, detail, at = message
                self.details[rank] = detail
                self._fail(rank, 2 if comm_error else 1, text, at=at)
            try:
                message = self.results.get_nowait()
            except queue.Empty:
                return

    def _fail(self, rank: int, priority: int, message: str, hung: bool = False, at: float | None = None) -> None:
        if rank not in self.failures:
            self.failures[rank] = _Failure(rank, priority, message, time.monotonic() if at is None else at, hung)

    def _check_exits(self) -> None:
        for rank, proc in enumerate(self.procs):
            if proc.exitcode is None or rank in self.values or rank in self.failures:
                continue
            self._collect(0.2)  # its last message may still be in the pipe
            if rank in self.values or rank in self.failures:
                continue
            code = proc.exitcode
            how = f"exit code {code}" if code >= 0 else f"killed by {_signal_name(-code)}"
            self._fail(rank, 0, f"the process ended ({how}) without a result")

    def _check_hang(self) -> None:
        """A rank waiting in one collective past the timeout (the backend did not end it)."""
        if self.failures:
            return
        now = time.monotonic()
        for rank in range(len(self.procs)):
            since = self.board.waiting_since[rank]
            if since and now - since > self.timeout + GRACE_S:
                where = self.board.where_of(rank)
                late = self._not_waiting(exclude=rank)
                for other in late:
                    self._fail(other, 0, self._absent(other, where, waited=rank), hung=True)
                if not late:  # every rank waits, each in its own collective
                    places = ", ".join(f"rank {r} at {self.board.where_of(r)}" for r in range(len(self.procs)))
                    self._fail(
                        rank,
                        0,
                        f"and every other rank wait past the timeout, each in its own collective: {places}",
                        True,
                    )
                return

    def _not_waiting(self, exclude: int) -> list[int]:
        """Ranks alive, without a result or a failure, and not waiting in any collective."""
        return [
            r
            for r, proc in enumerate(self.procs)
            if r != exclude
            and r not in self.values
            and r not in self.failures
            and not self.board.waiting_since[r]
            and proc.exitcode is None
        ]

    def _absent(self, rank: int, where: str, waited: int) -> str:
        state = _process_state(self.procs[rank].pid)
        last = self.board.where_of(rank)
        doing = {
            "T": "its process is stopped (SIGSTOP, or a debugger)",
            "t": "its process is stopped by a debugger",
            "Z": "its process has died",
        }.get(state, f"it is still running, last at {last}" if last else "it is still running, before any collective")
        return (
            f"did not arrive at {where or 'a collective'} within the {self.timeout:.0f} s collective timeout "
            f"(rank {waited} waited there); {doing}"
        )

    def _interrupted(self) -> None:
        """The first Ctrl-C: ask a job that polls stop_requested to stop at a step no rank has started."""
        board = self.board
        # a worker stopped while holding the lock would block the launcher: then stop at once
        if board.polled.value and board.lock.acquire(timeout=5):
            try:
                board.stop_at.value = max(board.step[r] for r in range(board.nprocs)) + 1
            finally:
                board.lock.release()
            return
        _kill(self.procs)
        raise KeyboardInterrupt

    def _describe(self) -> str:
        failures = sorted(self.failures.values(), key=lambda f: (f.priority, f.at, f.rank))
        cause = failures[0]
        if cause.priority == 2:  # only collective errors: whoever is not waiting did not arrive
            where = _where_in(cause.message) or self.board.where_of(cause.rank)
            late = [r for r in range(len(self.procs)) if r not in self.failures and r not in self.values]
            if late:
                return "; ".join(f"rank {r} {self._absent(r, where, cause.rank)}" for r in late)
            if self.values:  # a rank finished while another still waited for it
                done = ", ".join(map(str, sorted(self.values)))
                return (
                    f"rank {cause.rank} waited at {where or 'a collective'} for rank(s) {done}, which had already "
                    f"returned: the ranks ran different collectives ({cause.message})"
                )
            sites = {f.rank: _where_in(f.message) for f in failures}
            if len({site for site in sites.values() if site}) > 1:
                places = ", ".join(
                    f"rank {r} at {site or 'an unnamed collective'}" for r, site in sorted(sites.items())
                )
                return f"the ranks diverged, each waiting in a different collective: {places}"
        if cause.hung:
            return "; ".join(f"rank {f.rank} {f.message}" for f in failures if f.hung)
        alike = [f.rank for f in failures if f.message == cause.message]
        who = f"rank {cause.rank}" if len(alike) == 1 else f"ranks {', '.join(map(str, sorted(alike)))}"
        lines = [f"{who} failed: {cause.message}"]
        lines += [f"rank {f.rank}: {f.message}" for f in failures[1:] if f.priority < 2 and f.rank not in alike]
        return "; ".join(lines)


def _where_in(message: str) -> str:
    """The collective a DistComm error names: 'rank R: KIND at node X (module): did not complete: ...'."""
    found = re.search(r"rank \d+: (.*?): did not complete", message)
    return found.group(1) if found else ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _process_state(pid: int) -> str:
    """The state letter in /proc/PID/stat (R, S, T, Z, ...); '' where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
