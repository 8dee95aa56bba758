"""ZeRO stages 1, 2, 3 (and 3 without resharding) against single-process eager, 5 AdamW steps, fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardfx import Config
from shardfx.models import MLP, gpt_loss
from tests.fixtures import FrozenFirst, gpt_batch, mlp_batch, tiny_gpt
from tests.parity_util import assert_parity, eager_train


def sgd(params):
    return torch.optim.SGD(params, lr=0.5)


STAGES = [
    Config(zero_stage=1),
    Config(zero_stage=2),
    Config(zero_stage=3),
    Config(zero_stage=3, reshard_after_forward=False),
]
IDS = ["zero1", "zero2", "zero3", "zero3-noreshard"]


@pytest.mark.parametrize("config", STAGES, ids=IDS)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_gpt_tied(config: Config, world_size: int) -> None:
    assert_parity(tiny_gpt(tie=True), gpt_batch(), gpt_loss, world_size, config)


@pytest.mark.parametrize("config", STAGES, ids=IDS)
@pytest.mark.parametrize("world_size", [3, 4])
def test_mlp_sizes_that_do_not_divide(config: Config, world_size: int) -> None:
    torch.manual_seed(0)
    assert_parity(MLP(16, (37, 23), 8), mlp_batch(), F.mse_loss, world_size, config)


@pytest.mark.parametrize("config", STAGES, ids=IDS)
def test_frozen_layer(config: Config) -> None:
    torch.manual_seed(0)
    assert_parity(FrozenFirst(), mlp_batch(), F.mse_loss, 3, config)


@pytest.mark.parametrize("config", STAGES, ids=IDS)
def test_batchnorm(config: Config) -> None:
    torch.manual_seed(0)
    assert_parity(MLP(16, (37,), 8, batchnorm=True, bias=False), mlp_batch(), F.mse_loss, 2, config)


@pytest.mark.parametrize("stage", [0, 3])
def test_grad_clipping_of_a_float64_model(stage: int) -> None:
    """The gradient norm of fp64 gradients (no 16-bit narrowing path): clipped as eager clips."""
    model, (x, y) = MLP(16, (37,), 8).double(), mlp_batch()
    assert_parity(
        model, (x.double(), y.double()), F.mse_loss, 2, Config(zero_stage=stage, grad_clip=0.05), optimizer=sgd
    )


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_grad_clipping(stage: int) -> None:
    """A clip norm small enough to bite every step: the global norm is computed across shards.

    SGD, not AdamW: Adam is nearly invariant to scaling all gradients, so it would hide a wrong norm.
    """
    assert_parity(tiny_gpt(), gpt_batch(), gpt_loss, 4, Config(zero_stage=stage, grad_clip=0.05), optimizer=sgd)
    clipped, _ = eager_train(tiny_gpt(), gpt_batch(), gpt_loss, 3, sgd, grad_clip=0.05)
    unclipped, _ = eager_train(tiny_gpt(), gpt_batch(), gpt_loss, 3, sgd)
    assert not torch.allclose(clipped, unclipped, rtol=1e-4), "the clip norm must bite for this test to mean anything"
