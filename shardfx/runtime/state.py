"""Sharded state: what one rank keeps between steps.

Each rank holds, for every parameter, either the full tensor or only its
ShardSpec shard (an fp32 master), its gradient in `.grad` after a step, and
the optimizer built by the user's factory over exactly these local tensors.
`full_state_dict` reassembles full, unpadded tensors from every rank's shards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from shardfx.graphs.program import DistProgram

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class RankState:
    def __init__(self, program: DistProgram, model: nn.Module, rank: int, optimizer: OptimizerFactory | None) -> None:
        self.rank = rank
        coords = program.mesh.coords(rank)
        full_params = dict(model.named_parameters())
        model_buffers = dict(model.named_buffers())
        self.params: dict[str, nn.Parameter] = {}
        for spec in program.signature.params():
            full = full_params[spec.name].detach()
            shard = program.shard_specs.get(spec.name)
            local = shard.shard(full, coords[shard.axis]) if shard is not None else full.clone()
            self.params[spec.name] = nn.Parameter(local, requires_grad=spec.trainable)
        self.buffers: dict[str, Tensor] = {
            spec.name: model_buffers[spec.name].detach().clone() for spec in program.signature.buffers()
        }
        trainable = [self.params[s.name] for s in program.signature.params(trainable_only=True)]
        self.optimizer = optimizer(trainable) if optimizer is not None and trainable else None

    def apply(self, grads: dict[str, Tensor], buffers: dict[str, Tensor]) -> None:
        """Hand the step's gradients to the optimizer, step it, and take the new buffer values."""
        for name, grad in grads.items():
            self.params[name].grad = grad
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        for name, value in buffers.items():
            self.buffers[name].copy_(value)

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
    mesh = program.mesh
    out: dict[str, Tensor] = {}
    for spec in program.signature.params():
        shard = program.shard_specs.get(spec.name)
        if shard is None:
            value = states[0].params[spec.name].detach().clone()
        else:
            group = mesh.group(0, shard.axis)
            value = shard.unshard([states[r].params[spec.name].detach() for r in group])
        for name in (spec.name, *spec.aliases):
            out[name] = value
    for name, buf in states[0].buffers.items():
        out[name] = buf.clone()
    # Buffers the step never reads are not in the graph: they keep the model's value.
    return {k: out[k] if k in out else v.detach().clone() for k, v in model.state_dict().items()}
