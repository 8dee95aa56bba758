"""Fused regions of the GPT training step: our Triton kernels against eager and torch.compile.

On a GPU machine, in one go (about a minute):

    python3 -m pip install -e '.[triton]' && python3 benchmarks/triton_regions.py

prints, for every fused region of one GPT step (fwd + bwd), the time of its
ops run eagerly, of our generated kernel and of torch.compile (Inductor) on
the same ops, with the bytes the region must move (inputs read once + outputs
written once) and the achieved GB/s against the device's peak bandwidth.

On a CPU machine, `--static` compares without timing: kernels per step and
bytes moved in fused regions by shardfx against what Inductor's CPU backend
reports for the same step (torch._inductor.metrics):

    TRITON_INTERPRET=1 python3 benchmarks/triton_regions.py --static
"""

from __future__ import annotations

import argparse
import operator
import os
import tempfile
from typing import Any

import torch
import torch.fx as fx

from shardfx.config import Config
from shardfx.driver import Traced, build_mesh, capture_step, compile_traced
from shardfx.graphs.analysis import ALIAS_OPS
from shardfx.graphs.program import FUSION_REGIONS, TRITON_REGIONS, DistProgram
from shardfx.models import GPT, GPTConfig, gpt_loss
from shardfx.passes.pipeline import FUSE

PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}  # data-sheet HBM bandwidth


def gpt_program(cfg: GPTConfig, batch: int, device: str) -> tuple[GPT, tuple, DistProgram]:
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device)
    targets = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device)
    config = Config()
    program = capture_step(model, (tokens, targets), gpt_loss, config, build_mesh(config, 1)).program
    return model, (tokens, targets), program


def region_graphs(program: DistProgram) -> list[dict[str, Any]]:
    """For each region the fuse pass marked: its kernel and a GraphModule of its unfused ops."""
    from shardfx.kernels import cache
    from shardfx.kernels.codegen import generate
    from shardfx.kernels.launch import CompiledRegion
    from shardfx.kernels.layout import Domain

    notes = program.notes[FUSION_REGIONS]
    groups: dict[int, list[fx.Node]] = {}
    for node in program.graph.nodes:
        if node.meta.get("shardfx.fusion") is not None:
            groups.setdefault(node.meta["shardfx.fusion"], []).append(node)
    out = []
    folder = tempfile.mkdtemp(prefix="shardfx-kernels-")
    for rid, members in groups.items():
        domain = Domain(notes[rid]["rows"], notes[rid]["cols"])
        spec, inputs, outputs = generate(f"region_{rid}", members, domain, f"region {rid}")
        if not inputs or not outputs:
            continue
        _, module = cache.load(spec.source, spec.shapes_key(), folder)
        unique = list(dict.fromkeys(inputs))
        graph = fx.Graph()
        env = {a: graph.placeholder(a.name) for a in unique}
        for n in members:
            env[n] = graph.node_copy(n, lambda a, env=env: env[a])
        graph.output(tuple(env[o] for o in outputs))
        out.append(
            {
                "rid": rid,
                "phase": notes[rid]["phase"],
                "domain": str(domain),
                "kernel": CompiledRegion(spec, getattr(module, spec.name)),
                "eager": fx.GraphModule(torch.nn.Module(), graph),
                "unique": unique,
                "inputs": inputs,
                "bytes": sum(s.nbytes() for s in spec.inputs) + sum(s.nbytes() for s in spec.outputs),
            }
        )
    return out


def example(node: fx.Node, cols: int, device: str) -> torch.Tensor:
    val = node.meta["val"]
    if val.dtype == torch.bool:
        return torch.rand(val.shape, device=device) > 0.5
    if not val.dtype.is_floating_point:
        return torch.randint(0, cols, val.shape, device=device, dtype=val.dtype)
    return torch.randn(val.shape, device=device, dtype=val.dtype)


def bench(fn: Any, *, warmup: int = 5, reps: int = 50) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=reps) * 1e-3  # seconds


