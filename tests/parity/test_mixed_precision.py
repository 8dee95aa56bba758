"""bf16 mixed precision: tracks the fp32 loss; fp32 masters; half the all-gather traffic."""

from __future__ import annotations

import pytest

from shardfx import Config
from shardfx.models import gpt_loss
from tests.fixtures import BF16_LOSS_RTOL, gpt_batch, tiny_gpt
from tests.parity_util import eager_train, shardfx_train

LOSS_RTOL = BF16_LOSS_RTOL  # stated in tests/fixtures.py


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("reduce_dtype", ["fp32", "bf16"])
def test_bf16_tracks_fp32(stage: int, reduce_dtype: str) -> None:
    reference, _ = eager_train(tiny_gpt(), gpt_batch(), gpt_loss, 10)
    config = Config(zero_stage=stage, mixed_precision="bf16", reduce_dtype=reduce_dtype)
    losses, state, engine = shardfx_train(tiny_gpt(), gpt_batch(), gpt_loss, 10, 4, config)
    assert ((losses - reference).abs() / reference).max() < LOSS_RTOL
    assert all(v.dtype == ref.dtype for v, ref in zip(state.values(), tiny_gpt().state_dict().values()))
    for params in engine.runtime.states[0].params.values():
        assert params.dtype.is_floating_point and params.element_size() == 4  # fp32 masters


def test_bf16_halves_gather_traffic_and_bf16_reduce_halves_reduce_scatter() -> None:
    volume = {}
    for name, config in {
        "fp32": Config(zero_stage=3),
        "bf16": Config(zero_stage=3, mixed_precision="bf16"),
        "bf16-reduce": Config(zero_stage=3, mixed_precision="bf16", reduce_dtype="bf16"),
    }.items():
        _, _, engine = shardfx_train(tiny_gpt(), gpt_batch(), gpt_loss, 1, 4, config)
        volume[name] = engine.stats()["comm"]["volume"]
    assert volume["bf16"]["all_gather"] * 2 == volume["fp32"]["all_gather"]
    assert volume["bf16"]["reduce_scatter"] == volume["fp32"]["reduce_scatter"]
    assert volume["bf16-reduce"]["reduce_scatter"] * 2 == volume["fp32"]["reduce_scatter"]
