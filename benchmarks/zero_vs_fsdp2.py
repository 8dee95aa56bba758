"""Step time, rank-0 peak memory and traffic: shardfx ZeRO-0..3 against DDP and FSDP2, on gloo.

    python benchmarks/zero_vs_fsdp2.py                                   # world sizes 2 and 4, defaults
    python benchmarks/zero_vs_fsdp2.py --world-sizes 2 --steps 20 --json /tmp/zero_vs_fsdp2.json

The defaults take about 7 minutes on 2 quiet CPU cores and 12 on a busy shared
machine (measured; world size 4 takes two thirds of it).

Model and data: docs/TARGETS.md's GPT (4 layers, d_model 256, 4 heads, vocab 1024,
seq 128, untied embedding and head: 3,716,608 parameters; `--tie-weights`
gives 3,454,464), global batch 8 of uniform random tokens from a fixed seed,
AdamW(lr=1e-3), loss `gpt_loss`. Every strategy builds its model from the same
seed and sees the same batch at step i.

Each world size is one job: N worker processes started by
`shardfx.runtime.launch.launch` (gloo; each process gets cores // N torch
threads, at least 1). All strategies live side by side in those processes and
are stepped round-robin, the order rotating every step, so machine noise falls
on all of them alike. Strategies:

    DDP                         torch.nn.parallel.DistributedDataParallel
    FSDP2 reshard / no reshard  fully_shard on each block, then the root (reshard_after_forward True / False)
    shardfx ZeRO-s              compile_distributed(model, None, ..., Config(zero_stage=s)), s = 0..3:
                                the defaults, bucketing and overlap planned by the cost model
    shardfx ZeRO-3 no reshard   Config(zero_stage=3, reshard_after_forward=False)
    shardfx ZeRO-3 bucket+overlap  Config(zero_stage=3, bucket_mb=--bucket-mb, overlap=True, prefetch=1): by hand
    shardfx ZeRO-0/3 unplanned  Config(zero_stage=s, bucket_mb=0, overlap=False): the old defaults

Schedule per strategy: `--warmup` untimed steps, one step under MemTracker,
one step under the collective counter, then `--steps` timed steps.

Columns:
  median step ms   median over the timed steps of barrier -> step -> barrier
                   (so the slowest rank sets it); "vs DDP" divides by DDP's median.
  rank-0 peak MiB  torch.distributed._tools.mem_tracker.MemTracker's peak "Total"
                   over one training step on rank 0. Before the step the tracker is
                   given, via track_external, the state that lives across steps:
                   DDP/FSDP2 the module and the optimizer; shardfx the rank's local
                   parameters (engine.runtime.state.params) and buffers and its
                   optimizer (engine.runtime.state.optimizer). Everything the step
                   allocates through the dispatcher is counted (activations,
                   gradients, gathered parameters, collective buffers). Not counted,
                   for anyone: the input batch, and memory allocated outside the
                   dispatcher -- DDP's gradient buckets (about 1x parameter bytes,
                   allocated by its C++ reducer at construction) and temporaries
                   inside shardfx's collective ops (their outputs are counted).
  MiB sent per step  bytes this rank sends in one step, counted by wrapping the
                   collectives the step issues (a TorchDispatchMode that sees
                   c10d ops from DDP/FSDP2 and shardfx's collective ops) and the
                   ring cost model for all: all-reduce 2(N-1)/N of the tensor,
                   all-gather (N-1)/N of its output, reduce-scatter (N-1)/N of its
                   input. For shardfx it is checked against engine.stats()["comm"]["sent"]
                   (a note below the table if they differ by more than 1 KiB: the
                   engine's stats leave out scalars it reduces outside the program).
  final loss       gpt_loss of the trained weights (gathered to full tensors) on a
                   held-out batch, computed by one eager GPT on rank 0. Same init,
                   same data: strategies agree to about 1e-4 relative, or the
                   measurement is broken (flagged below the table).
  predicted ms     the cost model's training step for the engine's program (the program
                   and Adam(W)'s update: Simulation.train_step_seconds) on this machine's
                   profile for the world size (hardware("auto", ranks=N): `shardfx
                   calibrate`'s, else built-in), or with --calibrate the one measured in the
                   job, on which the buckets and prefetch are then also planned.
  buckets, overlap what the step runs: tune_communication's plan, or the Config's settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
import warnings
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import shardfx
from shardfx.graphs.cost_model import Hardware, hardware, simulate
from shardfx.models import GPT, GPTConfig, gpt_loss, num_params
from shardfx.passes.tune_communication import overlap_plan
from shardfx.runtime.launch import launch
from shardfx.tools.calibrate import calibrate_once

MiB = 2**20
BASELINE = "DDP"

# Collective op -> (kind, which tensors set the volume: an argument index or "out", factor).
# Volume is the ZeRO paper's unit (shardfx.graphs.collectives): all-gather counts its output,
# reduce-scatter its input, all-reduce twice its input. Ring algorithms: a rank sends (N-1)/N of it.
_COLLECTIVES: dict[str, tuple[str, int | str, int]] = {
    "c10d::allreduce_": ("all_reduce", 0, 2),
    "c10d::allreduce_coalesced_": ("all_reduce", 0, 2),
    "c10d::_allgather_base_": ("all_gather", 0, 1),  # (output, input, ...)
    "c10d::allgather_": ("all_gather", 0, 1),
    "c10d::allgather_into_tensor_coalesced_": ("all_gather", 0, 1),
    "c10d::_reduce_scatter_base_": ("reduce_scatter", 1, 1),  # (output, input, ...)
    "c10d::reduce_scatter_": ("reduce_scatter", 1, 1),
    "c10d::reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1, 1),
    "shardfx::all_reduce": ("all_reduce", 0, 2),
    "shardfx::all_gather": ("all_gather", "out", 1),
    "shardfx::reduce_scatter": ("reduce_scatter", 0, 1),
    "shardfx::all_reduce_start": ("all_reduce", 0, 2),  # async: priced at start, shardfx::wait moves nothing
    "shardfx::all_reduce_start_": ("all_reduce", 0, 2),  # the same, in its input's storage
    "shardfx::all_gather_start": ("all_gather", "out", 1),
    "shardfx::reduce_scatter_start": ("reduce_scatter", 0, 1),
}


# Ops of those namespaces that move no data: waits, DTensor's autograd wrapper, rank-relative indices.
NOT_COLLECTIVES = {"shardfx::wait", "shardfx::local_index", "_c10d_functional::wait_tensor",
                   "_c10d_functional::_wrap_tensor_autograd"}  # fmt: skip


def _nbytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, Tensor))


class CollectiveCounter(TorchDispatchMode):
    """Counts the collectives a step issues and the bytes this rank sends (ring model).

    All groups here span the whole world, so N is the world size. shardfx's collective
    ops are seen as one op each: the c10d calls inside them run with this mode popped.
    """

    def __init__(self, world_size: int) -> None:
        super().__init__()
        self.world_size = world_size
        self.calls: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.unknown: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if name in _COLLECTIVES:
            kind, which, factor = _COLLECTIVES[name]
            volume = factor * _nbytes(out if which == "out" else args[int(which)])
            n = self.world_size
            self.calls[kind] += 1
            self.sent[kind] += volume * (n - 1) // n
        elif func.namespace in ("c10d", "_c10d_functional", "shardfx") and name not in NOT_COLLECTIVES:
            self.unknown[name] += 1
        return out


class Strategy:
    """One training setup on this rank: step it, name its persistent state, gather its weights."""

    name: str
    setup_s: float

    def step(self, tokens: Tensor, targets: Tensor) -> None:
        raise NotImplementedError

    def persistent_state(self) -> list[Any]:
        """What lives across steps, for MemTracker.track_external."""
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, Tensor]:
        """Full tensors under model.state_dict() keys; a collective (every rank calls it)."""
        raise NotImplementedError


class Eager(Strategy):
    """DDP or FSDP2: the module runs this rank's slice of the global batch."""

    def __init__(self, name: str, module: nn.Module, inner: nn.Module, lr: float, setup_s: float) -> None:
        self.name, self.module, self.inner, self.setup_s = name, module, inner, setup_s
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=lr)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def step(self, tokens: Tensor, targets: Tensor) -> None:
        tokens, targets = tokens.chunk(self.world)[self.rank], targets.chunk(self.world)[self.rank]
        # Equal slices: the mean of local mean losses is the global mean, so the
        # averaged gradients match shardfx's global-mean loss.
        gpt_loss(self.module(tokens), targets).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def persistent_state(self) -> list[Any]:
        return [self.module, self.optimizer]

    def full_state_dict(self) -> dict[str, Tensor]:
        out = {}
        for key, value in self.inner.state_dict().items():
            full = value.full_tensor() if hasattr(value, "full_tensor") else value  # FSDP2: DTensor shards
            out[key] = full.detach().clone()
        return out


