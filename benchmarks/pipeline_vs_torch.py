"""Pipeline parallelism: shardfx's stages and schedules against torch.distributed.pipelining, on gloo.

    python benchmarks/pipeline_vs_torch.py                       # pp 2 and 4, M = 4 and 8
    python benchmarks/pipeline_vs_torch.py --pp-sizes 2 --microbatches 4 --steps 5
    python benchmarks/pipeline_vs_torch.py --tiny --pp-sizes 2 --microbatches 2 --steps 1   # checks it runs

Model: the built-in GPT, untied (torch's pipelining cannot tie a weight across stages):
8 layers, d_model 256, 4 heads, seq 128, vocab 1024 (--tiny: 2 layers, d_model 64, seq
32, vocab 128); global batch 16 sequences; SGD(lr=0.1, momentum=0.9); every rank is one
stage (world size = pp). Strategies, stepped round-robin in the same processes:

    torch GPipe / torch 1F1B        PipelineStage per rank (the blocks split evenly by count;
                                    stage 0 also holds the embeddings, the last the final norm
                                    and head), ScheduleGPipe / Schedule1F1B, loss in the schedule
    shardfx gpipe / shardfx 1f1b    compile_distributed(..., Config(pp_size=P, pp_microbatches=M,
                                    pp_schedule=...)): the stages the cost model cuts
    shardfx 1f1b even               the same as shardfx 1f1b, cut evenly by block count (Config.pp_split),
                                    as torch's split: the cost model's cut against the even one

Columns: median step ms (barrier -> step -> barrier), the ratio to torch's step at the same
schedule, the largest per-rank peak MiB (parameters and optimizer state, plus the tensors one
step makes, counted by a dispatch mode: torch's MemTracker refuses a module called once per
micro-batch), shardfx's measured bubble (the share of the step a rank spent waiting in
receives, the median over ranks) against the formula (P-1)/(M+P-1), and the last loss.

On a shared 2-core machine with more ranks than cores the stages cannot all run at once: step
times then add up across stages instead of overlapping, and the bubble measured is not the
schedule's. Quote medians and ratios; the bubble means what it says only with a core per rank.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import zero_vs_fsdp2 as harness  # noqa: E402  (its timed step: barrier, step, barrier)

import shardfx  # noqa: E402
from shardfx.graphs.pp_schedule import bubble_fraction  # noqa: E402
from shardfx.models import GPT, GPTConfig, gpt_loss  # noqa: E402
from shardfx.runtime.launch import launch  # noqa: E402

MiB = 2**20
STRATEGIES = ("torch GPipe", "shardfx gpipe", "torch 1F1B", "shardfx 1f1b", "shardfx 1f1b even")
BASELINE = {"shardfx gpipe": "torch GPipe", "shardfx 1f1b": "torch 1F1B", "shardfx 1f1b even": "torch 1F1B"}


def model_config(opts: dict[str, Any]) -> GPTConfig:
    if opts["tiny"]:
        return GPTConfig(vocab_size=128, n_layer=2, d_model=64, n_head=2, seq_len=32, tie_weights=False)
    return GPTConfig(vocab_size=1024, n_layer=8, d_model=256, n_head=4, seq_len=128, tie_weights=False)


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def even_starts(n_layer: int, pp: int) -> list[int]:
    """The first block of each stage when the blocks are split evenly by count."""
    return [s * n_layer // pp for s in range(pp)]


class TorchStageModule(nn.Module):
    """One stage of the GPT for torch's pipelining: its blocks, and the ends on the first and last."""

    def __init__(self, model: GPT, first: int, last: int, is_first: bool, is_last: bool) -> None:
        super().__init__()
        self.is_first, self.is_last = is_first, is_last
        self.wte = model.wte if is_first else None
        self.wpe = model.wpe if is_first else None
        self.blocks = nn.ModuleList(model.blocks[first:last])
        self.ln_f = model.ln_f if is_last else None
        self.head = model.head if is_last else None

    def forward(self, x: Tensor) -> Tensor:
        if self.is_first:
            pos = torch.arange(x.shape[1], device=x.device)
            x = self.wte(x) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        if self.is_last:
            x = self.head(self.ln_f(x))
        return x


