"""Token files (shardfx.models.tokens): nanoGPT's flat uint16/uint32 arrays and .npy, their errors, windows,
splits, and global batches of a torch Dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shardfx.models.tokens import global_batches, meta_path, open_tokens


def _write(path, ids, dtype) -> np.ndarray:
    array = np.asarray(ids, dtype=dtype)
    array.tofile(path)  # raw, no header: what nanoGPT's prepare.py writes
    return array


def test_raw_uint16_is_the_default_and_uint32_is_read_when_given(tmp_path) -> None:
    ids = np.arange(1000) % 300
    _write(tmp_path / "a.bin", ids, "<u2")
    tokens = open_tokens(tmp_path / "a.bin")
    assert tokens.dtype == "uint16" and np.array_equal(tokens.tokens, ids)
    assert isinstance(tokens.tokens, np.memmap)
    assert tokens.max_token() == 299 and tokens.vocab_size() == 300

    big = np.array([0, 70_000, 5, 2**32 - 1])
    _write(tmp_path / "b.bin", big, "<u4")
    tokens = open_tokens(tmp_path / "b.bin", "uint32")
    assert tokens.dtype == "uint32" and tokens.tokens.tolist() == big.tolist()
    assert tokens.max_token() == 2**32 - 1


def test_the_meta_json_gives_dtype_and_vocab(tmp_path) -> None:
    _write(tmp_path / "c.bin", [1, 2, 3, 4], "<u4")
    meta_path(tmp_path / "c.bin").write_text(json.dumps({"dtype": "uint32", "vocab_size": 50, "tokens": 4}))
    tokens = open_tokens(tmp_path / "c.bin")
    assert tokens.dtype == "uint32" and tokens.tokens.tolist() == [1, 2, 3, 4] and tokens.vocab_size() == 50
    with pytest.raises(ValueError, match=r"the dtype given is uint16, its .*c\.meta\.json says uint32"):
        open_tokens(tmp_path / "c.bin", "uint16")


def test_npy_is_memory_mapped(tmp_path) -> None:
    np.save(tmp_path / "d.npy", np.array([7, 8, 9], dtype=np.int32))
    tokens = open_tokens(tmp_path / "d.npy")
    assert tokens.dtype == "int32" and tokens.tokens.tolist() == [7, 8, 9] and isinstance(tokens.tokens, np.memmap)
    np.save(tmp_path / "e.npy", np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"must hold a 1-D integer array; got int64 of shape \[2, 3\]"):
        open_tokens(tmp_path / "e.npy")
    np.save(tmp_path / "f.npy", np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match=r"1-D integer array; got float32"):
        open_tokens(tmp_path / "f.npy")


@pytest.mark.parametrize(
    "content, dtype, message",
    [
        (None, None, r"token file '.*missing\.bin' does not exist"),
        (b"", None, r"is empty"),
        (b"\x01\x00\x02", None, r"has 3 bytes, not a whole number of uint16 ids \(2 bytes each\)"),
        (b"\x01\x00\x02\x00\x03\x00", "uint32", r"has 6 bytes, not a whole number of uint32 ids \(4 bytes each\)"),
        (b"\x01\x00", "int8", r"token dtype 'int8' \(given\) is not allowed; allowed: uint16, uint32"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, content, dtype, message) -> None:
    path = tmp_path / "missing.bin"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        open_tokens(path, dtype)
    assert "\n" not in str(info.value)


def test_split_holds_out_the_end_and_each_part_needs_a_window(tmp_path) -> None:
    _write(tmp_path / "g.bin", np.arange(100), "<u2")
    tokens = open_tokens(tmp_path / "g.bin")
    train, val = tokens.split(0.1, block_size=8)
    assert train.tokens.tolist() == list(range(90)) and val.tokens.tolist() == list(range(90, 100))
    train, val = tokens.split(0.0, block_size=8)
    assert val is None and len(train) == 100
    with pytest.raises(
        ValueError, match=r"the validation split \(10 of 100 tokens, validation fraction 0.1\) is shorter "
    ):
        tokens.split(0.1, block_size=10)  # a window is 11 tokens
    with pytest.raises(ValueError, match=r"the train split \(100 of 100 tokens.* block_size \+ 1 = 101 tokens"):
        tokens.split(0.0, block_size=100)


def test_windows_are_shifted_pairs_drawn_from_the_generator(tmp_path) -> None:
    _write(tmp_path / "h.bin", np.arange(500), "<u2")  # token i at position i: a window's start is its first id
    train, _ = open_tokens(tmp_path / "h.bin").split(0.1, block_size=16)
    x, y = train.batch(6, 16, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (6, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1) and torch.equal(x, x[:, :1] + torch.arange(16))
    assert int(y.max()) < 450  # never reaches into the validation split
    again, _ = train.batch(6, 16, torch.Generator().manual_seed(3))
    assert torch.equal(again, x)
    other, _ = train.batch(6, 16, torch.Generator().manual_seed(4))
    assert not torch.equal(other, x)


def test_fixed_batches_spread_over_the_split_and_repeat(tmp_path) -> None:
    _write(tmp_path / "i.bin", np.arange(1000), "<u2")
    _, val = open_tokens(tmp_path / "i.bin").split(0.2, block_size=10)  # ids 800..999
    batches = val.fixed_batches(3, 4, 10)
    starts = [int(s) for x, _ in batches for s in x[:, 0]]
    assert len(batches) == 3 and starts[0] == 800 and starts[-1] == 999 - 10  # the last window ends at the last id
    assert starts == sorted(starts) and len(set(starts)) == 12
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, val.fixed_batches(3, 4, 10)))


def test_global_batches_are_the_same_on_every_process_and_resume_mid_epoch() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(10).float()[:, None], torch.arange(10))
    first = list(global_batches(data, 4, generator=torch.Generator().manual_seed(0)))
    second = list(global_batches(data, 4, generator=torch.Generator().manual_seed(0)))  # another process
    assert len(first) == 2  # 10 items: the partial third batch is dropped, every batch has the compiled shape
    assert all(torch.equal(a, b) for fa, fb in zip(first, second) for a, b in zip(fa, fb))
    x, y = first[0]
    assert x.shape == (4, 1) and y.shape == (4,) and torch.equal(x[:, 0].long(), y)
    seen = torch.cat([y for _, y in first])
    assert len(set(seen.tolist())) == 8 and seen.tolist() != list(range(8))  # shuffled, no repeats
    rest = list(global_batches(data, 4, generator=torch.Generator().manual_seed(0), start=1))
    assert len(rest) == 1 and torch.equal(rest[0][1], first[1][1])
    ordered = list(global_batches(data, 5))
    assert [b[1].tolist() for b in ordered] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match=r"the dataset has 10 items, fewer than one batch of 11"):
        next(global_batches(data, 11))