def run_gpu(cfg: GPTConfig, batch: int) -> None:
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_GBS.items() if k in name), None)
    _, _, program = gpt_program(cfg, batch, "cuda")
    program = compile_traced(Traced(program, 0.0), Config(), passes=[FUSE]).program  # regions marked, not lowered
    print(f"# {name}; peak {peak or '?'} GB/s; GPT {cfg}; batch {batch}")
    print(
        f"{'region':<8} {'phase':<9} {'domain':>11} {'MB':>7} {'eager us':>9} {'ours us':>8} {'compile us':>10} "
        f"{'ours GB/s':>9} {'% peak':>7} {'compile GB/s':>12}"
    )
    for r in region_graphs(program):
        cols = int(r["domain"].split("x")[1])
        tensors = {a: example(a, cols, "cuda") for a in r["unique"]}
        args = [tensors[a] for a in r["unique"]]
        kernel_args = [tensors[a] for a in r["inputs"]]
        compiled = torch.compile(r["eager"])
        t_eager = bench(lambda args=args, r=r: r["eager"](*args))
        t_ours = bench(lambda ka=kernel_args, r=r: r["kernel"](ka))
        t_comp = bench(lambda args=args, c=compiled: c(*args))
        gbs = r["bytes"] / t_ours / 1e9
        print(
            f"{r['rid']:<8} {r['phase']:<9} {r['domain']:>11} {r['bytes'] / 1e6:>7.2f} {t_eager * 1e6:>9.1f} "
            f"{t_ours * 1e6:>8.1f} {t_comp * 1e6:>10.1f} {gbs:>9.0f} "
            f"{(100 * gbs / peak if peak else float('nan')):>6.1f}% {r['bytes'] / t_comp / 1e9:>12.0f}"
        )


def run_static(cfg: GPTConfig, batch: int, inductor: bool = True) -> None:
    """Kernels per step and fused bytes: shardfx (lowered, not run) against Inductor's CPU backend."""
    from shardfx.kernels.report import format_report
    from shardfx.passes.pipeline import LOWER_TO_TRITON

    model, batch_t, program = gpt_program(cfg, batch, "cpu")
    passes = [FUSE, LOWER_TO_TRITON.bind(cache_dir=tempfile.mkdtemp())]
    compiled = compile_traced(Traced(program, 0.0), Config(), passes=passes)
    program, records = compiled.program, compiled.records[compiled.last]
    s = records[-1].stats
    print(f"# GPT {cfg}; batch {batch}")
    print("## shardfx")
    print(format_report(program.notes[TRITON_REGIONS], s["kernels_per_step_before"], s["kernels_per_step_after"]))
    from collections import Counter

    from shardfx.graphs.format import op_name

    extern = ("aten.mm", "aten.addmm", "aten._scaled_dot_product", "shardfx.triton_region")
    left = Counter(
        op_name(n.target)
        for n in program.graph.nodes
        if n.op == "call_function" and n.target not in ALIAS_OPS and n.target is not operator.getitem
    )
    others = sum(c for k, c in left.items() if not k.startswith(extern))
    print(f"eager ops left that are not matmul/attention (Inductor would generate code for these): {others}")
    print("  " + ", ".join(f"{k} x{c}" for k, c in left.most_common() if not k.startswith(extern)))
    if not inductor:
        return

    from torch._inductor import metrics

    def step(tokens: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        loss = gpt_loss(model(tokens), targets)
        return [loss, *torch.autograd.grad(loss, list(model.parameters()))]

    metrics.reset()
    torch._dynamo.reset()
    torch.compile(step, backend="inductor")(*batch_t)
    print("## inductor (cpu backend), same step")
    print(f"generated kernels: {metrics.generated_kernel_count}")
    print(f"bytes accessed by generated kernels: {metrics.num_bytes_accessed:,}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--static", action="store_true", help="no GPU: compare kernels and bytes with Inductor (CPU)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--no-inductor", action="store_true", help="with --static: shardfx's side only (smoke test)")
    a = ap.parse_args()
    cfg = GPTConfig(vocab_size=a.vocab, n_layer=a.layers, d_model=a.d_model, n_head=a.heads, seq_len=a.seq)
    if a.static or not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        run_static(cfg, a.batch, inductor=not a.no_inductor)
    else:
        run_gpu(cfg, a.batch)


if __name__ == "__main__":
    main()
