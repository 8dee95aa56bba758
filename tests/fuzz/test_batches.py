"""Malformed batches into engine.train_step / eval_step: wrong argument counts, shapes, dtypes,
devices, layouts and things that are not tensors. Each call either works, with the loss eager
computes on the engine's current weights, or raises a one-line ValueError/TypeError/shardfx error
naming the argument; the engine stays usable after every refusal.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import shardfx
from tests.fuzz.util import check_error, fuzz, no_hang


class Tokens(nn.Module):
    """(B, T) int64 tokens -> (B, T, V) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # (B*T, V), (B*T,)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def tokens_model() -> nn.Module:
    torch.manual_seed(0)
    return Tokens()


g = torch.Generator().manual_seed(5)
CASES = {
    "mlp": (mlp, F.mse_loss, (torch.randn(4, 4, generator=g), torch.randn(4, 2, generator=g))),
    "tokens": (tokens_model, token_loss, (torch.randint(0, 16, (4, 5), generator=g),) * 2),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[shardfx.Engine, Any]:
    make, loss_fn, example = CASES[request.param]
    engine = shardfx.compile_distributed(
        make(),
        2,
        example_inputs=example,
        loss_fn=loss_fn,
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01),
    )
    return engine, (make, loss_fn, example)


DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]
NOT_TENSORS = [None, 3, 2.5, "tokens", b"x", [], [[1.0, 2.0]], (1, 2), {"x": 1}]


@st.composite
def element(draw: st.DrawFn, like: torch.Tensor, rows: int) -> Any:
    """One batch element of `rows` rows: as compiled, or changed in rows, other dims, dtype, layout, device or kind."""
    kinds = ["same"] * 6 + ["rows", "dims", "dtype", "layout", "device", "numpy", "not_tensor", "values"]
    kind = draw(st.sampled_from(kinds))
    if kind == "not_tensor":
        return draw(st.sampled_from(NOT_TENSORS))
    shape = [rows, *like.shape[1:]]
    if kind == "rows":
        shape[0] = draw(st.sampled_from([0, 1, 2, 3, 6, 8]))
    if kind == "dims":
        change = draw(st.sampled_from(["grow", "shrink", "add", "drop", "one"]))
        d = draw(st.integers(1, max(1, len(shape) - 1)))
        if change == "add":
            shape.append(1)
        elif change == "drop" and len(shape) > 1:
            shape.pop()
        elif d < len(shape):
            shape[d] = {"grow": shape[d] + 1, "shrink": max(0, shape[d] - 1), "one": 1}.get(change, shape[d])
    dtype = draw(st.sampled_from(DTYPES)) if kind == "dtype" else like.dtype
    if like.dtype.is_floating_point:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 9))))
    else:
        x = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 9))))
    x = x.to(dtype)
    if kind == "values" and not like.dtype.is_floating_point and x.numel():
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from([16, 99, -1, 2**40]))  # past the vocab
    if kind == "layout" and x.dim() >= 2:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, column-major strides
        assert not x.is_contiguous() or x.shape[0] <= 1 or x.shape[1] <= 1
    if kind == "device":
        x = x.to("meta")
    if kind == "numpy":
        return x.numpy()
    return x


