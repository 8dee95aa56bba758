"""Config: every option of the compiler, validated when it is built.

Unknown keys and bad values are errors that name the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

_CHOICES: dict[str, tuple[Any, ...]] = {
    "zero_stage": (0, 1, 2, 3),
    "mixed_precision": (None, "bf16"),
    "reduce_dtype": ("fp32", "bf16"),
    "batchnorm": ("global", "local"),
    "recompute": ("none", "full", "selective", "budget"),
}


@dataclass(frozen=True)
class Config:
    """Options of shardfx.compile_distributed.

    zero_stage: 0 (data parallel, DDP semantics), 1 (optimizer state sharded),
        2 (+ gradients sharded), 3 (+ parameters sharded).
    reshard_after_forward: ZeRO-3 only; False keeps gathered parameters from
        forward to backward (less traffic, more memory).
    mixed_precision: None (fp32) or "bf16" (bf16 compute, fp32 master shards).
    reduce_dtype: dtype gradients are reduced in under mixed precision.
    grad_clip: clip gradients to this global norm (None: no clipping).
    batchnorm: "global" computes batch statistics over the global batch (single-device
        semantics); "local" keeps each rank's own statistics (DDP's behaviour).
    bucket_mb: merge the collectives of one block into flat buckets of at most this many MiB (0: off).
    overlap: issue collectives asynchronously and prefetch parameter gathers `prefetch` blocks ahead.
    recompute: activation recomputation: "none", "full" (every block, keeping block inputs),
        "selective" (the attention core), "budget" (the cheapest recomputation that brings the
        simulated peak to memory_budget).
    memory_budget: for recompute="budget": peak bytes per rank (> 1) or a fraction of the peak
        without recomputation (<= 1).
    hardware: the cost model's hardware profile for decisions (shardfx.graphs.cost_model.PROFILES).
    collective_timeout: seconds a rank waits in a collective before every rank fails.
    dump_dir: write the printed program after every pass into this folder.
    disable_passes: names of optional passes to skip (for bisecting).
    """

    zero_stage: int = 0
    reshard_after_forward: bool = True
    mixed_precision: str | None = None
    reduce_dtype: str = "fp32"
    grad_clip: float | None = None
    batchnorm: str = "global"
    bucket_mb: float = 0.0
    overlap: bool = False
    prefetch: int = 1
    recompute: str = "none"
    memory_budget: float | None = None
    hardware: str = "cpu"
    collective_timeout: float = 60.0
    dump_dir: str | None = None
    disable_passes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for key, allowed in _CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"Config.{key}={value!r} is not allowed; choose one of {list(allowed)}")
        if not isinstance(self.reshard_after_forward, bool):
            raise TypeError(f"Config.reshard_after_forward must be a bool; got {self.reshard_after_forward!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ValueError(f"Config.grad_clip must be a positive number or None; got {self.grad_clip!r}")
        if not (isinstance(self.bucket_mb, (int, float)) and self.bucket_mb >= 0):
            raise ValueError(f"Config.bucket_mb must be a number >= 0 (0 turns bucketing off); got {self.bucket_mb!r}")
        if not isinstance(self.overlap, bool):
            raise TypeError(f"Config.overlap must be a bool; got {self.overlap!r}")
        if not (isinstance(self.prefetch, int) and self.prefetch >= 1):
            raise ValueError(f"Config.prefetch must be an integer >= 1; got {self.prefetch!r}")
        if self.recompute == "budget" and not (
            isinstance(self.memory_budget, (int, float)) and self.memory_budget > 0
        ):
            raise ValueError(
                f"Config(recompute='budget') needs memory_budget > 0 (bytes, or a fraction <= 1); got {self.memory_budget!r}"
            )
        if not (isinstance(self.collective_timeout, (int, float)) and self.collective_timeout > 0):
            raise ValueError(f"Config.collective_timeout must be positive seconds; got {self.collective_timeout!r}")
        if isinstance(self.disable_passes, str):
            object.__setattr__(self, "disable_passes", (self.disable_passes,))
        object.__setattr__(self, "disable_passes", tuple(self.disable_passes))

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ValueError(f"unknown Config keys {unknown}; allowed keys: {cls.keys()}")
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        return self.from_dict({**dataclasses.asdict(self), **changes})