class Shardfx(Strategy):
    def __init__(self, name: str, engine: Any, setup_s: float) -> None:
        self.name, self.engine, self.setup_s = name, engine, setup_s

    def step(self, tokens: Tensor, targets: Tensor) -> None:
        self.engine.train_step(tokens, targets)

    def persistent_state(self) -> list[Any]:
        state = self.engine.runtime.state
        # A ParameterList holds the same Parameter objects, so MemTracker files them as parameters.
        return [nn.ParameterList(list(state.params.values())), list(state.buffers.values()), state.optimizer]

    def full_state_dict(self) -> dict[str, Tensor]:
        return self.engine.state_dict()


# name -> (kind, options): the rows of every table, in this order. DDP is the baseline and always runs.
STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    BASELINE: ("ddp", {}),
    "FSDP2 reshard": ("fsdp2", {"reshard_after_forward": True}),
    "FSDP2 no reshard": ("fsdp2", {"reshard_after_forward": False}),
    "shardfx ZeRO-0": ("shardfx", {"zero_stage": 0}),
    "shardfx ZeRO-1": ("shardfx", {"zero_stage": 1}),
    "shardfx ZeRO-2": ("shardfx", {"zero_stage": 2}),
    "shardfx ZeRO-3": ("shardfx", {"zero_stage": 3}),
    "shardfx ZeRO-3 no reshard": ("shardfx", {"zero_stage": 3, "reshard_after_forward": False}),
    # bucket_mb comes from --bucket-mb
    "shardfx ZeRO-3 bucket+overlap": ("shardfx", {"zero_stage": 3, "overlap": True, "prefetch": 1, "bucket_mb": None}),
    # the defaults before the cost model planned communication: no bucketing, no overlap
    "shardfx ZeRO-0 unplanned": ("shardfx", {"zero_stage": 0, "bucket_mb": 0.0, "overlap": False}),
    "shardfx ZeRO-3 unplanned": ("shardfx", {"zero_stage": 3, "bucket_mb": 0.0, "overlap": False}),
}