@st.composite
def batch(draw: st.DrawFn, example: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    arity = draw(st.sampled_from([len(example)] * 4 + [0, 1, len(example) + 1]))
    rows = draw(st.sampled_from([example[0].shape[0]] * 2 + [2, 6, 8]))  # a new batch size compiles anew
    return tuple(draw(element(example[min(i, len(example) - 1)], rows)) for i in range(arity))


def eager_loss(make: Any, loss_fn: Any, engine: shardfx.Engine, items: tuple[Any, ...]) -> torch.Tensor:
    model = make()
    model.load_state_dict(engine.state_dict())
    with torch.no_grad():
        return loss_fn(model(*items[:-1]), items[-1])


def run(engine: shardfx.Engine, spec: Any, verb: str, items: tuple[Any, ...]) -> None:
    make, loss_fn, example = spec
    try:
        expected: torch.Tensor | BaseException = eager_loss(make, loss_fn, engine, items)
    except Exception as exc:  # noqa: BLE001 - eager refuses it too: shardfx must refuse, in its own words
        expected = exc
    with no_hang(30):
        try:
            loss = getattr(engine, verb)(*items)
        except Exception as exc:  # noqa: BLE001 - checked to be an allowed one-line error below
            text = check_error(exc)
            # a batch the program takes but cannot compute on (a token id past the vocabulary) fails inside
            # it: the error names the node instead
            named = "\n  node: " in text if isinstance(exc, shardfx.errors.ExecutionError) else "batch[" in text
            assert named or "tensors" in text, f"the error names no argument: {text}"
        else:
            assert not isinstance(expected, BaseException), (
                f"{verb} returned {loss} where eager raises {type(expected).__name__}: {expected}"
            )
            torch.testing.assert_close(loss.float(), expected.float(), rtol=1e-5, atol=1e-6)
        # a refused call leaves the engine as it was: a good batch still runs
        good = engine.eval_step(*example)
        torch.testing.assert_close(good, eager_loss(make, loss_fn, engine, example), rtol=1e-5, atol=1e-6)


@fuzz(max_examples=60, deadline_ms=20_000)
@given(data=st.data())
def test_a_malformed_batch_works_as_eager_or_is_refused_naming_it(case: Any, data: st.DataObject) -> None:
    engine, spec = case
    verb = data.draw(st.sampled_from(["train_step", "eval_step"]))
    run(engine, spec, verb, data.draw(batch(spec[2])))


@pytest.mark.slow
@fuzz(max_examples=300, deadline_ms=20_000)
@given(data=st.data())
def test_many_malformed_batches(case: Any, data: st.DataObject) -> None:
    engine, spec = case
    verb = data.draw(st.sampled_from(["train_step", "eval_step"]))
    run(engine, spec, verb, data.draw(batch(spec[2])))


# --- each defect the fuzzing found, as a plain regression test -------------------------------------


@pytest.fixture(scope="module")
def mlp_engine() -> shardfx.Engine:
    return shardfx.compile_distributed(
        mlp(), 2, example_inputs=CASES["mlp"][2], loss_fn=F.mse_loss, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01)
    )


@pytest.mark.parametrize("verb", ["train_step", "eval_step"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int64])
def test_a_dtype_change_names_the_argument_what_was_compiled_and_the_fix(
    mlp_engine: shardfx.Engine, verb: str, dtype: torch.dtype
) -> None:
    """Issue 17 item 9: was a RuntimeError from the generated code ('mat1 and mat2 must have the same dtype')."""
    x, y = CASES["mlp"][2]
    with pytest.raises(TypeError) as info:
        getattr(mlp_engine, verb)(x.to(dtype), y)
    assert str(info.value) == (
        f"{verb}: batch[0] is [4, 4] {dtype}; the step was compiled for [4, 4] torch.float32 on cpu: "
        "pass batch[0].to(torch.float32), or compile again with example_inputs of that dtype"
    )


@pytest.mark.parametrize("value", [None, [[1.0] * 4] * 4, np.zeros((4, 4), dtype=np.float32), "x", 3])
def test_eval_step_refuses_what_is_not_a_tensor(mlp_engine: shardfx.Engine, value: Any) -> None:
    """Was an AttributeError ("'list' object has no attribute 'shape'") from eval_step."""
    with pytest.raises(TypeError, match=r"^eval_step: batch\[0\] has type \w+, not a tensor; the step was compiled"):
        mlp_engine.eval_step(value, CASES["mlp"][2][1])


@pytest.mark.parametrize("verb", ["train_step", "eval_step"])
def test_a_meta_tensor_is_refused_naming_the_device(mlp_engine: shardfx.Engine, verb: str) -> None:
    """Was 'Tensor on device cpu is not on the expected device meta!' (train) and a multi-line TraceError (eval)."""
    x, y = CASES["mlp"][2]
    with pytest.raises(ValueError, match=r"^\w+: batch\[1\] is on meta; .* on cpu: pass batch\[1\].to\('cpu'\)$"):
        getattr(mlp_engine, verb)(x, y.to("meta"))


def test_an_empty_batch_is_refused(mlp_engine: shardfx.Engine) -> None:
    """Was a TraceError wrapping ZeroDivisionError from AOTAutograd (train_step)."""
    with pytest.raises(ValueError, match=r"train_step: batch\[0\] is \[0, 4\]: no rows"):
        mlp_engine.train_step(torch.randn(0, 4), torch.randn(0, 2))


def test_a_shape_the_model_cannot_take_names_the_argument(mlp_engine: shardfx.Engine) -> None:
    """Was a TraceError naming only the op ('a and b must have same reduction dim'), not which input changed."""
    x, y = CASES["mlp"][2]
    with pytest.raises(shardfx.errors.TraceError) as info:
        mlp_engine.train_step(torch.randn(4, 5), y)
    assert str(info.value).startswith(
        "batch[0] has shape [4, 5] torch.float32; the step was compiled for [4, 4] torch.float32, "
        "and the step could not be compiled for it: torch.export could not trace the model"
    )


