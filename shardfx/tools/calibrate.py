"""`shardfx calibrate`: measure this machine once for the cost model's "cpu" profile.

Measures, in each of N worker processes at once (with the threads each gets,
cores / N, so they share the cores and the memory bus as a training step
does): matmul FLOP/s in fp32 and bf16 and attention's in fp32, memory bandwidth (an
elementwise op into new outputs), GELU's elements/s, the fixed cost of one small
op and of one view, AdamW's step per parameter element and per tensor, and gloo
between the N processes as a training step meets it (each collective after some
compute): latency (alpha; exchange_alpha for shardfx's all-gather and
reduce-scatter, run as one exchange with each peer), bandwidth, how much of a
bucketed backward's all-reduces async launches hide (overlap), and how much
longer the slowest rank's compute takes than the mean rank's (skew).
Medians, not best cases: a step meets the machine as it is.

The result is written to ~/.cache/shardfx/hardware.json (or the file the
SHARDFX_HARDWARE_FILE environment variable names) with this machine's
identity (CPU model, cores, torch version), one profile per rank count
measured; `hardware("cpu")` returns them on this machine only, and the
built-in profile elsewhere. The cost model scales a profile to rank counts
not measured (cost_model.Hardware.at).

    shardfx calibrate --world-size 2,4

A launched gloo job on a CPU calibrates itself the first time it runs at a rank
count this machine has no calibration for (calibrate_once, from
compile_distributed); SHARDFX_CALIBRATE=0 turns that off.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from shardfx.tools.options import positive_int_list

if TYPE_CHECKING:
    from shardfx.graphs.cost_model import Hardware


def rank_counts(text: str) -> list[int]:
    """argparse type of --world-size: rank counts >= 2 (gloo's latency and bandwidth need two ranks)."""
    counts = positive_int_list(text)
    if min(counts) < 2:
        raise argparse.ArgumentTypeError(f"each count must be at least 2 (a collective needs two ranks); got {text!r}")
    return counts


NAME = "calibrate"
HELP = "measure this machine (FLOP/s, memory bandwidth, op overhead, gloo alpha/beta) for the cost model"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--world-size",
        type=rank_counts,
        default=[2],
        metavar="N[,N...]",
        help="worker processes to measure with, each at least 2, one calibration per count (default 2); e.g. 2,4",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the figures without saving them")
    parser.set_defaults(run=run)
    return parser


def _timings(fn, repeat: int) -> list[float]:  # noqa: ANN001
    """`repeat` timings of fn() after one untimed call, sorted. Every rank starts at a barrier, so the
    ranks measure at once and share the cores and the memory bus as a training step shares them."""
    import torch.distributed as dist

    fn()
    if dist.is_initialized():
        dist.barrier()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)


def _median(fn, repeat: int = 9) -> float:  # noqa: ANN001
    """The median of `repeat` timings: what a step meets on a machine others share, not its best case."""
    return _timings(fn, repeat)[repeat // 2]


WINDOW = 0.05  # seconds: a timing spans several of the OS's time slices, so ranks sharing a core show it


def _seconds_per_call(fn) -> float:  # noqa: ANN001
    """fn's time per call: the median of timings of enough calls in a row to fill WINDOW (with more
    ranks than cores, one call can run within a single time slice and miss the sharing)."""
    start = time.perf_counter()
    fn()
    calls = max(1, math.ceil(WINDOW / max(time.perf_counter() - start, 1e-7)))

    def many() -> None:
        for _ in range(calls):
            fn()

    return _median(many) / calls


# A training step's matmuls: (tokens x width) by (width x 4 width) and back, as the forward (A B),
# the input's gradient (G B^T) and the weight's (A^T G) multiply them, at a few widths.
MATMUL_SHAPES = [(512, 256, 1024), (512, 1024, 256), (1024, 512, 512)]


def _matmul_rate(dtype: torch.dtype) -> float:
    """FLOP/s over MATMUL_SHAPES in the three layouts of a linear layer's forward and backward:
    the total FLOPs over the total of each one's median time."""
    flops = seconds = 0.0
    for m, k, n in MATMUL_SHAPES:
        a, b, g = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype), torch.randn(m, n, dtype=dtype)
        for left, right in ((a, b), (g, b.t()), (a.t(), g)):
            seconds += _seconds_per_call(lambda left=left, right=right: torch.mm(left, right))
            flops += 2 * left.shape[0] * left.shape[1] * right.shape[1]
    return flops / seconds


