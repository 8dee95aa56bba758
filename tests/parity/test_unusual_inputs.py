"""Inputs that used to crash or train silently wrong (issue 17): each now trains as eager or is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shardfx
from shardfx.models import GPT, GPTConfig, gpt_loss
from tests.fixtures import mlp_batch
from tests.parity_util import ATOL, RTOL, assert_parity, eager_train, shardfx_train


class WithUnused(nn.Module):
    """DeepSpeed's test models have such a parameter: the forward never reads `spare`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.spare = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_parameter_the_forward_never_reads_trains_under_every_zero_stage(stage: int) -> None:
    torch.manual_seed(0)
    assert_parity(WithUnused(), mlp_batch(), F.mse_loss, 2, shardfx.Config(zero_stage=stage))


def test_a_tuple_from_the_loss_fn_trains_on_its_first_scalar_only() -> None:
    """One rule with and without a loss_fn: the first floating-point scalar of a tuple is the loss."""

    def with_aux(out: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
        return F.mse_loss(out, y), out.abs().mean()  # (loss, an auxiliary value to log)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    ref_losses, ref_state = eager_train(model, mlp_batch(), F.mse_loss, 3)
    losses, state, _ = shardfx_train(model, mlp_batch(), with_aux, 3, 2)
    torch.testing.assert_close(losses, ref_losses, rtol=RTOL, atol=ATOL)
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=RTOL, atol=ATOL)


class NanoGPTStyle(nn.Module):
    """nanoGPT's convention: forward(idx, targets) returns (logits, loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt = GPT(GPTConfig(vocab_size=64, n_layer=1, d_model=32, n_head=2, seq_len=16, bias=False))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):  # type: ignore[no-untyped-def]
        logits = self.gpt(idx)
        return logits, gpt_loss(logits, targets)


def test_the_nanogpt_convention_logits_then_loss_trains_without_a_loss_fn() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    batch = (torch.randint(0, 64, (4, 16), generator=g), torch.randint(0, 64, (4, 16), generator=g))
    assert_parity(NanoGPTStyle(), batch, None, 2)


@pytest.mark.parametrize(
    "loss_fn, message",
    [
        (lambda out, y: 1.5, "the loss_fn must return the loss as a scalar tensor; it returned float"),
        (lambda out, y: (out, y), "the loss_fn returned a tuple .* with no floating-point scalar to train on"),
    ],
)
def test_a_loss_fn_that_returns_no_scalar_is_a_type_error(loss_fn, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match=message):
        shardfx.compile_distributed(nn.Linear(16, 8), 1, example_inputs=mlp_batch(), loss_fn=loss_fn)


@pytest.mark.parametrize("factory", [lambda ps: None, lambda ps: ps])
def test_an_optimizer_factory_that_returns_no_optimizer_is_refused(factory) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match="the optimizer factory returned .*; it must return a torch.optim.Optimizer"):
        shardfx.compile_distributed(
            nn.Linear(16, 8), 1, example_inputs=mlp_batch(), loss_fn=F.mse_loss, optimizer=factory
        )


def test_a_bool_for_the_zero_stage_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Config.zero_stage=True is not allowed"):
        shardfx.Config(zero_stage=True)


def test_a_tp_plan_pattern_that_matches_nothing_is_refused() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    batch = (torch.randint(0, 64, (4, 16), generator=g), torch.randint(0, 64, (4, 16), generator=g))
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, d_model=32, n_head=2, seq_len=16, bias=False))
    config = shardfx.Config(tp_size=2, tp_plan={"*.mlp.fc": "colwise", "*.mlp.projj": "rowwise"})
    with pytest.raises(
        Exception, match=r"tp_plan pattern '\*\.mlp\.projj' matches no Linear layer.*blocks\.0\.mlp\.proj"
    ):
        shardfx.compile_distributed(model, 2, example_inputs=batch, loss_fn=gpt_loss, config=config)
