"""Placements (how a tensor lies on one mesh axis) and ShardSpec (how a parameter is split).

A ShardSpec shards along one tensor dim, padding the last shard so every
rank holds the same shape: uneven sizes are padded, never refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """Split along `dim`; with blocks=k the dim is k equal blocks, each split the same way
    (a fused q|k|v projection: every rank holds its slice of q, of k and of v)."""

    dim: int
    blocks: int = 1

    def __str__(self) -> str:
        return f"S({self.dim})" if self.blocks == 1 else f"S({self.dim}/{self.blocks})"


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial:
    op: str = "sum"

    def __str__(self) -> str:
        return f"P({self.op})"


Placement = Shard | Replicate | Partial


@dataclass(frozen=True)
class ShardSpec:
    """One parameter split along `dim` over the `world` ranks of mesh axis `axis`.

    Every rank holds `shard_size` rows of dim `dim`; the full tensor has
    `full_shape`; the last rows of the gathered tensor are padding when
    `full_shape[dim]` does not divide.
    """

    axis: str
    dim: int
    world: int
    full_shape: tuple[int, ...]
    blocks: int = 1  # > 1: the dim is `blocks` equal blocks, each split over the ranks (no padding)

    @property
    def shard_size(self) -> int:
        return math.ceil(self.full_shape[self.dim] / self.world)

    @property
    def padded_size(self) -> int:
        return self.shard_size * self.world

    @property
    def padding(self) -> int:
        return self.padded_size - self.full_shape[self.dim]

    @property
    def shard_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        shape[self.dim] = self.shard_size
        return tuple(shape)

    def shard(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """This rank's shard of the full tensor (a fresh, contiguous tensor, zero-padded)."""
        assert tuple(full.shape) == self.full_shape, (full.shape, self.full_shape)
        if self.blocks > 1:
            blocks = full.tensor_split(self.blocks, dim=self.dim)
            return torch.cat(
                [b.tensor_split(self.world, dim=self.dim)[rank] for b in blocks], dim=self.dim
            ).contiguous()
        start = rank * self.shard_size
        stop = min(start + self.shard_size, self.full_shape[self.dim])
        out = full.new_zeros(self.shard_shape)
        if stop > start:
            out.narrow(self.dim, 0, stop - start).copy_(full.narrow(self.dim, start, stop - start))
        return out

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The full, unpadded tensor from every rank's shard, in rank order."""
        assert len(shards) == self.world
        if self.blocks > 1:
            per_rank = [s.tensor_split(self.blocks, dim=self.dim) for s in shards]
            return torch.cat(
                [torch.cat([p[b] for p in per_rank], dim=self.dim) for b in range(self.blocks)], dim=self.dim
            )
        padded = torch.cat(shards, dim=self.dim)
        return padded.narrow(self.dim, 0, self.full_shape[self.dim]).contiguous()


def local_shard(full: torch.Tensor, specs: list[ShardSpec], coords: dict[str, int]) -> torch.Tensor:
    """Apply shard specs in order (tensor parallel first, then ZeRO on what is left)."""
    for spec in specs:
        full = spec.shard(full, coords[spec.axis])
    return full