def _elementwise_bandwidth() -> float:
    """Bytes/s of an elementwise op as a step runs it: a sum of two 2 MiB tensors (an activation's size
    at a small model's batch) into a new output, ACTIVATIONS of them kept, as a forward keeps what its
    backward reads, then freed. New outputs cost their first touch of memory the allocator took back
    from the OS. Measured here with one process: 11-12 GB/s once the allocator settles (the first
    calls can reach 30), against 33 into a kept output; a 64 MiB copy reached 45-57 with 2 ranks."""
    a, b = torch.randn(2**19), torch.randn(2**19)

    def forward() -> None:
        kept = [torch.add(a, b) for _ in range(ACTIVATIONS)]
        del kept

    for _ in range(WARM_FORWARDS):  # the allocator's steady state, a training loop's after its first steps
        forward()  # (the first calls can still find the pages mapped: 30+ GB/s, then 11-12 for good)
    return 3 * a.numel() * 4 * ACTIVATIONS / _seconds_per_call(forward)


ACTIVATIONS, WARM_FORWARDS = 16, 8


def _attention_rate() -> float:
    """FLOP/s of causal scaled-dot-product attention, forward and backward, at a GPT's head size
    (2 x 8 heads of 256 tokens x 64), counted as cost_model counts it (the whole score matrix, which
    a causal kernel only half computes): measured 0.7x the matmuls' rate (142-159 against 204-217
    GFLOP/s at 2 ranks on 2 cores)."""
    q, k, v = (torch.randn(2, 8, 256, 64) for _ in range(3))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    grad = torch.randn_like(out)
    forward = _seconds_per_call(lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True))
    backward = _seconds_per_call(
        lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, True)
    )
    return 3.5 * 4 * 2 * 8 * 256 * 256 * 64 / (forward + backward)


def measure_compute() -> dict[str, float]:
    """FLOP/s of a linear layer's matmuls (MATMUL_SHAPES) and of attention, bytes/s of an elementwise
    op into new outputs, elements/s of GELU (the transcendental elementwise ops) and of its tanh
    approximation (forward and backward, the mean), and the fixed cost of a small op and of a view,
    as this rank meets them."""
    fp32, bf16 = _matmul_rate(torch.float32), _matmul_rate(torch.bfloat16)
    mem_bw = _elementwise_bandwidth()
    wide = torch.randn(2**20)
    grad = torch.randn_like(wide)
    special = wide.numel() / _seconds_per_call(lambda: torch.ops.aten.gelu(wide))
    tanh_forward = _seconds_per_call(lambda: torch.ops.aten.gelu(wide, approximate="tanh"))
    tanh_backward = _seconds_per_call(lambda: torch.ops.aten.gelu_backward(grad, wide, approximate="tanh"))
    x = torch.ones(4)
    return {
        "fp32_flops": fp32,
        "bf16_flops": bf16,
        "mem_bw": mem_bw,
        "special_rate": special,
        "tanh_gelu_rate": 2 * wide.numel() / (tanh_forward + tanh_backward),
        "attention_flops": _attention_rate(),
        "op_overhead": _seconds_per_call(lambda: torch.ops.aten.add.Tensor(x, 1.0)),
        "view_overhead": _seconds_per_call(lambda: torch.ops.aten.view(x, [2, 2])),
    }


