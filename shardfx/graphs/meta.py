"""The node.meta keys shardfx owns, and typed accessors for them.

Every key is prefixed 'shardfx.'; torch's own keys ('val', 'stack_trace',
'nn_module_stack') are read, never redefined. A pass that needs a key another
pass provides reads it through `require`, which fails with the node named.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

PHASE = "shardfx.phase"  # "forward" | "backward" | "optimizer"
MODULE = "shardfx.module"  # nn.Module path the node came from ('' for the root)
PLACEMENT = "shardfx.placement"  # {axis: Placement}
ORIGIN = "shardfx.origin"  # name of the pass that created the node ('capture' otherwise)
ROLE = "shardfx.role"  # on placeholders/collectives: what the value is (see signature.py)
TARGET = "shardfx.target"  # on placeholders/collectives: the fqn it belongs to
BUCKET = "shardfx.bucket"
FUSION = "shardfx.fusion"
RECOMPUTE = "shardfx.recompute"
STAGE = "shardfx.stage"  # the pipeline stage a node runs on (split_stages)

# Values of meta[ROLE] on the collectives passes insert (placeholders carry signature roles).
PARAM_GATHER = "param_gather"  # all-gathers a ZeRO-sharded parameter
GRAD_SYNC = "grad_sync"  # reduces (or reduce-scatters) a gradient across the dp ranks
LOSS_SYNC = "loss"  # averages the loss across the dp ranks
TP_REDISTRIBUTE = "tp"  # changes a placement on the tp axis (tensor_parallel)
LOSS_SEED = "loss_seed"  # on the backward's seed, d loss / d loss (ones_like(loss)): what loss scaling multiplies
P2P = "p2p"  # a send or receive between pipeline stages (split_stages); meta[TARGET] names the value

FORWARD = "forward"
BACKWARD = "backward"
OPTIMIZER = "optimizer"


def get(node: fx.Node, key: str, default: Any = None) -> Any:
    return node.meta.get(key, default)


def require(node: fx.Node, key: str, provider: str) -> Any:
    """Read a key that an earlier step must have set; name the node and the provider if not."""
    if key not in node.meta:
        from shardfx.errors import ShardfxError

        raise ShardfxError(f"node has no {key!r}; it is provided by {provider}, which has not run", node)
    return node.meta[key]


def role(node: fx.Node) -> str | None:
    """meta[ROLE]: a collective's purpose (PARAM_GATHER, GRAD_SYNC, ...) or a placeholder's signature role."""
    return node.meta.get(ROLE)


def phase(node: fx.Node) -> str:
    return require(node, PHASE, "capture")


def copy_provenance(src: fx.Node, dst: fx.Node, origin: str) -> None:
    """Give a node created by a pass the phase, module and source line of the node it serves."""
    for key in (PHASE, MODULE, "stack_trace"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    dst.meta[ORIGIN] = origin
