"""Sharded state: what one rank keeps between steps.

Each rank holds, for every parameter, either the full tensor or only its
ShardSpec shard (an fp32 master), its gradient in `.grad` after a step, and
the optimizer built by the user's factory over exactly these local tensors.
`full_state_dict` reassembles full, unpadded tensors from every rank's shards.

With `auto_step` (the default) every step's gradients go straight into the
optimizer. The Engine turns it off to drive the optimizer itself: gradients
then add up in `.grad` over micro-batches until `optimizer_step()`. Under
boundary-synced accumulation the graph itself adds each micro-batch's
unreduced gradient to `grad_acc` (full-size, per rank) and reduces the sum
at the last micro-batch, whose gradients land in `.grad` as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from shardfx.graphs.placement import local_shard
from shardfx.graphs.program import DistProgram
from shardfx.runtime.executor import StepOutputs

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class RankState:
    def __init__(self, program: DistProgram, model: nn.Module, rank: int, optimizer: OptimizerFactory | None) -> None:
        self.rank = rank
        coords = program.mesh.coords(rank)
        full_params = dict(model.named_parameters())
        model_buffers = dict(model.named_buffers())
        self.params: dict[str, nn.Parameter] = {}
        for spec in program.signature.params():
            full = full_params[spec.name].detach()
            local = local_shard(full, program.specs(spec.name), coords).clone()  # tp slice, then ZeRO shard
            self.params[spec.name] = nn.Parameter(local, requires_grad=spec.trainable)
        self.buffers: dict[str, Tensor] = {
            spec.name: model_buffers[spec.name].detach().clone() for spec in program.signature.buffers()
        }
        trainable = [self.params[s.name] for s in program.signature.params(trainable_only=True)]
        self.optimizer = optimizer(trainable) if optimizer is not None and trainable else None
        if optimizer is not None and trainable and not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"the optimizer factory returned {type(self.optimizer).__name__}; it must return a "
                "torch.optim.Optimizer over the parameters it is given, e.g. lambda params: torch.optim.AdamW(params)"
            )
        self.scheduler: Any = None  # an LR scheduler over self.optimizer, set by the Engine
        self.auto_step = True
        self.grad_acc: dict[str, Tensor] = {}  # unreduced gradient sums between micro-batches
        self.replicas: dict[str, Tensor] = {}  # ZeRO-1/2: full parameters gathered this optimizer step
        self.grad_norm: Tensor | None = None  # the global gradient norm the last step's program returned
        # fp16: what the step multiplies its loss by (the Engine's loss scaler sets it before each step)
        device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        self.loss_scale = torch.ones((), dtype=torch.float32, device=device)
        self.saved_peak = 0  # a pipeline stage: the most bytes of saved activations held at once (measured)

    def apply(self, out: StepOutputs) -> None:
        """Take a step's outputs: gradients (added to any kept ones), new buffer values, gradient
        accumulators (replacing the old: the graph added them in) and gathered replicas to keep
        until the optimizer steps; step if auto_step."""
        grads, buffers = out.grads, out.buffers
        # the accumulators the program returned replace the old; a gradient returned whole ends its
        # accumulation (a rank running several pipeline stages keeps each stage's own)
        for name in grads:
            self.grad_acc.pop(name, None)
        self.grad_acc.update(out.accumulators)
        self.replicas.update(out.replicas)
        self.grad_norm = out.grad_norm
        for name, grad in grads.items():
            param = self.params[name]
            # a total (the program added the kept sum in: sum_gradients) replaces; anything else adds
            param.grad = grad if param.grad is None or name in out.totals else param.grad + grad
        for name, value in buffers.items():
            self.buffers[name].copy_(value)
        if self.auto_step:
            self.optimizer_step()

    def optimizer_step(self, grad_scale: float | Tensor | None = None) -> None:
        """Scale the kept gradients (accumulation, clipping), step the optimizer and scheduler, drop the grads."""
        if grad_scale is not None:
            for p in self.params.values():
                if p.grad is not None:
                    p.grad.mul_(grad_scale)
        if self.optimizer is not None:
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None
        self.grad_acc = {}
        self.replicas = {}  # the parameters change: the next micro-batch gathers again

    def local_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradients and optimizer state."""
        params = sum(p.numel() * p.element_size() for p in self.params.values())
        grads = sum(p.numel() * p.element_size() for p in self.params.values() if p.requires_grad)
        optim = 0
        if self.optimizer is not None:
            for st in self.optimizer.state.values():
                optim += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, Tensor) and v.dim() > 0)
        return {"params": params, "grads": grads, "optimizer": optim}


def full_state_dict(program: DistProgram, model: nn.Module, states: Sequence[RankState]) -> dict[str, Tensor]:
    """Full, unpadded tensors under every key of model.state_dict(), from the ranks' local state."""
    out: dict[str, Tensor] = {}
    for spec in program.signature.params():
        value = unshard(program, spec.name, 0, lambda r, n=spec.name: states[r].params[n])
        for name in (spec.name, *spec.aliases):
            out[name] = value
    for name, buf in states[0].buffers.items():
        out[name] = buf.clone()
    # Buffers the step never reads are not in the graph: they keep the model's value.
    return {k: out[k] if k in out else v.detach().clone() for k, v in model.state_dict().items()}


def unshard(program: DistProgram, name: str, rank: int, get: Callable[[int], Tensor]) -> Tensor:
    """The full tensor from the pieces `get(r)` (parameter-shaped, one per rank) of the ranks that share
    `rank`'s slice: undo ZeRO, then tensor parallelism."""
    mesh = program.mesh
    tp, dp = program.tp_specs.get(name), program.shard_specs.get(name)

    def tp_slice(r: int) -> Tensor:
        if dp is None:
            return get(r).detach().clone()
        return dp.unshard([get(q).detach() for q in mesh.group(r, dp.axis)])

    if tp is None:
        return tp_slice(rank)
    return tp.unshard([tp_slice(r) for r in mesh.group(rank, tp.axis)])
