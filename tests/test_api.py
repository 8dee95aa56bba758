"""compile_distributed: bad arguments are errors that say what was given and what is allowed."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shardfx

X, Y = torch.randn(8, 4), torch.randn(8, 2)


def compile_(**kw):
    args = dict(example_inputs=(X, Y), loss_fn=F.mse_loss)
    args.update(kw)
    model = args.pop("model", nn.Linear(4, 2))
    world = args.pop("world_size", 2)
    return shardfx.compile_distributed(model, world, **args)


@pytest.mark.parametrize("world", [0, -1, 1.5, True])
def test_bad_world_size(world) -> None:
    with pytest.raises(ValueError, match=r"world_size must be an integer >= 1.*got"):
        compile_(world_size=world)


def test_batch_not_divisible() -> None:
    with pytest.raises(ValueError, match="batch size 8 .* does not divide into 3 data-parallel ranks"):
        compile_(world_size=3)


def test_unknown_config_key() -> None:
    with pytest.raises(ValueError, match=r"unknown Config keys \['zero'\]; allowed keys"):
        compile_(config={"zero": 3})


def test_bad_config_value() -> None:
    with pytest.raises(ValueError, match=r"Config.zero_stage=5 is not allowed; choose one of \[0, 1, 2, 3\]"):
        shardfx.Config(zero_stage=5)


def test_optimizer_instance_instead_of_factory() -> None:
    model = nn.Linear(4, 2)
    with pytest.raises(TypeError, match="optimizer must be a factory"):
        compile_(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_model_not_a_module() -> None:
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; got function"):
        compile_(model=lambda x: x)


def test_world_size_none_outside_a_launch() -> None:
    with pytest.raises(ValueError, match="torchrun"):
        compile_(world_size=None)


def test_train_step_with_a_new_batch_shape_when_recompiling_is_off() -> None:
    engine = compile_(config=shardfx.Config(max_batch_shapes=1))
    with pytest.raises(ValueError, match=r"batch\[0\] has shape \[4, 4\].*compiled for \[8, 4\]"):
        engine.train_step(X[:4], Y[:4])
