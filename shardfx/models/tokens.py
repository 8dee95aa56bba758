"""Real token data for next-token training: a flat file of token ids, its splits, and global batches.

A token file is what nanoGPT's `data/*/prepare.py` writes: a raw little-endian
array of uint16 or uint32 ids, no header (`train.bin`); or a 1-D integer `.npy`.
It is memory-mapped, never read whole, so a file larger than memory trains. A
sidecar `NAME.meta.json` (written by `shardfx prepare-data`) may give its
`dtype` and `vocab_size`; nanoGPT's `meta.pkl` is not read (unpickling runs code).

    tokens = open_tokens("data/pydoc.bin")              # dtype from the meta JSON, else uint16
    train, val = tokens.split(0.1, block_size=64)       # the last 10% held out
    x, y = train.batch(32, 64, generator)               # (32, 64) each; y is x shifted by one

Batches are random windows of block_size + 1 tokens drawn with a torch.Generator,
so one seed (and the generator's saved state) reproduces the stream, on every
process alike. `global_batches` does the same for a torch Dataset: the engine
takes the GLOBAL batch and keeps each rank's dim-0 slice itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

DTYPES: dict[str, np.dtype] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
META_SUFFIX = ".meta.json"
_SCAN_CHUNK = 1 << 24  # tokens per chunk when scanning for the largest id (32 MiB of uint16)


def meta_path(path: str | os.PathLike) -> Path:
    """The sidecar of a token file: data/pydoc.bin -> data/pydoc.meta.json."""
    return Path(path).with_suffix(META_SUFFIX)


@dataclass(frozen=True)
class TokenSplit:
    """A contiguous run of a token file's ids (a memory-mapped 1-D view), named for errors."""

    tokens: np.ndarray
    name: str  # "train" or "validation"

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, batch_size: int, block_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random windows of block_size + 1 tokens: (x, y), both LongTensor (B, T), y = x shifted by one."""
        # A window starts at s in [0, len - block_size - 1] and covers tokens s .. s + block_size.
        starts = torch.randint(len(self.tokens) - block_size, (batch_size,), generator=generator)
        return self._windows(starts.tolist(), block_size)

    def fixed_batches(self, n_batches: int, batch_size: int, block_size: int) -> list[tuple[Tensor, Tensor]]:
        """n_batches batches of windows spread evenly over the split: the same ones every call and every run."""
        count = n_batches * batch_size
        starts = np.linspace(0, len(self.tokens) - block_size - 1, count).round().astype(np.int64).tolist()
        return [self._windows(starts[i : i + batch_size], block_size) for i in range(0, count, batch_size)]

    def _windows(self, starts: Sequence[int], block_size: int) -> tuple[Tensor, Tensor]:
        windows = np.stack([self.tokens[s : s + block_size + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        w = torch.from_numpy(windows)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T), (B, T)


@dataclass
class TokenFile:
    """A memory-mapped token file; `meta` is its sidecar JSON ({} when there is none)."""

    path: str
    tokens: np.ndarray  # 1-D
    meta: dict[str, Any] = field(default_factory=dict)
    _max: int | None = None

    @property
    def dtype(self) -> str:
        return self.tokens.dtype.name

    def max_token(self) -> int:
        """The largest id in the file (one pass over it, in chunks; cached)."""
        if self._max is None:
            n = len(self.tokens)
            self._max = max(int(self.tokens[i : i + _SCAN_CHUNK].max()) for i in range(0, n, _SCAN_CHUNK))
        return self._max

    def vocab_size(self) -> int:
        """The meta JSON's vocab_size, else the largest id + 1."""
        return int(self.meta["vocab_size"]) if "vocab_size" in self.meta else self.max_token() + 1

    def split(self, val_fraction: float, block_size: int) -> tuple[TokenSplit, TokenSplit | None]:
        """(train, validation): the last `val_fraction` of the ids held out (None when 0).

        Each part must hold one window of block_size + 1 tokens.
        """
        if not 0 <= val_fraction < 1:
            raise ValueError(f"the validation fraction must be in [0, 1); got {val_fraction}")
        n = len(self.tokens)
        n_val = round(n * val_fraction)
        parts = [TokenSplit(self.tokens[: n - n_val], "train")]
        if n_val:
            parts.append(TokenSplit(self.tokens[n - n_val :], "validation"))
        for part in parts:
            if len(part) < block_size + 1:
                held = f"the {part.name} split ({len(part):,} of {n:,} tokens, validation fraction {val_fraction})"
                raise ValueError(
                    f"token file {self.path!r}: {held} is shorter than one window of block_size + 1 = "
                    f"{block_size + 1} tokens; use a longer file"
                    + (" or another validation fraction" if val_fraction else "")
                )
        return parts[0], parts[1] if n_val else None