def build_strategy(name: str, opts: dict[str, Any], cfg: GPTConfig, example: tuple[Tensor, Tensor]) -> Strategy:
    """Every strategy starts from the same seeded GPT; setup_s is its wrap / compile time."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    kind, kwargs = STRATEGIES[name]
    if "bucket_mb" in kwargs and kwargs["bucket_mb"] is None:
        kwargs = {**kwargs, "bucket_mb": float(opts["bucket_mb"])}
    lr = opts["lr"]
    start = time.perf_counter()
    torch.manual_seed(opts["seed"])
    model = GPT(cfg)
    if kind == "ddp":
        return Eager(name, nn.parallel.DistributedDataParallel(model), model, lr, time.perf_counter() - start)
    if kind == "fsdp2":
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh, **kwargs)
        fully_shard(model, mesh=mesh, **kwargs)
        return Eager(name, model, model, lr, time.perf_counter() - start)
    engine = shardfx.compile_distributed(
        model,
        None,
        example_inputs=example,
        loss_fn=gpt_loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
        config=shardfx.Config(**kwargs, collective_timeout=float(opts["timeout"])),
    )
    return Shardfx(name, engine, time.perf_counter() - start)


def timed_step(strategy: Strategy, tokens: Tensor, targets: Tensor) -> float:
    dist.barrier()
    start = time.perf_counter()
    strategy.step(tokens, targets)
    dist.barrier()
    return time.perf_counter() - start


def peak_memory(strategy: Strategy, tokens: Tensor, targets: Tensor) -> dict[str, int]:
    tracker = MemTracker()
    tracker.track_external(*strategy.persistent_state())
    with tracker:
        strategy.step(tokens, targets)
    (snapshot,) = tracker.get_tracker_snapshot("peak").values()  # one device: cpu
    return {str(getattr(k, "value", k)): v for k, v in snapshot.items()}


def count_collectives(strategy: Strategy, tokens: Tensor, targets: Tensor) -> dict[str, Any]:
    counter = CollectiveCounter(dist.get_world_size())
    with counter:
        strategy.step(tokens, targets)
    out: dict[str, Any] = {"calls": dict(counter.calls), "sent": dict(counter.sent), "unknown": dict(counter.unknown)}
    if isinstance(strategy, Shardfx):
        out["engine"] = strategy.engine.stats()["comm"]
    return out


def make_batches(opts: dict[str, Any], n: int, vocab: int, seq: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(opts["seed"] + 1)
    shape = (opts["batch"], seq)
    return [
        (torch.randint(0, vocab, shape, generator=gen), torch.randint(0, vocab, shape, generator=gen)) for _ in range(n)
    ]


def measure(
    strategies: list[Strategy], batches: list[tuple[Tensor, Tensor]], warmup: int, peak: Any
) -> tuple[dict[str, list[float]], dict[str, dict[str, int]], dict[str, dict[str, Any]]]:
    """Step every strategy on every batch, round-robin: `warmup` untimed steps, one under `peak`
    (memory), one under the collective counter, the rest timed. Returns (times, memory, comm)."""
    k = len(strategies)
    times: dict[str, list[float]] = {s.name: [] for s in strategies}
    memory: dict[str, dict[str, int]] = {}
    comm: dict[str, dict[str, Any]] = {}
    for i, (tokens, targets) in enumerate(batches):
        for s in strategies[i % k :] + strategies[: i % k]:  # rotate who goes first
            if i < warmup:
                s.step(tokens, targets)
            elif i == warmup:
                memory[s.name] = peak(s, tokens, targets)
            elif i == warmup + 1:
                comm[s.name] = count_collectives(s, tokens, targets)
            else:
                times[s.name].append(timed_step(s, tokens, targets))
    return times, memory, comm


def model_config(opts: dict[str, Any]) -> GPTConfig:
    """docs/TARGETS.md's GPT; with --tiny a 1-layer, 64-wide one (the smoke test's: it checks the script runs)."""
    if opts.get("tiny"):
        return GPTConfig(vocab_size=128, n_layer=1, d_model=64, n_head=2, seq_len=32, tie_weights=opts["tie_weights"])
    return GPTConfig(vocab_size=1024, n_layer=4, d_model=256, n_head=4, seq_len=128, tie_weights=opts["tie_weights"])


def worker(opts: dict[str, Any]) -> dict[str, Any]:
    """One rank of the job: every strategy, stepped round-robin; rank 0's numbers come back."""
    # shardfx's DistComm calls all_gather_into_tensor / reduce_scatter_tensor, deprecated in torch 2.13.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    rank = dist.get_rank()
    cfg = model_config(opts)
    n_steps = opts["warmup"] + 2 + opts["steps"]
    batches = make_batches(opts, n_steps + 1, cfg.vocab_size, cfg.seq_len)
    held_out = batches.pop()
    names = [n for n in STRATEGIES if n == BASELINE or opts["only"] is None or n in opts["only"]]
    if opts["calibrate"]:
        profile = calibrated_here()
    else:  # the profile the engines will plan on: measured first if this machine has none at this count
        calibrate_once("auto", print if rank == 0 else None)
        profile = hardware("auto", ranks=dist.get_world_size())
    strategies = [build_strategy(name, opts, cfg, batches[0]) for name in names]
    times, memory, comm = measure(strategies, batches, opts["warmup"], peak_memory)
    results: dict[str, Any] = {}
    reference: dict[str, Tensor] | None = None
    for s in strategies:
        state = s.full_state_dict()
        row = {"setup_s": s.setup_s, "times_s": times[s.name], "peak": memory[s.name], "comm": comm[s.name]}
        if isinstance(s, Shardfx):
            row["predicted_ms"] = simulate(s.engine.program, profile).train_step_seconds * 1e3
            row["plan"] = plan_of(s.engine)
        if rank == 0:
            torch.manual_seed(opts["seed"])
            model = GPT(cfg)
            model.load_state_dict(state)
            with torch.no_grad():
                row["final_loss"] = gpt_loss(model(held_out[0]), held_out[1]).item()
            if reference is None:  # DDP comes first
                reference = state
            row["max_abs_weight_diff_vs_ddp"] = max((state[key] - reference[key]).abs().max().item() for key in state)
        results[s.name] = row
    return {
        "rank": rank,
        "threads": torch.get_num_threads(),
        "params": num_params(GPT(cfg)),
        "strategies": results,
        "profile": dataclasses.asdict(profile),
    }


