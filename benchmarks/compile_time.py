"""Compile time by depth: capture (torch.export + AOT joint export) and all our passes, per ZeRO stage.

    python benchmarks/compile_time.py                 # GPT of docs/TARGETS.md at 4, 12, 24 layers
    python benchmarks/compile_time.py --layers 4,12 --stages 0,3

Prints capture seconds, pass seconds (the sum over the pipeline), passes / capture,
and graph node counts after capture and after the pipeline. The target (docs/TARGETS.md):
passes add at most a quarter of the capture time and grow linearly with depth.
Nothing runs on ranks: the program is compiled for world size 4 and not executed.
"""

from __future__ import annotations

import argparse
import time

import torch

import shardfx
from shardfx.driver import build_mesh, capture_step, compile_traced
from shardfx.models import GPT, GPTConfig, gpt_loss


def measure(layers: int, stage: int, world: int, batch: int, seq: int = 128) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1024, n_layer=layers, d_model=256, n_head=4, seq_len=seq))
    tokens = torch.randint(0, 1024, (batch, seq))
    config = shardfx.Config(zero_stage=stage)
    traced = capture_step(model, (tokens, tokens), gpt_loss, config, build_mesh(config, world))
    start = time.perf_counter()
    compiled = compile_traced(traced, config)
    passes = time.perf_counter() - start
    program = compiled.program
    return {
        "layers": layers,
        "stage": stage,
        "capture_s": traced.seconds,
        "passes_s": passes,
        "nodes_captured": len(traced.program.graph.nodes),
        "nodes_final": len(program.graph.nodes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="4,12,24", help="comma-separated depths (default %(default)s)")
    parser.add_argument("--stages", default="0,3", help="comma-separated ZeRO stages (default %(default)s)")
    parser.add_argument("--world-size", type=int, default=4, help="ranks the program is compiled for (default 4)")
    parser.add_argument("--batch", type=int, default=8, help="global batch (default 8)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    args = parser.parse_args()
    print("| layers | stage | capture s | passes s | passes/capture | nodes captured | nodes after pipeline |")
    print("|---|---|---|---|---|---|---|")
    for layers in [int(x) for x in args.layers.split(",")]:
        for stage in [int(x) for x in args.stages.split(",")]:
            r = measure(layers, stage, args.world_size, args.batch, args.seq)
            print(
                f"| {r['layers']} | {r['stage']} | {r['capture_s']:.2f} | {r['passes_s']:.2f} | "
                f"{r['passes_s'] / r['capture_s']:.2f} | {r['nodes_captured']} | {r['nodes_final']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
