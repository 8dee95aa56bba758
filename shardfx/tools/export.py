"""`shardfx export`: consolidate a checkpoint into one safetensors file with the model's own names.

    shardfx export checkpoints/step-000300 --to model.safetensors

The file loads into a fresh model with
`model.load_state_dict(safetensors.torch.load_file("model.safetensors"))` (strict):
full, unpadded tensors under every key of model.state_dict(), tied names included.
Needs the `safetensors` package.
"""

from __future__ import annotations

import argparse
import os

NAME = "export"
HELP = "consolidate a checkpoint into one safetensors file (the model's parameter names)"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint folder written by engine.save_checkpoint")
    parser.add_argument("--to", required=True, metavar="FILE", help="the .safetensors file to write")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    n, size = export(args.checkpoint, args.to)
    print(f"wrote {n} tensors ({size / 2**20:.1f} MiB) to {args.to}")
    return 0


def export(checkpoint_dir: str, to: str) -> tuple[int, int]:
    """Write the checkpoint's model state to `to`; returns (tensors, bytes of tensor data)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise NotImplementedError("shardfx export needs the safetensors package: pip install safetensors") from None
    from shardfx.runtime.checkpoint import consolidate

    if not to.endswith(".safetensors"):
        raise ValueError(f"--to must name a .safetensors file; got {to!r}")
    state = {k: v.contiguous() for k, v in consolidate(checkpoint_dir).items()}
    tmp = to + ".tmp"
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, to)  # a reader never sees half a file
    return len(state), sum(v.numel() * v.element_size() for v in state.values())
