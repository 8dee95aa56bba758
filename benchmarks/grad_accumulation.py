"""Gradient accumulation: shardfx's boundary reduction against DDP no_sync and FSDP2, on gloo.

    python benchmarks/grad_accumulation.py                         # world size 2, 4 micro-batches a step
    python benchmarks/grad_accumulation.py --world-sizes 2,4 --accum 4 --steps 10 --json /tmp/accum.json

Same model, data, launcher, round-robin stepping and instruments as zero_vs_fsdp2.py
(see its --help), with one optimizer step = `--accum` micro-batches of `--batch`
sequences each (global, split over the ranks). Strategies:

    DDP no_sync                 the first k-1 backward passes under ddp.no_sync(), the last reduces
    FSDP2 sync every micro      fully_shard (reshard after forward): reduce-scatters every backward
    FSDP2 no sync               model.set_requires_gradient_sync(False) for the first k-1 micro-batches
    shardfx ZeRO-s boundary     Config(zero_stage=s, grad_accum_steps=k): "keep" then "reduce" programs
    shardfx ZeRO-s micro_batch  Config(..., grad_accum_sync="micro_batch"): reduce every micro-batch
    ... bucket+overlap          Config(..., bucket_mb=25, overlap=True)

Eager strategies scale each micro-batch's loss by 1/k; shardfx's engine scales the
accumulated gradient by 1/k before the optimizer. Columns are per optimizer step
(all k micro-batches): median ms and its ratio to DDP no_sync, rank-0 peak MiB over
the step (MemTracker; accumulators and unsharded gradients show up here), MiB this
rank sends, and the loss of the trained weights on a held-out batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.distributed._tools.mem_tracker import MemTracker
from zero_vs_fsdp2 import Eager, MiB, Shardfx, Strategy, make_batches, measure

import shardfx
from shardfx.models import GPT, GPTConfig, gpt_loss, num_params
from shardfx.runtime.launch import launch

BASELINE = "DDP no_sync"
STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    BASELINE: ("ddp", {}),
    "FSDP2 sync every micro": ("fsdp2", {"sync_every": True}),
    "FSDP2 no sync": ("fsdp2", {"sync_every": False}),
    "shardfx ZeRO-0 boundary": ("shardfx", {"zero_stage": 0}),
    "shardfx ZeRO-0 boundary bucket+overlap": ("shardfx", {"zero_stage": 0, "bucket_mb": 25.0, "overlap": True}),
    "shardfx ZeRO-2 boundary": ("shardfx", {"zero_stage": 2}),
    "shardfx ZeRO-2 micro_batch": ("shardfx", {"zero_stage": 2, "grad_accum_sync": "micro_batch"}),
    "shardfx ZeRO-3 boundary": ("shardfx", {"zero_stage": 3}),
    "shardfx ZeRO-3 micro_batch": ("shardfx", {"zero_stage": 3, "grad_accum_sync": "micro_batch"}),
    "shardfx ZeRO-3 boundary bucket+overlap": ("shardfx", {"zero_stage": 3, "bucket_mb": 25.0, "overlap": True}),
}


class AccumulatingEager(Eager):
    """DDP or FSDP2 over k micro-batches; `hold` turns gradient sync off for all but the last."""

    def __init__(self, name: str, module: nn.Module, inner: nn.Module, lr: float, setup_s: float, k: int, hold: Any):
        super().__init__(name, module, inner, lr, setup_s)
        self.k, self.hold = k, hold
        self.between: Any = lambda: None  # called after each micro-batch (peak_memory resets MemTracker's module stats)

    def step(self, tokens: Tensor, targets: Tensor) -> None:
        tokens, targets = tokens.chunk(self.world)[self.rank], targets.chunk(self.world)[self.rank]
        parts = list(zip(tokens.chunk(self.k), targets.chunk(self.k)))
        for i, (x, y) in enumerate(parts):
            with self.hold(last=i == self.k - 1):
                (gpt_loss(self.module(x), y) / self.k).backward()
            self.between()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class AccumulatingShardfx(Shardfx):
    """engine.train_step, spelled out as DeepSpeed's loop so `between` can run after each micro-batch."""

    def __init__(self, name: str, engine: Any, setup_s: float, k: int) -> None:
        super().__init__(name, engine, setup_s)
        self.k = k
        self.between: Any = lambda: None

    def step(self, tokens: Tensor, targets: Tensor) -> None:
        for x, y in zip(tokens.chunk(self.k), targets.chunk(self.k)):
            loss = self.engine(x, y)
            self.engine.backward(loss)
            self.engine.step()
            self.between()


class _Sync:
    """A context manager factory: DDP's no_sync, FSDP2's set_requires_gradient_sync, or nothing."""

    def __init__(self, module: nn.Module, kind: str) -> None:
        self.module, self.kind = module, kind

    def __call__(self, last: bool) -> Any:
        import contextlib

        if last or self.kind == "every":
            if self.kind == "fsdp2":
                self.module.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.kind == "ddp":
            return self.module.no_sync()
        self.module.set_requires_gradient_sync(False)
        return contextlib.nullcontext()


def build(name: str, opts: dict[str, Any], cfg: GPTConfig, micro: tuple[Tensor, Tensor]) -> Strategy:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    kind, kwargs = STRATEGIES[name]
    k, lr = opts["accum"], opts["lr"]
    start = time.perf_counter()
    torch.manual_seed(opts["seed"])
    model = GPT(cfg)
    if kind == "ddp":
        ddp = nn.parallel.DistributedDataParallel(model)
        return AccumulatingEager(name, ddp, model, lr, time.perf_counter() - start, k, _Sync(ddp, "ddp"))
    if kind == "fsdp2":
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        hold = _Sync(model, "every" if kwargs["sync_every"] else "fsdp2")
        return AccumulatingEager(name, model, model, lr, time.perf_counter() - start, k, hold)
    engine = shardfx.compile_distributed(
        model,
        None,
        example_inputs=micro,
        loss_fn=gpt_loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
        config=shardfx.Config(**kwargs, grad_accum_steps=k, collective_timeout=float(opts["timeout"])),
    )
    return AccumulatingShardfx(name, engine, time.perf_counter() - start, k)


