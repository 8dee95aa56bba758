"""Which optimizers may run on shards.

Under ZeRO (stage >= 1) and tensor parallelism each rank's optimizer sees slices of the
parameters. An optimizer whose update of an element reads only that element's own state
(SGD, Adam, AdamW, Adagrad, RMSprop, ...) computes on a slice exactly what it computes on
the whole tensor. One that reads whole-tensor statistics does not: Adafactor's factored
second moment (row and column means), LAMB's and LARS's trust ratios (norms of the whole
weight and update), Shampoo's preconditioners, Muon's orthogonalisation, L-BFGS's line
search. On shards these train silently differently from one device, so they are refused
with the way out: zero_stage=0 and tp_size=1, an elementwise optimizer, or
Config.allow_untested_optimizer=True for an optimizer the user knows to be elementwise
(DeepSpeed's zero_allow_untested_optimizer).

The check is by exact class: a subclass may change step(), so it counts as untested.
"""

from __future__ import annotations

import torch

ELEMENTWISE: tuple[type[torch.optim.Optimizer], ...] = tuple(
    getattr(torch.optim, name)
    for name in ("SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "Adamax", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop")
    if hasattr(torch.optim, name)
)


def check_sharded_optimizer(optimizer: torch.optim.Optimizer, split: list[str], allowed: bool) -> None:
    """Refuse `optimizer` when it is not known to be elementwise and parameters are split
    (`split`: how, e.g. ["ZeRO stage 2"], empty when every rank holds whole tensors)."""
    if not split or allowed or type(optimizer) in ELEMENTWISE:
        return
    name = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
    raise ValueError(
        f"the optimizer {name} is not one shardfx knows to update each element from its own state, and "
        f"under {' and '.join(split)} each rank holds slices of the parameters: an update that reads whole-tensor "
        "statistics (Adafactor, LAMB, LARS, Shampoo, Muon) would differ from one device's. Use zero_stage=0 and "
        f"tp_size=1, an elementwise optimizer ({', '.join(c.__name__ for c in ELEMENTWISE)}), or "
        "Config(allow_untested_optimizer=True) if its update is elementwise"
    )
