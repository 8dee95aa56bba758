"""Engine verbs: the DeepSpeed loop, accumulation, LR schedulers, eval, recompiles, non-finite steps."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shardfx
from shardfx.runtime.engine import NonFiniteError


def model_and_batch(rows: int = 8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 2))
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(rows, 4, generator=g), torch.randn(rows, 2, generator=g))


def engine_for(model, batch, world_size=2, scheduler=None, **config):
    model.eval()  # no dropout in the traced step: eager references below are deterministic
    return shardfx.compile_distributed(
        copy.deepcopy(model),
        world_size,
        example_inputs=batch,
        loss_fn=F.mse_loss,
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
        scheduler=scheduler,
        config=shardfx.Config(**config),
    )


def test_deepspeed_loop_equals_train_step() -> None:
    model, batch = model_and_batch()
    a, b = engine_for(model, batch, zero_stage=2), engine_for(model, batch, zero_stage=2)
    for _ in range(3):
        loss = a(*batch)
        a.backward(loss)
        a.step()
        assert torch.equal(loss, b.train_step(*batch))
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value)


def test_verbs_out_of_order_are_errors() -> None:
    model, batch = model_and_batch()
    engine = engine_for(model, batch)
    with pytest.raises(RuntimeError, match=r"engine.step\(\) comes after engine\(\*batch\) and engine.backward"):
        engine.step()
    loss = engine(*batch)
    with pytest.raises(RuntimeError, match="called again before engine.backward"):
        engine(*batch)
    with pytest.raises(RuntimeError, match="and this is another tensor"):
        engine.backward(loss.clone())


def test_grad_accumulation_matches_the_big_batch() -> None:
    model, batch = model_and_batch(16)
    big = engine_for(model, batch, world_size=2, zero_stage=3, grad_clip=0.05)
    micro = engine_for(
        model, tuple(x[:8] for x in batch), world_size=2, zero_stage=3, grad_clip=0.05, grad_accum_steps=2
    )
    for _ in range(3):
        torch.testing.assert_close(micro.train_step(*batch), big.train_step(*batch))
    assert micro.steps == big.steps == 3 and micro.micro_steps == 6
    for key, value in big.state_dict().items():
        torch.testing.assert_close(micro.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_scheduler_and_get_lr() -> None:
    model, batch = model_and_batch()
    engine = engine_for(model, batch, scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.1))
    lrs = []
    for _ in range(4):
        engine.train_step(*batch)
        lrs.append(engine.get_lr()[0])
    assert lrs == pytest.approx([0.1, 0.01, 0.01, 0.001])


def test_eval_step_is_forward_only_in_eval_mode() -> None:
    model, batch = model_and_batch()
    engine = engine_for(model, batch, zero_stage=3)
    engine.train_step(*batch)
    before = engine.state_dict()
    reference = copy.deepcopy(model)
    reference.load_state_dict(before)
    with torch.no_grad():
        expected = F.mse_loss(reference.eval()(batch[0]), batch[1])
    first = engine.eval_step(*batch)
    torch.testing.assert_close(first, expected, rtol=1e-6, atol=1e-7)  # a mean of the ranks' means
    assert torch.equal(engine.eval_step(*batch), first)  # dropout is off: the same every time
    for key, value in engine.state_dict().items():
        assert torch.equal(before[key], value)


def test_new_batch_shape_recompiles_and_caps_the_cache(caplog) -> None:
    model, batch = model_and_batch()
    engine = engine_for(model, batch, max_batch_shapes=2)
    with caplog.at_level(logging.WARNING, logger="shardfx"):
        engine.train_step(*(x[:4] for x in batch))
        engine.train_step(*(x[:6] for x in batch))
    assert "batch[0] has shape [4, 4] torch.float32; the step was compiled for [8, 4]" in caplog.text
    assert "dropping the step compiled for ([8, 4] float32" in caplog.text
    assert engine.stats()["compiled_shapes"] == 2
    strict = engine_for(model, batch, max_batch_shapes=1)
    with pytest.raises(ValueError, match=r"batch\[0\] has shape \[4, 4\].*compiled for \[8, 4\]"):
        strict.train_step(*(x[:4] for x in batch))


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nan_in_the_batch_is_reported_at_its_step(policy: str) -> None:
    model, batch = model_and_batch()
    messages: list[str] = []
    engine = engine_for(model, batch, on_nonfinite=policy)
    engine._log = messages.append
    bad = (batch[0].clone(), batch[1])
    bad[0][3, 1] = float("nan")
    engine.train_step(*batch)
    engine.train_step(*batch)
    weights = engine.state_dict()
    if policy == "stop":
        with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss nan \(micro-batch 0\)"):
            engine.train_step(*bad)
    else:
        engine.train_step(*bad)
        assert messages == [
            "step 3: non-finite loss nan (micro-batch 0), gradient norm nan; optimizer step skipped "
            "(Config.on_nonfinite='skip')"
        ]
        assert engine.stats()["skipped_steps"] == 1
    for key, value in weights.items():  # nothing was applied
        assert torch.equal(engine.state_dict()[key], value)
    engine.train_step(*batch)  # and training goes on
    assert torch.isfinite(engine.state_dict()["0.weight"]).all()


@pytest.mark.parametrize("config", [{"zero_stage": 3}, {"tp_size": 2}], ids=["zero3", "tp2"])
def test_eval_step_is_its_own_forward_program(config) -> None:
    """A GPT: the eval program has no backward, gathers ZeRO-3 shards (or runs tp slices), and matches eager."""
    from shardfx.graphs import collectives, meta
    from shardfx.models import GPT, GPTConfig, gpt_loss

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, seq_len=16))
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 64, (4, 16), generator=g), torch.randint(0, 64, (4, 16), generator=g)
    engine = shardfx.compile_distributed(
        model,
        2,
        example_inputs=batch,
        loss_fn=gpt_loss,
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5),
        config=shardfx.Config(**config),
    )
    engine.train_step(*batch)
    reference = copy.deepcopy(model)
    reference.load_state_dict(engine.state_dict())
    with torch.no_grad():
        expected = gpt_loss(reference.eval()(batch[0]), batch[1])
    torch.testing.assert_close(engine.eval_step(*batch), expected, rtol=1e-5, atol=1e-6)
    program = engine.eval_program()
    assert all(n.meta.get(meta.PHASE) != meta.BACKWARD for n in program.graph.nodes)
    kinds = {collectives.kind(n) for n in program.graph.nodes if collectives.is_collective(n)}
    assert ("all_gather" in kinds) == ("zero_stage" in config)
    assert [s.role for s in program.signature.outputs] == ["loss"]


def test_eval_step_uses_running_statistics() -> None:
    from shardfx.models import MLP

    torch.manual_seed(0)
    model = MLP(4, (6,), 3, batchnorm=True)
    batch = torch.randn(8, 4), torch.randn(8, 3)
    engine = shardfx.compile_distributed(
        model, 2, example_inputs=batch, loss_fn=F.mse_loss, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1)
    )
    engine.train_step(*batch)
    reference = copy.deepcopy(model)
    reference.load_state_dict(engine.state_dict())
    with torch.no_grad():
        expected = F.mse_loss(reference.eval()(batch[0]), batch[1])
    before = engine.state_dict()
    torch.testing.assert_close(engine.eval_step(*batch), expected, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in engine.state_dict().items())  # running stats untouched