def peak_memory(strategy: Strategy, tokens: Tensor, targets: Tensor) -> dict[str, int]:
    """zero_vs_fsdp2.peak_memory over k micro-batches: MemTracker takes one call per module (shardfx's
    GraphModule is one too) unless its per-module stats are reset in between (the step's peak is kept)."""
    tracker = MemTracker()
    tracker.track_external(*strategy.persistent_state())
    strategy.between = tracker.reset_mod_stats  # type: ignore[attr-defined]
    with tracker:
        strategy.step(tokens, targets)
    strategy.between = lambda: None  # type: ignore[attr-defined]
    (snapshot,) = tracker.get_tracker_snapshot("peak").values()
    return {str(getattr(k, "value", k)): v for k, v in snapshot.items()}


def worker(opts: dict[str, Any]) -> dict[str, Any]:
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    rank = dist.get_rank()
    cfg = (
        GPTConfig(vocab_size=128, n_layer=1, d_model=64, n_head=2, seq_len=32)
        if opts.get("tiny")
        else GPTConfig(vocab_size=1024, n_layer=4, d_model=256, n_head=4, seq_len=128)
    )
    n_steps = opts["warmup"] + 2 + opts["steps"]
    step_batch = {**opts, "batch": opts["batch"] * opts["accum"]}
    batches = make_batches(step_batch, n_steps + 1, cfg.vocab_size, cfg.seq_len)
    held_out = batches.pop()
    micro = tuple(x[: opts["batch"]] for x in batches[0])
    strategies = [build(name, opts, cfg, micro) for name in STRATEGIES if name == BASELINE or name in opts["only"]]
    times, memory, comm = measure(strategies, batches, opts["warmup"], peak_memory)
    results: dict[str, Any] = {}
    for s in strategies:
        state = s.full_state_dict()
        row: dict[str, Any] = {"times_s": times[s.name], "peak": memory[s.name], "comm": comm[s.name]}
        if rank == 0:
            torch.manual_seed(opts["seed"])
            model = GPT(cfg)
            model.load_state_dict(state)
            with torch.no_grad():
                row["final_loss"] = gpt_loss(model(held_out[0]), held_out[1]).item()
        results[s.name] = row
    return {"threads": torch.get_num_threads(), "params": num_params(GPT(cfg)), "strategies": results}


def table(rank0: dict[str, Any]) -> list[str]:
    rows = rank0["strategies"]
    base_ms = statistics.median(rows[BASELINE]["times_s"]) * 1e3
    lines = [
        "| strategy | median ms / optimizer step | vs DDP no_sync | rank-0 peak MiB | MiB sent / step | final loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        ms = statistics.median(row["times_s"]) * 1e3
        sent = sum(row["comm"]["sent"].values()) / MiB
        peak = row["peak"]["Total"] / MiB
        lines.append(f"| {name} | {ms:.0f} | {ms / base_ms:.2f} | {peak:.1f} | {sent:.2f} | {row['final_loss']:.6f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", default="2", help="comma-separated world sizes (default %(default)s)")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step (default %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="global micro-batch size (default %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, >= 2 (default %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="model seed; batches use seed+1 (default %(default)s)")
    parser.add_argument("--only", default=None, help="comma-separated strategies besides the baseline (default: all)")
    parser.add_argument("--timeout", type=float, default=600.0, help="collective timeout, s (default %(default)s)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the raw numbers here")
    parser.add_argument(
        "--tiny", action="store_true", help="a 1-layer, 64-wide GPT: checks the script runs (figures mean nothing)"
    )
    args = parser.parse_args()
    if args.warmup < 2 or args.steps < 1 or args.accum < 2:
        parser.error("--warmup must be >= 2, --steps >= 1 and --accum >= 2")
    only = [n.strip() for n in args.only.split(",")] if args.only else list(STRATEGIES)
    unknown = sorted(set(only) - set(STRATEGIES))
    if unknown:
        parser.error(f"--only names unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    worlds = [int(w) for w in args.world_sizes.split(",")]
    for w in worlds:
        if w < 1 or args.batch % w:
            parser.error(f"world size {w} must divide the micro-batch {args.batch}")
    opts = {**vars(args), "only": only}
    print(
        f"GPT {'1x64, vocab 128, seq 32 (--tiny)' if args.tiny else '4x256, vocab 1024, seq 128'}; {args.accum} micro-batches of {args.batch} a step, AdamW lr {args.lr}; "
        f"{args.warmup} warm-up + 2 instrumented + {args.steps} timed steps; {os.cpu_count()} cores"
    )
    report: dict[str, Any] = {"options": vars(args), "torch": torch.__version__, "world_sizes": {}}
    for world in worlds:
        start = time.perf_counter()
        ranks = launch(worker, (opts,), world, timeout=args.timeout)
        wall = time.perf_counter() - start
        report["world_sizes"][str(world)] = {**ranks[0], "wall_s": wall}
        print(f"\n### world size {world} ({ranks[0]['threads']} torch threads per rank, {wall:.0f} s)\n")
        print("\n".join(table(ranks[0])), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"raw numbers in {args.json}")


if __name__ == "__main__":
    main()
