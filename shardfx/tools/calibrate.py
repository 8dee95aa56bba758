"""`shardfx calibrate`: measure this machine once for the cost model's "cpu" profile.

Measures, with the threads each of N worker processes gets (cores / N):
matmul FLOP/s in fp32 and bf16, memory bandwidth (a large copy), the fixed
cost of one small op, and gloo between N local processes as a training step
meets it (each collective after some compute): latency (alpha), bandwidth,
and how much of an async collective hides behind compute (overlap). The
result is written to ~/.cache/shardfx/hardware.json with this machine's
identity (CPU model, cores, torch version); `hardware("cpu")` returns it on
this machine only, and the built-in profile elsewhere.

    shardfx calibrate --world-size 2
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from shardfx.tools.options import positive_int

NAME = "calibrate"
HELP = "measure this machine (FLOP/s, memory bandwidth, op overhead, gloo alpha/beta) for the cost model"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-size", type=positive_int, default=2, help="worker processes to measure gloo between")
    parser.add_argument("--dry-run", action="store_true", help="print the figures without saving them")
    parser.set_defaults(run=run)
    return parser


def _timings(fn, repeat: int) -> list[float]:  # noqa: ANN001
    """`repeat` timings of fn() after one untimed call, sorted."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)


def _best(fn, repeat: int = 5) -> float:  # noqa: ANN001
    """The fastest of `repeat` timings: the least disturbed by other work on a shared machine."""
    return _timings(fn, repeat)[0]


def measure_compute() -> dict[str, float]:
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    fp32 = 2 * n**3 / _best(lambda: torch.mm(a, b))
    ab, bb = a.bfloat16(), b.bfloat16()
    bf16 = 2 * n**3 / _best(lambda: torch.mm(ab, bb))
    big = torch.empty(16 * 2**20)  # 64 MiB
    out = torch.empty_like(big)
    mem_bw = 2 * big.numel() * 4 / _best(lambda: out.copy_(big))
    x = torch.ones(4)
    ops = 200

    def small_ops() -> None:
        y = x
        for _ in range(ops):
            y = torch.ops.aten.add.Tensor(y, 1.0)

    overhead = _best(small_ops) / ops
    return {"fp32_flops": fp32, "bf16_flops": bf16, "mem_bw": mem_bw, "op_overhead": overhead}


def _median(fn, repeat: int = 15) -> float:  # noqa: ANN001
    """The median of `repeat` timings: collectives between compute vary with the ranks' skew."""
    return _timings(fn, repeat)[repeat // 2]


def measure_gloo() -> dict[str, float]:
    """Latency, bandwidth and overlap of gloo collectives as a training step sees them: each one
    issued after a few milliseconds of compute, so the ranks' skew and their shared cores count.

    alpha: a small all-reduce's cost after compute; link_bw: from the extra time of a 4 MiB one;
    overlap: the share of that 4 MiB all-reduce's time that an async launch hides behind compute."""
    import torch.distributed as dist

    import shardfx.runtime.dist_comm  # noqa: F401 - quiets torch 2.13's rename warnings

    world = dist.get_world_size()
    a = torch.randn(256, 256)

    def compute() -> None:
        for _ in range(8):
            torch.mm(a, a)

    small, big = torch.ones(64), torch.ones(1024 * 1024)
    base = _median(compute)
    alpha = max(_median(lambda: (compute(), dist.all_reduce(small))) - base, 1e-6)
    sync = max(_median(lambda: (compute(), dist.all_reduce(big))) - base, alpha + 1e-6)
    hidden = _median(lambda: (lambda work: (compute(), work.wait()))(dist.all_reduce(big, async_op=True))) - base
    sent = 2 * big.numel() * 4 * (world - 1) / world  # a ring all-reduce sends 2(N-1)/N of the tensor
    overlap = min(max(1.0 - hidden / sync, 0.0), 1.0)
    return {"alpha": alpha, "link_bw": sent / (sync - alpha), "overlap": overlap}


def _worker() -> dict[str, float]:
    return {**measure_compute(), **measure_gloo()}


def run(args: argparse.Namespace) -> int:
    from shardfx.graphs.cost_model import Hardware, machine_id, save_calibration
    from shardfx.runtime.launch import launch

    print(f"measuring with {args.world_size} worker processes ({os.cpu_count()} cores) ...")
    figures = launch(_worker, (), args.world_size, timeout=120)[0]
    source = f"calibrated on this machine, {args.world_size} gloo ranks"
    hw = Hardware(name="cpu", source=source, machine=machine_id(), **figures)
    print(
        f"fp32 {hw.fp32_flops / 1e9:.1f} GFLOP/s, bf16 {hw.bf16_flops / 1e9:.1f} GFLOP/s, "
        f"memory {hw.mem_bw / 1e9:.1f} GB/s, op overhead {hw.op_overhead * 1e6:.1f} us, "
        f"gloo alpha {hw.alpha * 1e6:.0f} us, link {hw.link_bw / 1e9:.2f} GB/s, "
        f"{hw.overlap:.0%} of an async collective hidden behind compute"
    )
    if not args.dry_run:
        print(f"saved to {save_calibration(hw)}")
    return 0