@pytest.mark.filterwarnings("ignore:Using a target size")  # the broadcast (4, 1) targets: eager warns too
@pytest.mark.parametrize(
    "change",
    [
        lambda x, y: (x.t().contiguous().t(), y),  # column-major strides, the same values
        lambda x, y: (torch.randn(4, 8)[:, ::2], y),  # a strided view
        lambda x, y: (x.expand(2, 4, 4)[1], y[:, :1]),  # an expanded view; targets that broadcast (4, 1)
    ],
)
def test_unusual_layouts_and_broadcasting_targets_match_eager(change: Any) -> None:
    """What the fuzzer rarely draws and must work: one SGD step against eager, loss and weights."""
    x, y = change(*CASES["mlp"][2])
    engine = shardfx.compile_distributed(
        mlp(), 2, example_inputs=CASES["mlp"][2], loss_fn=F.mse_loss, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1)
    )
    loss = engine.train_step(x, y)
    model = mlp()
    expected = F.mse_loss(model(x), y)
    expected.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(engine.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_elements_whose_rows_do_not_scale_together_are_refused(mlp_engine: shardfx.Engine) -> None:
    """Was a silently wrong loss: x of 2 rows and y of 6 split to 1 and 3 rows a rank, and mse_loss broadcast
    them (eager raises: 'The size of tensor a (2) must match the size of tensor b (6)')."""
    with pytest.raises(ValueError, match=r"^train_step: batch\[1\] has 6 rows \(dim 0\) and batch\[0\] 2; .*4 and 4"):
        mlp_engine.train_step(torch.randn(2, 4), torch.randn(6, 2))


def test_non_contiguous_tokens_match_eager() -> None:
    """Was a RuntimeError from the generated code ('view size is not compatible with input tensor's size and
    stride'): the program was traced on contiguous slices."""
    tokens = CASES["tokens"][2][0]
    engine = shardfx.compile_distributed(
        tokens_model(),
        2,
        example_inputs=(tokens, tokens),
        loss_fn=token_loss,
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
    )
    strided = tokens.t().contiguous().t()
    assert not strided.is_contiguous()
    loss = engine.train_step(strided, strided)
    torch.testing.assert_close(loss, token_loss(tokens_model()(tokens), tokens).detach(), rtol=1e-5, atol=1e-6)


def test_a_token_past_the_vocabulary_names_the_node_and_module() -> None:
    """Was a bare IndexError ('index out of range in self') from the generated code, naming no op or module."""
    tokens = CASES["tokens"][2][0]
    engine = shardfx.compile_distributed(tokens_model(), 2, example_inputs=(tokens, tokens), loss_fn=token_loss)
    bad = tokens.clone()
    bad[0, 0] = 99
    for verb in ("train_step", "eval_step"):
        with pytest.raises(shardfx.errors.ExecutionError) as info:
            getattr(engine, verb)(bad, tokens)
        lines = str(info.value).splitlines()
        assert lines[0] == (
            "the compiled program failed at node embedding (aten.embedding.default): IndexError: index out of range in self"
        )
        assert lines[1].startswith("  node: %embedding : "), lines
        if verb == "train_step":  # the eval program's nodes carry no module or source line (its capture keeps none)
            assert "  module: embed" in lines, lines
    torch.testing.assert_close(engine.eval_step(tokens, tokens), token_loss(tokens_model()(tokens), tokens).detach())


def test_an_eval_step_that_fails_on_one_rank_leaves_the_next_one_running() -> None:
    """Was a hang: evaluate raised rank 0's error at once while rank 1 still waited in the loss's all-reduce;
    that thread held the pool, so the next eval_step never completed."""
    tokens = CASES["tokens"][2][0]
    engine = shardfx.compile_distributed(tokens_model(), 2, example_inputs=(tokens, tokens), loss_fn=token_loss)
    bad = tokens.clone()
    bad[0, 0] = 99  # in rank 0's half of the batch only
    with no_hang(30):
        with pytest.raises(shardfx.errors.ExecutionError):
            engine.eval_step(bad, tokens)
        good = engine.eval_step(tokens, tokens)
    torch.testing.assert_close(good, token_loss(tokens_model()(tokens), tokens).detach())