def measure_optimizer() -> dict[str, float]:
    """AdamW's step (torch's default implementation for CPU tensors): seconds per parameter element
    (one 1M-element parameter) and per parameter tensor (64 tiny ones)."""
    import torch.nn as nn

    def step_seconds(shapes: list[int]) -> float:
        params = [nn.Parameter(torch.randn(k)) for k in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        return _seconds_per_call(optimizer.step)

    per_tensor = step_seconds([16] * 64) / 64
    per_element = max(step_seconds([2**20]) - per_tensor, 0.0) / 2**20
    return {"optimizer_element": per_element, "optimizer_tensor": per_tensor}


def measure_gloo() -> dict[str, float]:
    """Latency, bandwidth and overlap of gloo collectives as a training step sees them: each one
    issued after compute, so the ranks' skew and their shared cores count.

    alpha: the time a small all-reduce adds between short stretches of compute (the ranks' skew and
    the latency), over a sequence of 20; exchange_alpha: the same for shardfx's all-gather and
    reduce-scatter (one exchange with each peer, one round where gloo's ring all-reduce takes
    2(N - 1) steps: at 4 ranks on 2 cores, measured 2.2-3.8 ms against the all-reduce's 5.1-6.0);
    link_bw: from the extra time of a 16 MiB all-reduce
    (large enough that its transfer, not the skew, sets its time); overlap: the share of the
    collectives' time a bucketed backward hides by launching them async (_overlap); skew: the wait
    in a small all-reduce after a long stretch of compute (DRIFT_S, a backward's) over the wait after
    a short one, per second of the difference (the mean over ranks, in measure_all, is how much
    longer the slowest rank took than the mean: at 4 ranks on 2 cores, measured 0.18-0.23)."""
    import torch.distributed as dist

    from shardfx.graphs.program import Mesh
    from shardfx.runtime.dist_comm import DistComm  # importing it also quiets torch 2.13's rename warnings

    world = dist.get_world_size()
    a = torch.randn(256, 256)

    def compute(k: int = 8) -> None:
        for _ in range(k):
            torch.mm(a, a)

    small, big = torch.ones(16 * world), torch.ones(4 * 2**20)

    def after_compute(tensor: torch.Tensor) -> float:
        """Seconds in one all-reduce issued after compute: what a rank waits in it, skew included."""
        compute()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        return time.perf_counter() - start

    def median_of(fn, repeat: int = 15) -> float:  # noqa: ANN001
        fn()
        dist.barrier()
        return sorted(fn() for _ in range(repeat))[repeat // 2]

    comm = DistComm(Mesh.of(dp=world))
    collectives = {
        "all_reduce": lambda: dist.all_reduce(small),
        # shardfx's own gloo all-gather and reduce-scatter: one exchange with each peer
        "all_gather": lambda: comm.all_gather(small[:16], "dp", 0),
        "reduce_scatter": lambda: comm.reduce_scatter(small, "dp", "sum", 0),
    }

    def between_compute(kind: str | None, count: int = 20) -> None:
        """`count` short stretches of compute, each followed by a small collective of `kind` (None:
        none): the rhythm of an unbucketed step, in which the ranks' skew builds and drains."""
        for _ in range(count):
            compute(2)
            if kind is not None:
                collectives[kind]()

    base = _median(compute, 15)
    # per collective: a sequence's extra time over the same compute alone (steadier than one call's)
    alone = _median(lambda: between_compute(None))
    latency = {kind: max((_median(lambda k=kind: between_compute(k)) - alone) / 20, 1e-6) for kind in collectives}
    alpha = latency["all_reduce"]
    exchange_alpha = (latency["all_gather"] + latency["reduce_scatter"]) / 2
    sync = max(median_of(lambda: after_compute(big)), alpha + 1e-6)
    sent = 2 * big.numel() * 4 * (world - 1) / world  # a ring all-reduce sends 2(N-1)/N of the tensor
    one = max(median_of(lambda: after_compute(torch.ones(BUCKET_NUMEL))), 1e-6)  # one bucket's all-reduce
    return {
        "skew": _skew(compute, base / 8),
        "alpha": alpha,
        "exchange_alpha": exchange_alpha,
        "link_bw": sent / (sync - alpha),
        "overlap": _overlap(compute, base, one),
    }


def _skew(compute, per_matmul: float) -> float:  # noqa: ANN001
    """How much longer the slowest rank's compute takes than the mean rank's, per second: what this
    rank waits in a 16-element all-reduce after DRIFT_S of matmuls, less what it waits after two of
    them, over the difference in compute. The all-reduce before each timing lines the ranks up. The
    growth is steady beyond a few time slices (at 4 ranks on 2 cores: waits of 7.0, 7.9, 15.2 and
    22.2 ms after 5, 20, 50 and 80 ms): some ranks are served less than others for that long."""
    import torch.distributed as dist

    small = torch.ones(16)

    def wait_after(k: int) -> float:
        compute(k)
        start = time.perf_counter()
        dist.all_reduce(small)
        return time.perf_counter() - start

    long = max(4, round(DRIFT_S / max(per_matmul, 1e-7)))
    waits = {}
    for k in (2, long):
        dist.all_reduce(small)
        waits[k] = sorted(wait_after(k) for _ in range(REPEAT))[REPEAT // 2]
    return max(0.0, (waits[long] - waits[2]) / ((long - 2) * per_matmul))


DRIFT_S = 0.04  # seconds of compute between two collectives: a backward's, where a few buckets split it


def _overlap(compute, base: float, one: float) -> float:  # noqa: ANN001
    """The share of its collectives' time a bucketed backward hides by launching them async: the
    rhythm of one (BUCKETS gradient buckets, each all-reduced while the next stretch of compute
    runs, at most 2 in flight) timed three ways: collectives synchronous, async, and none. Where
    the ranks share cores, the transfers slow the compute beside them (a share is not hidden), and
    an async collective also lets a rank run on past a peer that lags (the ranks' skew), which a
    single collective behind compute does not show."""
    import torch.distributed as dist

    buckets = [torch.ones(BUCKET_NUMEL) for _ in range(BUCKETS)]
    chunk = max(2, math.ceil(8 * 1.5 * one / max(base, 1e-6)))  # compute that outlasts one collective

    def rhythm(mode: str) -> None:
        pending: list = []
        for bucket in buckets:
            if mode == "sync":
                dist.all_reduce(bucket)
            elif mode == "async":
                pending.append(dist.all_reduce(bucket, async_op=True))
                if len(pending) > 2:
                    pending.pop(0).wait()
            compute(chunk)
        for work in pending:
            work.wait()

    # the three interleaved, each after a barrier, so the machine's drift falls on all of them alike
    times: dict[str, list[float]] = {"none": [], "sync": [], "async": []}
    for mode in times:
        rhythm(mode)  # warm
    for _ in range(REPEAT):
        for mode, seen in times.items():
            dist.barrier()
            start = time.perf_counter()
            rhythm(mode)
            seen.append(time.perf_counter() - start)
    none, sync, overlapped = (sorted(seen)[REPEAT // 2] for seen in times.values())
    if sync <= none:
        return 1.0  # the collectives cost nothing measurable here
    return min(max(1.0 - (overlapped - none) / (sync - none), 0.0), 1.0)


# _overlap's rhythm: 8 gradient buckets of 8 MiB (the size tune_communication mostly picks, 4-16 MiB:
# the share hidden falls with the bucket where ranks outnumber cores, as a transfer's CPU time cannot
# hide behind compute on the same cores; measured at 4 ranks on 2 cores 69% at 0.5 MiB, 52% at 2,
# 49% at 4, 29% at 8; at 2 ranks 42-56% throughout), 15 timings
BUCKETS, BUCKET_NUMEL, REPEAT = 8, 2**21, 15


def measure_all() -> dict[str, float]:
    """Every figure of a profile, measured in this process of an initialized gloo job (each rank calls
    it), averaged over the ranks: one rank's figures depend on which of them lags (the one that is
    ahead waits out the skew in every collective, the one behind hardly waits), a step on all of them."""
    import torch.distributed as dist

    figures = {**measure_compute(), **measure_optimizer(), **measure_gloo()}
    values = torch.tensor(list(figures.values()), dtype=torch.float64)
    dist.all_reduce(values)
    return {key: float(v) / dist.get_world_size() for key, v in zip(figures, values)}


def profile(figures: dict[str, float], ranks: int, source: str) -> Hardware:
    """This machine's "cpu" profile from measure_all's figures, measured with `ranks` gloo ranks."""
    from shardfx.graphs.cost_model import Hardware, machine_id

    return Hardware(
        name="cpu",
        source=source,
        machine=machine_id(),
        ranks=ranks,
        cores=os.cpu_count() or 1,
        **figures,
    )


AUTO_ENV = "SHARDFX_CALIBRATE"  # "0" (or "false", "no", "off"): a launched job does not calibrate itself
OFF = ("0", "false", "no", "off")


def calibrate_once(hardware_name: str, echo: Callable[[str], None] | None = None) -> bool:
    """In a launched gloo job that plans on this CPU's profile (`hardware_name` "auto" or "cpu"):
    measure this machine at the job's rank count when it has no calibration at that count yet
    (a new machine, a new torch or a new count), keep it (save_calibration) and return True;
    otherwise False. Every rank calls it (the measurement is collective); the ranks agree on
    whether to measure, every rank plans on what was measured (cost_model.use_calibration) and rank 0
    keeps it in the file (a file it cannot write is a warning). `echo`: rank 0's line saying so."""
    import torch.distributed as dist

    from shardfx.graphs import cost_model

    if os.environ.get(AUTO_ENV, "1").strip().lower() in OFF or not (dist.is_available() and dist.is_initialized()):
        return False
    if cost_model.resolve(hardware_name) != "cpu" or dist.get_backend() != "gloo":
        return False
    world = dist.get_world_size()
    if world < 2:
        return False
    missing = torch.tensor([int(world not in cost_model.calibrated_ranks())])
    dist.all_reduce(missing, op=dist.ReduceOp.MAX)  # one rank that lacks it (another file): all measure
    if not missing.item():
        return False
    rank0 = dist.get_rank() == 0
    if rank0 and echo is not None:
        echo(
            f"shardfx: measuring this machine for the cost model at {world} ranks (once; kept in "
            f"{cost_model.CALIBRATION_FILE}; {AUTO_ENV}=0 skips it) ..."
        )
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # the measurement's random tensors leave the job's draws as they were
        figures = measure_all()  # averaged over the ranks: the same figures on every rank
    hw = profile(figures, world, f"calibrated on this machine by a {world}-rank job")
    cost_model.use_calibration(hw)  # every rank plans on these figures, whatever becomes of the file
    if rank0:
        try:
            cost_model.save_calibration(hw)
        except OSError as exc:
            warnings.warn(
                f"shardfx: could not keep the calibration in {cost_model.CALIBRATION_FILE} ({exc.strerror}); "
                "this job plans on it, the next one measures again (SHARDFX_HARDWARE_FILE names another file)",
                stacklevel=2,
            )
        if echo is not None:
            echo(f"shardfx: measured in {time.perf_counter() - start:.0f} s")
    return True


def run(args: argparse.Namespace) -> int:
    from shardfx.graphs.cost_model import save_calibration
    from shardfx.runtime.launch import launch

    cores = os.cpu_count() or 1
    profiles = []
    for world in args.world_size:
        print(f"measuring with {world} worker processes ({cores} cores) ...", flush=True)
        figures = launch(measure_all, (), world, timeout=180)[0]
        hw = profile(figures, world, f"calibrated on this machine, {world} gloo ranks")
        profiles.append(hw)
        print(
            f"  {world} ranks: fp32 {hw.fp32_flops / 1e9:.1f} GFLOP/s, bf16 {hw.bf16_flops / 1e9:.1f} GFLOP/s, "
            f"attention {hw.attention_flops / 1e9:.1f} GFLOP/s, "
            f"memory {hw.mem_bw / 1e9:.1f} GB/s, GELU {hw.special_rate / 1e6:.0f} M elements/s "
            f"(tanh approximation {hw.tanh_gelu_rate / 1e6:.0f}), "
            f"op overhead {hw.op_overhead * 1e6:.1f} us, view {hw.view_overhead * 1e6:.1f} us, "
            f"AdamW {hw.optimizer_element * 1e9:.1f} ns/element + {hw.optimizer_tensor * 1e6:.0f} us/tensor, "
            f"gloo alpha {hw.alpha * 1e6:.0f} us (exchange {hw.exchange_alpha * 1e6:.0f} us), link {hw.link_bw / 1e9:.2f} GB/s, "
            f"{hw.overlap:.0%} of a bucketed backward's all-reduces hidden by async launches, "
            f"the slowest rank {hw.skew:.0%} slower than the mean"
        )
    if not args.dry_run:
        print(f"saved to {save_calibration(*profiles)}")
    return 0
