"""Tensor parallelism: shardfx's plan against torch's own (parallelize_module), on gloo, in one run.

    python benchmarks/tp_vs_torch.py                      # tp 2 and 4
    python benchmarks/tp_vs_torch.py --tp-sizes 2 --steps 10 --json /tmp/tp.json
    python benchmarks/tp_vs_torch.py --tiny --tp-sizes 2 --steps 1   # checks the script runs

Model: Hugging Face Llama from a config built in code (random init): 4 layers,
hidden 256, MLP 512, 8 query heads sharing 4 kv heads, vocab 1024, seq 128
(--tiny: 1 layer, hidden 64, seq 32, vocab 128); batch 4 (every rank the same
batch: the world is one tp group), AdamW(lr=1e-3), cross-entropy on the logits.

Strategies, side by side in the same N processes (gloo), stepped round-robin
with the order rotating every step (the harness of zero_vs_fsdp2.py):

    torch TP       parallelize_module: q, k, v, gate, up ColwiseParallel; o, down
                   RowwiseParallel; lm_head ColwiseParallel with replicated logits
                   (torchtitan's plan without loss parallelism and sequence parallelism;
                   torch's SequenceParallel does not run on Hugging Face's Llama decoder
                   layer, whose residual adds see plain tensors: torch_tp(sequence=True)
                   fails with a size mismatch, so there is no torch SP row)
    shardfx tp     compile_distributed(..., Config(tp_size=N)): the automatic plan
                   (blocks, vocab-parallel embedding, head and cross-entropy)
    shardfx tp+SP  the same with Config(sequence_parallel=True)

Columns: median step ms (barrier -> step -> barrier), the ratio to torch TP,
rank-0 peak MiB (MemTracker over one step, parameters and optimizer state
included), MiB rank 0 sends per step (ring model, collectives counted as they
are issued), and the last training loss (the same init and data: strategies
agree to about 1e-4 relative, else the measurement is broken and a note says so).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zero_vs_fsdp2 as harness  # noqa: E402  (the shared measurement loop)

import shardfx  # noqa: E402
from shardfx.runtime.launch import launch  # noqa: E402

MiB = 2**20
BASELINE = "torch TP"
STRATEGIES = ("torch TP", "shardfx tp", "shardfx tp+SP")
# torch's tensor parallelism issues functional collectives; price them like the c10d ones
harness._COLLECTIVES.update(
    {
        "_c10d_functional::all_reduce": ("all_reduce", 0, 2),
        "_c10d_functional::all_reduce_": ("all_reduce", 0, 2),
        "_c10d_functional::all_gather_into_tensor": ("all_gather", "out", 1),
        "_c10d_functional::reduce_scatter_tensor": ("reduce_scatter", 0, 1),
    }
)


def llama(opts: dict[str, Any]) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = opts["tiny"]
    config = LlamaConfig(
        vocab_size=128 if tiny else 1024,
        hidden_size=64 if tiny else 256,
        intermediate_size=128 if tiny else 512,
        num_hidden_layers=1 if tiny else 4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=opts["seq"],
        use_cache=False,
    )
    torch.manual_seed(opts["seed"])
    return LlamaForCausalLM(config)


def lm_loss(out: Any, targets: Tensor) -> Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    if hasattr(logits, "full_tensor"):  # a DTensor (torch TP + SP keeps the logits replicated)
        logits = logits.full_tensor()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class TorchTP(harness.Strategy):
    def __init__(self, name: str, model: nn.Module, lr: float, setup_s: float) -> None:
        self.name, self.model, self.setup_s = name, model, setup_s
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        self.last_loss = float("nan")

    def step(self, tokens: Tensor, targets: Tensor) -> None:
        loss = lm_loss(self.model(tokens), targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = float(loss.detach())

    def persistent_state(self) -> list[Any]:
        return [self.model, self.optimizer]


class ShardfxTP(harness.Shardfx):
    def step(self, tokens: Tensor, targets: Tensor) -> None:
        self.last_loss = float(self.engine.train_step(tokens, targets))


def torch_tp(model: nn.Module, sequence: bool) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    block: dict[str, Any] = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1) if sequence else Replicate()),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1) if sequence else Replicate()),
    }
    if sequence:
        block.update(
            {
                "input_layernorm": SequenceParallel(),
                "post_attention_layernorm": SequenceParallel(),
                "self_attn": PrepareModuleInput(
                    input_kwarg_layouts={"hidden_states": Shard(1)},
                    desired_input_kwarg_layouts={"hidden_states": Replicate()},
                ),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            }
        )
    for layer in model.model.layers:
        parallelize_module(layer, mesh, block)
    top: dict[str, Any] = {"lm_head": ColwiseParallel(output_layouts=Replicate())}
    if sequence:
        top = {
            "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "model.norm": SequenceParallel(),
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
        }
    parallelize_module(model, mesh, top)
    return model


def build(name: str, opts: dict[str, Any], example: tuple[Tensor, Tensor]) -> harness.Strategy:
    start = time.perf_counter()
    model = llama(opts)
    if name.startswith("torch"):
        model = torch_tp(model, sequence=name.endswith("SP"))
        return TorchTP(name, model, opts["lr"], time.perf_counter() - start)
    tp = dist.get_world_size()
    engine = shardfx.compile_distributed(
        model,
        None,
        example_inputs=example,
        loss_fn=lm_loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=opts["lr"]),
        config=shardfx.Config(tp_size=tp, sequence_parallel=name.endswith("SP"), collective_timeout=opts["timeout"]),
    )
    strategy = ShardfxTP(name, engine, time.perf_counter() - start)
    strategy.last_loss = float("nan")
    return strategy


def worker(opts: dict[str, Any]) -> dict[str, Any]:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    vocab = 128 if opts["tiny"] else 1024
    n_steps = opts["warmup"] + 2 + opts["steps"]
    gen = torch.Generator().manual_seed(opts["seed"] + 1)
    shape = (opts["batch"], opts["seq"])
    batches = [
        (torch.randint(0, vocab, shape, generator=gen), torch.randint(0, vocab, shape, generator=gen))
        for _ in range(n_steps)
    ]
    strategies = [build(name, opts, batches[0]) for name in opts["strategies"]]
    times, memory, comm = harness.measure(strategies, batches, opts["warmup"], harness.peak_memory)
    rows = {
        s.name: {
            "setup_s": s.setup_s,
            "times_s": times[s.name],
            "peak": memory[s.name],
            "comm": comm[s.name],
            "last_loss": s.last_loss,
        }
        for s in strategies
    }
    return {"rank": dist.get_rank(), "threads": torch.get_num_threads(), "strategies": rows}


def summarize(rank0: dict[str, Any], loss_rtol: float) -> list[str]:
    rows = rank0["strategies"]
    base_ms = statistics.median(rows[BASELINE]["times_s"]) * 1e3
    base_loss = rows[BASELINE]["last_loss"]
    lines = [
        "| strategy | median step ms | vs torch TP | rank-0 peak MiB | MiB sent per step | last loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for name, row in rows.items():
        ms = statistics.median(row["times_s"]) * 1e3
        sent = sum(row["comm"]["sent"].values()) / MiB
        loss = row["last_loss"]
        lines.append(
            f"| {name} | {ms:.1f} | {ms / base_ms:.2f} | {row['peak']['Total'] / MiB:.1f} | {sent:.2f} | {loss:.6f} |"
        )
        if abs(loss - base_loss) > loss_rtol * abs(base_loss):
            notes.append(f"MISMATCH: {name}'s last loss {loss:.6f} differs from torch TP's {base_loss:.6f}")
        if row["comm"]["unknown"]:
            notes.append(f"note: {name} issued collectives the counter does not price: {row['comm']['unknown']}")
    return lines + [""] * bool(notes) + notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tp-sizes", default="2,4", help="comma-separated tp sizes, one job each (default %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per strategy (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per strategy first (default %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step, on every rank (default %(default)s)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default %(default)s; --tiny: 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the init; batches use seed+1 (default %(default)s)"
    )
    parser.add_argument(
        "--only", default=None, help=f"comma-separated strategies besides torch TP, of {list(STRATEGIES)}"
    )
    parser.add_argument(
        "--loss-rtol", type=float, default=1e-3, help="flag last losses this far apart (default %(default)s)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="collective timeout, seconds (default %(default)s)"
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the raw numbers here")
    parser.add_argument("--tiny", action="store_true", help="a 1-layer, 64-wide Llama: checks the script runs")
    args = parser.parse_args()
    if args.tiny and args.seq == 128:
        args.seq = 32
    if args.warmup < 1 or args.steps < 1:
        parser.error(f"--warmup and --steps must be >= 1; got {args.warmup} and {args.steps}")
    only = [n.strip() for n in args.only.split(",")] if args.only else list(STRATEGIES)
    unknown = sorted(set(only) - set(STRATEGIES))
    if unknown:
        parser.error(f"--only names unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    names = [n for n in STRATEGIES if n == BASELINE or n in only]
    opts = {**vars(args), "strategies": names}
    print(
        f"Llama {'1x64, vocab 128' if args.tiny else '4x256, MLP 512, 8 heads / 4 kv heads, vocab 1024'}, seq {args.seq}, "
        f"batch {args.batch}; {args.warmup} warm-up + 2 instrumented + {args.steps} timed steps; {os.cpu_count()} cores"
    )
    report: dict[str, Any] = {"options": vars(args), "torch": torch.__version__, "tp": {}}
    for tp in [int(t) for t in args.tp_sizes.split(",")]:
        start = time.perf_counter()
        ranks = launch(worker, (opts,), tp, timeout=args.timeout)
        rank0 = ranks[0] if isinstance(ranks, dict) and 0 in ranks else ranks
        print(f"\ntp = {tp} ({rank0['threads']} torch threads per rank, {time.perf_counter() - start:.0f} s)")
        print("\n".join(summarize(rank0, args.loss_rtol)))
        report["tp"][tp] = rank0
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nraw numbers written to {args.json}")


if __name__ == "__main__":
    main()