def open_tokens(path: str | os.PathLike, dtype: str | None = None) -> TokenFile:
    """Memory-map a token file: a `.npy`, or a raw array of `dtype` (None: the meta JSON's, else uint16)."""
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"token file {path!r} does not exist" + (" (it is a folder)" if os.path.isdir(path) else ""))
    meta = _read_meta(path)
    if path.endswith(".npy"):
        tokens = _load_npy(path)
        if dtype is not None and tokens.dtype.name != dtype:
            raise ValueError(f"token file {path!r} is a .npy of {tokens.dtype.name}; the dtype given was {dtype}")
    else:
        tokens = _map_raw(path, _raw_dtype(path, dtype, meta))
    if not len(tokens):
        raise ValueError(f"token file {path!r} holds no tokens")
    if "tokens" in meta and int(meta["tokens"]) != len(tokens):
        raise ValueError(
            f"token file {path!r} holds {len(tokens):,} tokens; its {meta_path(path)} says {meta['tokens']:,}"
        )
    return TokenFile(path, tokens, meta)


def _read_meta(path: str) -> dict[str, Any]:
    sidecar = meta_path(path)
    if not sidecar.is_file():
        return {}
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {str(sidecar)!r}, the meta JSON of {path!r}: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(
            f"{str(sidecar)!r} must hold a JSON object (vocab_size, dtype, ...); got {type(meta).__name__}"
        )
    return meta


def _raw_dtype(path: str, given: str | None, meta: dict[str, Any]) -> np.dtype:
    recorded = meta.get("dtype")
    for name, where in ((given, "given"), (recorded, f"in {meta_path(path)}")):
        if name is not None and name not in DTYPES:
            raise ValueError(f"token dtype {name!r} ({where}) is not allowed; allowed: {', '.join(DTYPES)}")
    if given is not None and recorded is not None and given != recorded:
        raise ValueError(f"token file {path!r}: the dtype given is {given}, its {meta_path(path)} says {recorded}")
    return DTYPES[given or recorded or "uint16"]


def _map_raw(path: str, dtype: np.dtype) -> np.ndarray:
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"token file {path!r} is empty")
    if size % dtype.itemsize:
        raise ValueError(
            f"token file {path!r} has {size:,} bytes, not a whole number of {dtype.name} ids "
            f"({dtype.itemsize} bytes each); is it another dtype (allowed: {', '.join(DTYPES)})?"
        )
    return np.memmap(path, dtype=dtype, mode="r")


def _load_npy(path: str) -> np.ndarray:
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read token file {path!r} as .npy: {exc}") from exc
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise ValueError(
            f"token file {path!r} must hold a 1-D integer array; got {tokens.dtype.name} of shape {list(tokens.shape)}"
        )
    if tokens.dtype.kind == "i" and len(tokens) and int(tokens.min()) < 0:
        raise ValueError(f"token file {path!r} holds a negative token id ({int(tokens.min())})")
    return tokens


def global_batches(
    dataset: Any,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    start: int = 0,
    collate: Callable[[list[Any]], Any] | None = None,
) -> Iterator[tuple[Tensor, ...]]:
    """One epoch of a map-style Dataset as stacked GLOBAL batches, the same on every process.

    Engine.train_step takes the global batch and keeps each data-parallel rank's dim-0 slice
    itself (Engine._split), and under torch.distributed every process must pass the same
    global batch. So a per-rank split (DistributedSampler, or a DataLoader over one rank's
    part) would be wrong here: each process would pass a different "global" batch and
    train on a slice of its own slice. Instead every process draws the same order from a
    generator seeded alike: `generator` shuffles (None: dataset order); save
    `generator.get_state()` before an epoch and `start` (batches already trained) to resume
    mid-epoch without loading the skipped items. The last partial batch is dropped, so every
    batch has the compiled shape; `batch_size` must divide by the data-parallel size (the
    engine says so if not). Items are collated with torch's default_collate unless `collate`
    is given; each batch is a tuple of tensors. A DataLoader already yields global batches when
    every process builds it alike (same generator seed, no DistributedSampler).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    n = len(dataset)
    if n < batch_size:
        raise ValueError(f"the dataset has {n} items, fewer than one batch of {batch_size}")
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    collate = collate or torch.utils.data.default_collate
    for b in range(start, n // batch_size):
        batch = collate([dataset[i] for i in order[b * batch_size : (b + 1) * batch_size]])
        yield tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
