"""How a value lies in a region's index space.

Every region runs over a 2-D space of R rows x C cols, C the last dim of its
largest values (a [B, T, D] activation is R = B*T rows of C = D). One program
instance owns a (BLOCK_R, BLOCK_C) tile; a region with a reduction takes whole
rows (BLOCK_C >= C) so the row stays in registers between its reductions.

A value of the region is one of:

  FULL    one element per (row, col): a contiguous [..., C] tensor of R*C elements   tile (BLOCK_R, BLOCK_C)
  ROW     one element per row: [..., 1] or [...] of R elements (a reduction's result) tile (BLOCK_R, 1)
  COL     one element per col, broadcast over rows (a weight or bias [C])             tile (1, BLOCK_C)
  SCALAR  one element for the whole region (a 0-d tensor or a Python number)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

FULL, ROW, COL, SCALAR = "full", "row", "col", "scalar"


@dataclass(frozen=True)
class Domain:
    rows: int
    cols: int

    @classmethod
    def of_shape(cls, shape: Sequence[int]) -> Domain:
        """The domain of a value that is FULL in it: rows = everything but the last dim.

        A 1-D value is a column of rows (n x 1): it then joins regions over n rows as one value per row.
        """
        cols = int(shape[-1]) if len(shape) > 1 else 1
        return cls(math.prod(int(s) for s in shape) // max(cols, 1), cols)

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"


def value_kind(shape: Sequence[int], domain: Domain) -> str | None:
    """The kind of a value this region computes (or reads without broadcasting), None if it does not fit."""
    numel = math.prod(int(s) for s in shape)
    if domain.cols == 1 and numel == domain.rows and domain.rows > 1:
        return ROW  # one col: a value per row either way
    if len(shape) and int(shape[-1]) == domain.cols and numel == domain.rows * domain.cols:
        return FULL
    if numel == domain.rows:
        return ROW
    if numel == 1:
        return SCALAR
    return None


def operand_kind(shape: Sequence[int], out_shape: Sequence[int], out_kind: str, domain: Domain) -> str | None:
    """How an operand of `shape` broadcasts into a pointwise result of `out_shape` (torch's rules)."""
    numel = math.prod(int(s) for s in shape)
    if numel == 1:
        return SCALAR
    if out_kind != FULL:  # row-wise math: operands have the result's elements, or one
        return out_kind if numel == math.prod(int(s) for s in out_shape) else None
    if len(shape) > len(out_shape):
        return None
    padded = [1] * (len(out_shape) - len(shape)) + [int(s) for s in shape]
    out = [int(s) for s in out_shape]
    if padded == out:
        return FULL
    if padded[-1] == 1 and padded[:-1] == out[:-1]:
        return ROW
    if padded[-1] == out[-1] == domain.cols and all(s == 1 for s in padded[:-1]):
        return COL
    return None


def tile_shape(kind: str) -> str:
    return {FULL: "[BLOCK_R, BLOCK_C]", ROW: "[BLOCK_R, 1]", COL: "[1, BLOCK_C]", SCALAR: "[1, 1]"}[kind]


def elements(kind: str, domain: Domain) -> int:
    return {FULL: domain.rows * domain.cols, ROW: domain.rows, COL: domain.cols, SCALAR: 1}[kind]
