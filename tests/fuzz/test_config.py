"""Random Config values: every field, right and wrong types, bools where ints go, negatives, huge and
non-finite numbers, unknown strings, None, lists. Building a Config either works, keeping a value of
the field's declared type, or raises a one-line ValueError/TypeError naming the field; a sample of
the Configs that build compiles a tiny model on 2 local ranks and trains a step that matches eager.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import shardfx
from tests.fuzz.util import check_error, fuzz, no_hang

FIELDS = {f.name: f for f in dataclasses.fields(shardfx.Config)}
HINTS = typing.get_type_hints(shardfx.Config)

# Values of the wrong kind for most fields, and edge values of the right kind.
ODD: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    3,
    7,
    2**63,
    -(2**63),
    10**400,
    0.0,
    -0.0,
    0.5,
    1.0,
    2.0,
    -1.5,
    1e300,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "0",
    "1",
    "auto",
    "none",
    "bogus",
    "fp32",
    b"bf16",
    [],
    [1],
    ["x"],
    ("a", "b"),
    (),
    {},
    {"x": 1},
    {"*.fc": "colwise"},
    {1: "colwise"},
    {"*": "diagonal"},
    object(),
    1j,
]
# Values a field of that declared type takes (and the choices of enum fields).
_GOOD_BY_TYPE: dict[Any, list[Any]] = {
    int: [1, 2, 4, 1000],
    float: [0.5, 1.0, 2.0, 1e6, 4096],
    bool: [True, False],
    str: ["auto", "none"],
}
_GOOD_BY_FIELD: dict[str, list[Any]] = {
    "zero_stage": [0, 1, 2, 3],
    "param_persistence_threshold": [0, 1, 100],
    "mixed_precision": [None, "bf16", "fp16"],
    "reduce_dtype": ["fp32", "bf16"],
    "batchnorm": ["global", "local"],
    "recompute": ["none", "full", "selective", "budget"],
    "on_nonfinite": ["skip", "stop", "ignore"],
    "grad_accum_sync": ["boundary", "micro_batch"],
    "pp_schedule": ["gpipe", "1f1b", "interleaved_1f1b"],
    "hardware": ["auto", "cpu", "h100"],
    "disable_passes": [(), ["bucket_collectives"], "schedule_overlap", ("no_such_pass",)],
    "tp_plan": [None, {"0": "colwise", "2": "rowwise"}, {"*": "replicate"}],
    "pp_split": [None, ["2"], ("1", "2")],
    "plan": [None, "auto"],
}


def good_values(name: str) -> list[Any]:
    if name in _GOOD_BY_FIELD:
        return _GOOD_BY_FIELD[name]
    hint = HINTS[name]
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return [v for kind in kinds for v in _GOOD_BY_TYPE.get(kind, [])] + (
        [None] if type(None) in typing.get_args(hint) else []
    )


def value_for(name: str) -> st.SearchStrategy[Any]:
    return st.sampled_from(good_values(name)) | st.sampled_from(ODD) | st.integers(-(2**65), 2**65)


changes = st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({n: value_for(n) for n in names})
)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past float's range
        return False


def _conforms(value: Any, hint: Any) -> bool:
    """`value` has the field's declared type: int is not bool (nor a float), float is a finite real number,
    str is str, tuple[str, ...] and dict[str, str] hold strings."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    raise AssertionError(f"no rule for the annotation {hint!r}")


def build(values: dict[str, Any]) -> shardfx.Config | None:
    """The Config, or None after checking the error it raised."""
    try:
        config = shardfx.Config(**values)
    except Exception as exc:  # noqa: BLE001 - checked to be an allowed one-line error below
        text = check_error(exc)
        assert isinstance(exc, (ValueError, TypeError)), f"{type(exc).__name__} from Config: {text}"
        # the error names the field it is about (or, for a combination, one of those given or their rule)
        assert any(name in text for name in values) or "Config" in text, text
        if len(values) == 1:
            assert next(iter(values)) in text, f"the error does not name the field: {text}"
        return None
    for name in FIELDS:
        value = getattr(config, name)
        assert _conforms(value, HINTS[name]), f"Config kept {name}={value!r}, not a {HINTS[name]}"
    return config


@fuzz(max_examples=400)
@given(changes)
def test_a_config_is_built_or_refused_in_one_line(values: dict[str, Any]) -> None:
    with no_hang(10):
        build(values)


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_odd_value_of_every_field(name: str) -> None:
    """Each field alone, with every odd value: exhaustive, so no field is left to chance."""
    for value in ODD + good_values(name):
        build({name: value})


# --- a sample of the Configs that build: compiled on 2 local ranks, one step against eager ------------

COMPILED_FIELDS = {
    "zero_stage": [0, 1, 2, 3],
    "reshard_after_forward": [True, False],
    "param_persistence_threshold": [0, 3, 10**9],
    "mixed_precision": [None, "bf16", "fp16"],
    "grad_clip": [None, 0.5, 1e9],
    "bucket_mb": [None, 0, 0.0001, 1e9],
    "overlap": [None, True, False],
    "prefetch": [None, 1, 10**6],
    "tune_communication": [True, False],
    "comm_memory_cap": [None, 1, 1e12],
    "grad_accum_steps": [1, 2],
    "grad_accum_sync": ["boundary", "micro_batch"],
    "max_batch_shapes": [1, 10**6],
    "recompute": ["none", "full", "selective"],
    "collective_timeout": [30, 1e6],
    "disable_passes": [(), "schedule_overlap", "bucket_collectives"],
    "tp_size": [1, 2],
    "pp_size": [1, 2],
    "pp_microbatches": [1, 2],
    "pp_schedule": ["gpipe", "1f1b"],
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _eager_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float | None) -> torch.Tensor:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.mse_loss(model(x), y)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss.detach()


