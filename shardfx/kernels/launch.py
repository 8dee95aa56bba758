"""`shardfx::triton_region(inputs, key)`: the one graph node that runs a fused region.

The key names a kernel registered in this process by lower_to_triton (every
process that runs a program compiled it, so every process has its kernels).
The fake implementation gives the outputs' shapes and dtypes from the
registered spec, so passes after lowering can still compute `val`s.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from shardfx.kernels.codegen import KernelSpec


@dataclass
class CompiledRegion:
    spec: KernelSpec
    fn: Any  # the triton.jit function
    launches: int = 0

    def __call__(self, inputs: list[Tensor]) -> list[Tensor]:
        device = inputs[0].device
        args = [x.contiguous() for x in inputs]  # a no-op for the contiguous values graphs make
        outs = [torch.empty(s.shape, dtype=s.dtype, device=device) for s in self.spec.outputs]
        d = self.spec.domain
        warps = 8 if self.spec.block_r * self.spec.block_c >= 8192 else 4
        launch = self.fn[self.spec.grid]
        kwargs = {"BLOCK_R": self.spec.block_r, "BLOCK_C": self.spec.block_c, "num_warps": warps}
        if device.type == "cpu":  # Triton's interpreter patches triton.language while a kernel runs
            with _INTERPRETER:
                launch(*args, *outs, d.rows, d.cols, **kwargs)
        else:
            launch(*args, *outs, d.rows, d.cols, **kwargs)
        self.launches += 1
        return outs


KERNELS: dict[str, CompiledRegion] = {}
_INTERPRETER = threading.Lock()  # LocalRuntime runs ranks as threads


def register(key: str, region: CompiledRegion) -> None:
    KERNELS[key] = region


def _lookup(key: str) -> CompiledRegion:
    region = KERNELS.get(key)
    if region is None:
        raise RuntimeError(
            f"no Triton kernel {key!r} in this process; programs with fused regions are made by "
            "lower_to_triton in the process that runs them"
        )
    return region


@torch.library.custom_op("shardfx::triton_region", mutates_args=())
def triton_region(inputs: list[Tensor], key: str) -> list[Tensor]:
    return _lookup(key)(inputs)


@triton_region.register_fake
def _(inputs: list[Tensor], key: str) -> list[Tensor]:
    spec = _lookup(key).spec
    device = inputs[0].device
    return [torch.empty(s.shape, dtype=s.dtype, device=device) for s in spec.outputs]


TRITON_REGION = torch.ops.shardfx.triton_region.default