def calibrated_here() -> Hardware:
    """`shardfx calibrate`'s measurements, taken in this job's processes before any strategy is built
    (--calibrate): the profile then meets the machine's load as the steps that follow do. It is kept
    as this process's calibration (in a file of its own, the user's is untouched), so the engines'
    plans (Config(hardware="auto")) are made on the profile the predictions use."""
    import tempfile
    from pathlib import Path

    from shardfx.graphs import cost_model
    from shardfx.tools import calibrate

    world = dist.get_world_size()
    profile = calibrate.profile(calibrate.measure_all(), world, f"calibrated in this job, {world} gloo ranks")
    cost_model.CALIBRATION_FILE = Path(tempfile.mkdtemp(prefix="zero_vs_fsdp2-")) / "hardware.json"
    cost_model.save_calibration(profile)
    return profile


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (ties take their mean rank)."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")


def plan_of(engine: Any) -> str:
    """What bucketing and overlap the step runs: tune_communication's choice, or the Config's."""
    stats = next((r.stats for r in engine.pass_records if r.name == "tune_communication"), None)
    if stats is None:
        config = engine.config
        stats = {"bucket_mb": config.bucket_mb, "overlap": config.overlap, "prefetch": config.prefetch}
    return overlap_plan(stats)


def summarize(ranks: dict[int, dict[str, Any]], loss_rtol: float) -> tuple[list[str], dict[str, Any]]:
    """The markdown table (rank 0's numbers) and the JSON record of one world size."""
    rows = ranks[0]["strategies"]
    base_ms = statistics.median(rows[BASELINE]["times_s"]) * 1e3
    base_loss = rows[BASELINE]["final_loss"]
    lines = [
        "| strategy | median step ms | vs DDP | rank-0 peak MiB | MiB sent per step | final loss | predicted ms | buckets, overlap |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes = []
    record: dict[str, Any] = {"threads_per_rank": ranks[0]["threads"], "params": ranks[0]["params"], "strategies": {}}
    for name, row in rows.items():
        ms = statistics.median(row["times_s"]) * 1e3
        sent = sum(row["comm"]["sent"].values())
        peak = row["peak"]["Total"]
        loss = row["final_loss"]
        predicted = f"{row['predicted_ms']:.1f}" if "predicted_ms" in row else "-"
        lines.append(
            f"| {name} | {ms:.1f} | {ms / base_ms:.2f} | {peak / MiB:.1f} | {sent / MiB:.2f} | {loss:.6f} "
            f"| {predicted} | {row.get('plan', '-')} |"
        )
        if abs(loss - base_loss) > loss_rtol * abs(base_loss):
            notes.append(
                f"MISMATCH: {name}'s final loss {loss:.6f} differs from DDP's {base_loss:.6f} by more than {loss_rtol:g} relative"
            )
        engine = row["comm"].get("engine")
        # The engine's stats cover the program's collectives, not scalars it reduces outside it (grad norm).
        if engine is not None and abs(sum(engine["sent"].values()) - sent) > 1024:
            notes.append(
                f"note: {name} engine.stats() says {sum(engine['sent'].values())} bytes sent, the counter {sent}"
            )
        if row["comm"]["unknown"]:
            notes.append(f"note: {name} issued collectives the counter does not price: {row['comm']['unknown']}")
        record["strategies"][name] = {
            **row,
            "median_ms": ms,
            "quartiles_ms": [q * 1e3 for q in statistics.quantiles(row["times_s"], n=4)]
            if len(row["times_s"]) > 1
            else None,
            "vs_ddp": ms / base_ms,
            "peak_bytes_rank0": peak,
            "peak_bytes_per_rank": [ranks[r]["strategies"][name]["peak"]["Total"] for r in sorted(ranks)],
            "sent_bytes": sent,
        }
    predicted = {n: r for n, r in record["strategies"].items() if "predicted_ms" in r}
    if len(predicted) >= 2:
        ratios = {n: r["median_ms"] / r["predicted_ms"] for n, r in predicted.items()}
        rho = spearman([r["median_ms"] for r in predicted.values()], [r["predicted_ms"] for r in predicted.values()])
        worst = max(ratios, key=lambda n: max(ratios[n], 1 / ratios[n]))
        profile = ranks[0]["profile"]
        notes.append(
            f"cost model ({profile['name']}: {profile['source']}): measured / predicted "
            f"{min(ratios.values()):.2f}-{max(ratios.values()):.2f} over the {len(predicted)} shardfx rows "
            f"(furthest: {worst}, {ratios[worst]:.2f}); Spearman rank correlation {rho:.2f}"
        )
        record["cost_model"] = {"ratios": ratios, "spearman": rho, "profile": profile}
    return lines + [""] * bool(notes) + notes, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--world-sizes", default="2,4", help="comma-separated world sizes, one job each (default %(default)s)"
    )
    parser.add_argument(
        "--steps", type=int, default=25, help="timed steps per strategy; the median is reported (default %(default)s)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps per strategy before measuring, >= 2: DDP rebuilds its gradient buckets in its second step (default %(default)s)",
    )
    parser.add_argument(
        "--batch", type=int, default=8, help="global batch size, split over the ranks (default %(default)s)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default %(default)s)")
    parser.add_argument(
        "--bucket-mb",
        type=float,
        default=25.0,
        help="Config.bucket_mb of the 'shardfx ZeRO-3 bucket+overlap' row, MiB per bucket (default %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the model init (batches use seed+1) (default %(default)s)"
    )
    parser.add_argument(
        "--tie-weights",
        action="store_true",
        help="tie the token embedding and the head (3.45M params; default untied, 3.72M, as in docs/TARGETS.md)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated strategy names to run besides DDP, e.g. 'FSDP2 reshard,shardfx ZeRO-3' (default: all)",
    )
    parser.add_argument(
        "--loss-rtol",
        type=float,
        default=1e-4,
        help="flag final losses further than this from DDP's, relative (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds a rank waits in a collective before the job fails (default %(default)s)",
    )
    parser.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the raw numbers (every step time, memory breakdowns, collective counts) here",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="measure the cost model's profile in this job before the strategies (default: this machine's "
        "saved calibration, `shardfx calibrate`, else the built-in one)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a 1-layer, 64-wide GPT: checks the script runs (figures mean nothing)"
    )
    args = parser.parse_args()
    if args.warmup < 2 or args.steps < 1:
        parser.error(f"--warmup must be >= 2 and --steps >= 1; got {args.warmup} and {args.steps}")
    world_sizes = [int(w) for w in args.world_sizes.split(",")]
    for w in world_sizes:
        if w < 1 or args.batch % w:
            parser.error(f"world size {w} must be >= 1 and divide the global batch {args.batch}")
    only = [n.strip() for n in args.only.split(",")] if args.only else None
    unknown = sorted(set(only or []) - set(STRATEGIES))
    if unknown:
        parser.error(f"--only names unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    opts = {**vars(args), "only": only}
    print(
        f"GPT {'1x64, vocab 128, seq 32 (--tiny)' if args.tiny else '4x256, vocab 1024, seq 128'}, {'tied' if args.tie_weights else 'untied'} head; global batch {args.batch}, "
        f"AdamW lr {args.lr}; {args.warmup} warm-up + 2 instrumented + {args.steps} timed steps; {os.cpu_count()} cores"
    )
    report: dict[str, Any] = {"options": vars(args), "torch": torch.__version__, "world_sizes": {}}
    total = time.perf_counter()
    for world in world_sizes:
        start = time.perf_counter()
        ranks = launch(worker, (opts,), world, timeout=args.timeout)
        lines, record = summarize(ranks, args.loss_rtol)
        record["wall_s"] = time.perf_counter() - start
        report["world_sizes"][str(world)] = record
        print(
            f"\n### world size {world} ({record['threads_per_rank']} torch threads per rank, {record['params']:,} params, {record['wall_s']:.0f} s)\n"
        )
        print("\n".join(lines), flush=True)
    report["wall_s"] = time.perf_counter() - total
    print(f"\ntotal wall time {report['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"raw numbers in {args.json}")


if __name__ == "__main__":
    main()