compiled_changes = st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in COMPILED_FIELDS.items()})


@fuzz(max_examples=12, deadline_ms=60_000)
@given(compiled_changes)
def test_a_config_that_builds_compiles_and_matches_eager(values: dict[str, Any]) -> None:
    compile_and_compare(values)


@pytest.mark.slow
@fuzz(max_examples=150, deadline_ms=60_000)
@given(compiled_changes)
def test_many_configs_compile_and_match_eager(values: dict[str, Any]) -> None:
    compile_and_compare(values)


def compile_and_compare(values: dict[str, Any]) -> None:
    config = build(values)
    if config is None:
        return
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    k = config.grad_accum_steps
    with no_hang(60):
        try:
            engine = shardfx.compile_distributed(
                _model(),
                2,
                example_inputs=(x[: 4 // k], y[: 4 // k]),
                loss_fn=F.mse_loss,
                optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
                config=config,
            )
        except Exception as exc:  # noqa: BLE001 - an allowed, one-line refusal is a pass
            check_error(exc)
            return
        loss = engine.train_step(x, y)
    reference = _model()
    expected = _eager_step(copy.deepcopy(reference), x, y, config.grad_clip)
    # fp16's first steps overflow at the initial loss scale and are skipped (weights kept), as DeepSpeed's
    assert not engine.skipped_steps or config.mixed_precision == "fp16", f"a step was skipped: {engine.stats()}"
    if not engine.skipped_steps:
        expected = _eager_step(reference, x, y, config.grad_clip)
    tol = 2e-2 if config.mixed_precision else 1e-5
    torch.testing.assert_close(loss.float(), expected, rtol=tol, atol=tol)
    got = engine.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(got[name].float(), value, rtol=tol, atol=tol, msg=f"{name} after one step")


# --- each defect the fuzzing found, as a plain regression test -------------------------------------


@pytest.mark.parametrize(
    "values, error, message, before",
    [
        ({"zero_stage": 1.0}, ValueError, "Config.zero_stage=1.0 is not allowed; choose one of [0, 1, 2, 3]", "kept"),
        ({"hardware": ["cpu"]}, ValueError, "Config.hardware=['cpu'] is not a profile", "unhashable type: 'list'"),
        ({"disable_passes": None}, TypeError, "Config.disable_passes must be pass names", "'NoneType' object is not"),
        (
            {"pp_size": 2, "pp_split": True},
            TypeError,
            "Config.pp_split must be a list of module names",
            "'bool' object",
        ),
        ({"tp_plan": {"x": 1}}, TypeError, "Config.tp_plan must be a dict of module pattern -> style", "kept"),
        ({"grad_clip": True}, TypeError, "Config.grad_clip must be a number or None; got True", "kept: a norm of 1"),
        ({"collective_timeout": True}, TypeError, "Config.collective_timeout must be a number; got True", "kept: 1 s"),
        ({"collective_timeout": math.inf}, ValueError, "Config.collective_timeout must be a finite number", "kept"),
        ({"bucket_mb": math.nan}, ValueError, "Config.bucket_mb must be a finite number or None; got nan", "kept"),
        ({"initial_loss_scale": 10**400}, ValueError, "Config.initial_loss_scale must be a finite number", "kept"),
        ({"dump_dir": True}, TypeError, "Config.dump_dir must be a str or None; got True", "kept"),
        ({"memory_budget": "1e9"}, TypeError, "Config.memory_budget must be a number or None; got '1e9'", "kept"),
    ],
)
def test_a_value_the_fuzzer_found_is_refused_naming_the_field(
    values: dict[str, Any], error: type[Exception], message: str, before: str
) -> None:
    """`before`: what Config did with it before (kept it, or the raw error it raised)."""
    with pytest.raises(error) as info:
        shardfx.Config(**values)
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


def test_a_folder_may_be_a_path() -> None:
    from pathlib import Path

    assert shardfx.Config(kernel_cache_dir=Path("/tmp/k")).kernel_cache_dir == "/tmp/k"


def test_a_memory_cap_no_plan_fits_names_the_cap_in_bytes() -> None:
    """Was 'under the memory cap 0.00 MiB; the lowest is 0.00 MiB' (both rounded away), naming no option."""
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    with pytest.raises(shardfx.errors.PassError) as info:
        shardfx.compile_distributed(
            _model(), 2, example_inputs=(x, y), loss_fn=F.mse_loss, config=shardfx.Config(comm_memory_cap=1)
        )
    first = str(info.value).splitlines()[0]
    assert "the memory cap (Config.comm_memory_cap=1 bytes); the lowest simulated peak is " in first, first
    assert first.endswith("bytes: raise the cap or set it to None"), first
