"""The on-disk kernel cache: hits reuse an entry, a corrupt entry is rebuilt and never run."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardfx.kernels import cache  # noqa: E402
from tests.kernels.util import captured, lowered, region_case, run  # noqa: E402


def test_hit_then_corrupt_entry_is_rebuilt(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, batch, loss_fn = region_case("gelu_tanh")
    program = captured(model, batch, loss_fn)
    lowered(program, tmp_path)
    entries = sorted(tmp_path.glob("*.py"))
    assert entries and all(p.with_suffix(".json").exists() for p in entries)
    hits = cache.STATS.hits
    lowered(program, tmp_path)
    assert cache.STATS.hits >= hits + len(entries)

    entries[0].write_text("import triton\nthis is not python\n")  # a torn or tampered entry
    entries[-1].with_suffix(".json").write_text("{not json")
    rebuilt = cache.STATS.rebuilt
    fused, _ = lowered(program, tmp_path)
    assert cache.STATS.rebuilt >= rebuilt + (2 if len(entries) > 1 else 1)
    assert "this is not python" not in entries[0].read_text()
    for e, g in zip(run(program, model, batch), run(fused, model, batch)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_cache_dir_from_environment(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SHARDFX_KERNEL_CACHE", str(tmp_path / "k"))
    assert cache.default_dir() == tmp_path / "k"
    monkeypatch.delenv("SHARDFX_KERNEL_CACHE")
    assert cache.default_dir().parts[-2:] == ("shardfx", "kernels")
