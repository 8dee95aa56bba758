"""data_parallel (ZeRO-0) against single-process eager training, 5 AdamW steps, fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from shardfx import Config
from shardfx.models import MLP, gpt_loss
from tests.fixtures import FrozenFirst, gpt_batch, mlp_batch, tiny_gpt
from tests.parity_util import assert_parity

WORLD_SIZES = [1, 2, 3, 4]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_mlp_uneven_hidden(world_size: int) -> None:
    torch.manual_seed(0)
    model = MLP(16, (37, 23), 8)
    assert_parity(model, mlp_batch(), F.mse_loss, world_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_gpt_tied(world_size: int) -> None:
    assert_parity(tiny_gpt(tie=True), gpt_batch(), gpt_loss, world_size)


def test_gpt_untied() -> None:
    assert_parity(tiny_gpt(tie=False), gpt_batch(), gpt_loss, 2)


@pytest.mark.parametrize("world_size", [2, 3])
def test_frozen_layer(world_size: int) -> None:
    torch.manual_seed(0)
    engine = assert_parity(FrozenFirst(), mlp_batch(), F.mse_loss, world_size)
    assert [o.target for o in engine.program.signature.outputs if o.role == "grad"] == ["head.weight", "head.bias"]


# BatchNorm after a bias-free Linear: a bias before BN has an exactly-zero gradient
# (BN subtracts the per-channel mean), the same AdamW noise problem as above.
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_batchnorm_global_statistics(world_size: int) -> None:
    torch.manual_seed(0)
    model = MLP(16, (37,), 8, batchnorm=True, bias=False)
    engine = assert_parity(model, mlp_batch(), F.mse_loss, world_size)
    if world_size > 1:
        assert engine.pass_records[0].name == "sync_batch_norm"


def test_batchnorm_local_statistics_are_per_rank() -> None:
    """Config(batchnorm="local") is DDP: rank 0's running mean is that of its own half of the batch."""
    torch.manual_seed(0)
    model = MLP(16, (37,), 8, batchnorm=True, bias=False)
    x, y = mlp_batch()
    from tests.parity_util import shardfx_train

    _, state, engine = shardfx_train(model, (x, y), F.mse_loss, 1, 2, Config(batchnorm="local"))
    assert "sync_batch_norm" not in [r.name for r in engine.pass_records]
    with torch.no_grad():
        h = model.layers[0](x[:6])
    expected = 0.9 * torch.zeros(37) + 0.1 * h.mean(0)
    torch.testing.assert_close(state["norms.0.running_mean"], expected, rtol=1e-5, atol=1e-6)


class ReturnsTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        out = self.fc(x)
        return F.mse_loss(out, y), out


class Output:
    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = loss


class ReturnsObject(ReturnsTuple):
    def forward(self, x: torch.Tensor, y: torch.Tensor):  # type: ignore[override]
        return Output(F.mse_loss(self.fc(x), y))


class ReturnsTensor(ReturnsTuple):
    def forward(self, x: torch.Tensor, y: torch.Tensor):  # type: ignore[override]
        return F.mse_loss(self.fc(x), y)


@pytest.mark.parametrize("cls", [ReturnsTensor, ReturnsTuple, ReturnsObject])
def test_model_returns_its_loss(cls: type) -> None:
    torch.manual_seed(0)
    assert_parity(cls(), mlp_batch(), None, 2)