class TorchPipeline:
    def __init__(self, name: str, opts: dict[str, Any], cfg: GPTConfig) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        start = time.perf_counter()
        self.name, self.rank, self.pp = name, dist.get_rank(), dist.get_world_size()
        torch.manual_seed(opts["seed"])
        model = GPT(cfg)
        bounds = [*even_starts(cfg.n_layer, self.pp), cfg.n_layer]
        self.module = TorchStageModule(
            model, bounds[self.rank], bounds[self.rank + 1], self.rank == 0, self.rank == self.pp - 1
        )
        self.prefix = {id(p): n for n, p in model.named_parameters()}
        stage = PipelineStage(self.module, self.rank, self.pp, torch.device("cpu"))
        kind = ScheduleGPipe if "GPipe" in name else Schedule1F1B
        self.schedule = kind(stage, n_microbatches=opts["microbatches"], loss_fn=gpt_loss)
        self.optimizer = sgd(self.module.parameters())
        self.setup_s = time.perf_counter() - start
        self.last_loss = float("nan")
        self.bubble: list[float] = []

    def step(self, tokens: Tensor, targets: Tensor) -> None:
        losses: list[Tensor] = []
        if self.rank == 0:
            self.schedule.step(tokens)
        elif self.rank == self.pp - 1:
            self.schedule.step(target=targets, losses=losses)
        else:
            self.schedule.step()
        # the schedule scales the summed micro-batch gradients by 1/M (scale_grads): the mean, as shardfx's
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if losses:
            self.last_loss = float(torch.stack(losses).mean())

    def persistent_state(self) -> list[Any]:
        return [self.module, self.optimizer]


class ShardfxPipeline:
    def __init__(self, name: str, opts: dict[str, Any], cfg: GPTConfig, example: tuple[Tensor, Tensor]) -> None:
        start = time.perf_counter()
        self.name = name
        torch.manual_seed(opts["seed"])
        model = GPT(cfg)
        pp = dist.get_world_size()
        split = [f"blocks.{b}" for b in even_starts(cfg.n_layer, pp)[1:]] if name.endswith("even") else None
        config = shardfx.Config(
            pp_size=pp,
            pp_microbatches=opts["microbatches"],
            pp_schedule="gpipe" if "gpipe" in name else "1f1b",
            pp_split=split,
            collective_timeout=opts["timeout"],
        )
        self.engine = shardfx.compile_distributed(
            model, None, example_inputs=example, loss_fn=gpt_loss, optimizer=sgd, config=config
        )
        self.starts = self.engine.program.notes["pipeline"]["starts"]
        self.setup_s = time.perf_counter() - start
        self.last_loss = float("nan")
        self.bubble: list[float] = []

    def step(self, tokens: Tensor, targets: Tensor) -> None:
        comm = self.engine.runtime.comm
        comm.recv_seconds = 0.0
        start = time.perf_counter()
        self.last_loss = float(self.engine.train_step(tokens, targets))
        self.bubble.append(comm.recv_seconds / (time.perf_counter() - start))

    def persistent_state(self) -> list[Any]:
        state = self.engine.runtime.state
        return [nn.ParameterList(list(state.params.values())), state.optimizer]


class LiveBytes(TorchDispatchMode):
    """The most bytes of tensor storage alive at once among those the step creates, plus what lives
    across steps. (torch's MemTracker refuses a module called once per micro-batch, as pipelines do.)"""

    def __init__(self, persistent: int) -> None:
        super().__init__()
        self.live = self.peak = persistent
        self._refs: dict[int, list[int]] = {}  # storage data_ptr -> [bytes, tensors tracked]

    def _drop(self, ptr: int) -> None:
        entry = self._refs.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[ptr]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                entry = self._refs.get(ptr)
                if entry is None:
                    entry = self._refs[ptr] = [storage.nbytes(), 0]
                    self.live += entry[0]
                    self.peak = max(self.peak, self.live)
                entry[1] += 1
                weakref.finalize(t, self._drop, ptr)
        return out


def _state_bytes(objects: list[Any]) -> int:
    seen: dict[int, int] = {}
    for obj in objects:
        if isinstance(obj, nn.Module):
            tensors = [*obj.parameters(), *obj.buffers()]
        elif isinstance(obj, torch.optim.Optimizer):
            tensors = [v for st in obj.state.values() for v in st.values() if isinstance(v, Tensor)]
        else:
            tensors = []
        for t in tensors:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def peak_bytes(strategy: Any, tokens: Tensor, targets: Tensor) -> int:
    mode = LiveBytes(_state_bytes(strategy.persistent_state()))
    with mode:
        strategy.step(tokens, targets)
    return mode.peak


