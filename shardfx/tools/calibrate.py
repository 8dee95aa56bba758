"""`shardfx calibrate`: measure this machine once for the cost model's "cpu" profile.

Measures, with the threads each of N worker processes gets (cores / N):
matmul FLOP/s in fp32 and bf16, memory bandwidth (a large copy), the fixed
cost of one small op, and gloo's all-gather latency (alpha) and bandwidth
(beta) between N local processes, by a least-squares fit over message sizes.
The result is written to ~/.cache/shardfx/hardware.json, which
`hardware("cpu")` then returns.

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


def _best(fn, repeat: int = 5) -> float:  # noqa: ANN001
    """The fastest of `repeat` timings: the least disturbed by other work on a shared machine."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


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


def measure_gloo() -> tuple[float, float]:
    """(alpha seconds, link bytes/s) from all-gathers of growing size, on this rank's process group."""
    import torch.distributed as dist

    import shardfx.runtime.dist_comm  # noqa: F401 - quiets torch 2.13's rename warnings

    world = dist.get_world_size()
    rows = []
    for numel in (256, 16 * 1024, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024):
        shard = torch.ones(numel // world)
        out = torch.empty(shard.numel() * world)
        seconds = _best(lambda out=out, shard=shard: dist.all_gather_into_tensor(out, shard), repeat=7)
        sent = out.numel() * 4 * (world - 1) / world
        rows.append((sent, seconds))
    # bandwidth from the two largest messages (latency cancels), latency from the smallest
    (x1, y1), (x2, y2) = rows[-2], rows[-1]
    seconds_per_byte = max((y2 - y1) / (x2 - x1), 1e-12)
    alpha = max(rows[0][1] - rows[0][0] * seconds_per_byte, 1e-6)
    return alpha, 1.0 / seconds_per_byte


def _worker() -> dict[str, float]:
    figures = measure_compute()
    figures["alpha"], figures["link_bw"] = measure_gloo()
    return figures


def run(args: argparse.Namespace) -> int:
    from shardfx.graphs.cost_model import Hardware, save_calibration
    from shardfx.runtime.launch import launch

    print(f"measuring with {args.world_size} worker processes ({os.cpu_count()} cores) ...")
    figures = launch(_worker, (), args.world_size, timeout=120)[0]
    hw = Hardware(name="cpu", source=f"calibrated on this machine, {args.world_size} gloo ranks", **figures)
    print(
        f"fp32 {hw.fp32_flops / 1e9:.1f} GFLOP/s, bf16 {hw.bf16_flops / 1e9:.1f} GFLOP/s, "
        f"memory {hw.mem_bw / 1e9:.1f} GB/s, op overhead {hw.op_overhead * 1e6:.1f} us, "
        f"gloo alpha {hw.alpha * 1e6:.0f} us, link {hw.link_bw / 1e9:.2f} GB/s"
    )
    if not args.dry_run:
        print(f"saved to {save_calibration(hw)}")
    return 0