def worker(opts: dict[str, Any]) -> dict[str, Any]:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    cfg = model_config(opts)
    gen = torch.Generator().manual_seed(opts["seed"] + 1)
    shape = (opts["batch"], cfg.seq_len)
    n_steps = opts["warmup"] + 1 + opts["steps"]
    batches = [
        (torch.randint(0, cfg.vocab_size, shape, generator=gen), torch.randint(0, cfg.vocab_size, shape, generator=gen))
        for _ in range(n_steps)
    ]
    strategies: list[Any] = []
    for name in opts["strategies"]:
        if name.startswith("torch"):
            strategies.append(TorchPipeline(name, opts, cfg))
        else:
            strategies.append(ShardfxPipeline(name, opts, cfg, batches[0]))
    times: dict[str, list[float]] = {s.name: [] for s in strategies}
    peaks: dict[str, int] = {}
    for i, (tokens, targets) in enumerate(batches):
        k = len(strategies)
        for s in strategies[i % k :] + strategies[: i % k]:  # rotate who goes first
            if i < opts["warmup"]:
                s.step(tokens, targets)
            elif i == opts["warmup"]:
                peaks[s.name] = peak_bytes(s, tokens, targets)
            else:
                times[s.name].append(harness.timed_step(s, tokens, targets))
    rows = {}
    for s in strategies:
        rows[s.name] = {
            "setup_s": s.setup_s,
            "times_s": times[s.name],
            "peak": peaks[s.name],
            "last_loss": s.last_loss,
            "bubble": statistics.median(s.bubble[opts["warmup"] + 1 :]) if s.bubble[opts["warmup"] + 1 :] else None,
            "starts": getattr(s, "starts", None),
        }
    return {"rank": dist.get_rank(), "strategies": rows}


def summarize(ranks: dict[int, dict[str, Any]], pp: int, micro: int) -> list[str]:
    names = list(ranks[0]["strategies"])
    last = ranks[pp - 1]["strategies"]
    formula = bubble_fraction(pp, micro)
    lines = [
        f"### pp={pp}, M={micro} (bubble formula (P-1)/(M+P-1) = {formula:.1%})",
        "",
        "| strategy | median step ms | vs torch (same schedule) | max rank peak MiB | bubble measured | last loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    median = {n: statistics.median(ranks[0]["strategies"][n]["times_s"]) * 1e3 for n in names}
    for name in names:
        base = BASELINE.get(name)
        ratio = f"{median[name] / median[base]:.2f}" if base in median else "1.00" if name.startswith("torch") else "-"
        peak = max(r["strategies"][name]["peak"] for r in ranks.values()) / MiB
        bubbles = [
            r["strategies"][name]["bubble"] for r in ranks.values() if r["strategies"][name]["bubble"] is not None
        ]
        bubble = f"{statistics.median(bubbles):.1%}" if bubbles else "-"
        lines.append(
            f"| {name} | {median[name]:.1f} | {ratio} | {peak:.1f} | {bubble} | {last[name]['last_loss']:.5f} |"
        )
    starts = {n: ranks[0]["strategies"][n]["starts"] for n in names if ranks[0]["strategies"][n]["starts"]}
    for name, where in starts.items():
        lines.append(f"{name}: stages begin at {', '.join(w or '(input)' for w in where)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp-sizes", default="2,4", help="comma-separated pipeline sizes (default %(default)s)")
    parser.add_argument("--microbatches", default="4,8", help="comma-separated M (default %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per strategy (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="global batch in sequences (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init; batches use seed+1")
    parser.add_argument("--only", default=None, help=f"comma-separated strategies of {list(STRATEGIES)}")
    parser.add_argument("--timeout", type=float, default=600.0, help="collective timeout, seconds")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the raw numbers here")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide GPT: checks the script runs")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    strategies = list(STRATEGIES) if args.only is None else [s.strip() for s in args.only.split(",")]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        parser.error(f"--only: unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    record = []
    for pp in [int(x) for x in args.pp_sizes.split(",")]:
        for micro in [int(x) for x in args.microbatches.split(",")]:
            opts = {**vars(args), "microbatches": micro, "strategies": strategies}
            ranks = launch(worker, (opts,), pp, timeout=args.timeout)
            print("\n".join(summarize(ranks, pp, micro)))
            print()
            record.append({"pp": pp, "microbatches": micro, "ranks": ranks})
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
