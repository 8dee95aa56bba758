"""The MODEL argument of the debugging commands: a built-in model or a user's factory.

    gpt --preset tiny --set n_layer=4         a built-in model (shardfx.models.build_model), sized
    path/to/file.py:make                      a factory in a file
    package.module:make                       a factory in an importable module

A factory is called with the --set values as keyword arguments and returns
`(model, example_batch)` or `(model, example_batch, loss_fn)`: `example_batch`
is one global batch (a tuple of tensors, dim 0 split over the ranks); with
`loss_fn`, loss = loss_fn(model(*batch[:-1]), batch[-1]), without one the
model returns its loss. `load_object("file.py:name")` resolves the same
syntax for other objects (e.g. a pass to append).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from shardfx.models.registry import _BUILDERS, build_model
from shardfx.tools.options import add_size_arguments, model_kwargs, positive_int

SPEC_HELP = (
    f"a built-in model ({', '.join(sorted(_BUILDERS))}; size it with --preset/--set) or a factory: "
    "path/to/file.py:NAME or package.module:NAME, returning (model, example_batch[, loss_fn])"
)


@dataclass
class ModelSpec:
    """A model ready to compile: the module, one global batch and its loss (None: the model returns it)."""

    label: str  # how the command line named it, with its size arguments
    model: nn.Module
    batch: tuple[torch.Tensor, ...]
    loss_fn: Callable[..., torch.Tensor] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def add_model_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL, --preset, --set, --batch-size and --seed."""
    parser.add_argument("model", metavar="MODEL", help=SPEC_HELP)
    add_size_arguments(parser)
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="N",
        help="global batch size of a built-in model (default: 4 per rank); a factory returns its own batch",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the parameters and the batch of a built-in model (default 0)"
    )


def model_spec_from_args(args: argparse.Namespace) -> ModelSpec:
    batch_size = args.batch_size if args.batch_size is not None else 4 * args.world_size
    return load_model_spec(
        args.model,
        args.preset,
        dict(args.overrides),
        batch_size,
        args.seed,
        batch_size_given=args.batch_size is not None,
    )


def load_model_spec(
    text: str,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    batch_size: int = 8,
    seed: int = 0,
    *,
    batch_size_given: bool = False,
) -> ModelSpec:
    """Build the model a MODEL argument names (see the module docstring)."""
    overrides = dict(overrides or {})
    if ":" not in text:
        return _builtin(text, preset, overrides, batch_size, seed)
    if preset is not None:
        raise ValueError(f"--preset sizes a built-in model; pass the factory's arguments to {text} with --set")
    if batch_size_given:
        raise ValueError(f"--batch-size sizes a built-in model's batch; the factory {text} returns its own batch")
    factory = load_object(text)
    if not callable(factory):
        raise TypeError(f"{text} must be a function returning (model, example_batch[, loss_fn]); got {_kind(factory)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            made = factory(**overrides)
        except Exception as exc:  # noqa: BLE001 - the user's code: named, with its error, on one line
            sets = f" with {_describe(overrides)}" if overrides else ""
            raise ValueError(f"factory {text}{sets} raised {type(exc).__name__}: {exc}") from exc
    model, batch, loss_fn = _check_factory_result(text, made)
    label = text + (f" ({_describe(overrides)})" if overrides else "")
    return ModelSpec(label, model, batch, loss_fn, overrides)


def load_object(text: str) -> Any:
    """The object `path/to/file.py:NAME` or `package.module:NAME` names."""
    where, _, name = text.rpartition(":")
    if not where or not name:
        raise ValueError(f"{text!r} is not FILE.py:NAME or package.module:NAME")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _import_file(Path(where))
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ValueError(f"cannot import module {where!r} (from {text}): {exc}") from exc
    if not hasattr(module, name):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"{where} has no attribute {name!r}; it defines: {', '.join(defined) or 'nothing callable'}")
    return getattr(module, name)


def _builtin(name: str, preset: str | None, overrides: dict[str, Any], batch_size: int, seed: int) -> ModelSpec:
    if name not in _BUILDERS:
        if name.endswith(".py") or Path(name).exists():
            raise ValueError(f"{name!r} names a file but no factory; write {name}:FACTORY")
        raise ValueError(
            f"unknown model {name!r}; give a built-in model ({', '.join(sorted(_BUILDERS))}) or {SPEC_HELP}"
        )
    kwargs = model_kwargs(name, preset, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # build_model initialises parameters from the global RNG
        model, loss_fn, make_batch = build_model(name, **kwargs)
    batch = tuple(make_batch(batch_size, torch.Generator().manual_seed(seed)))
    label = name + (f" ({_describe(kwargs)})" if kwargs else "")
    return ModelSpec(label, model, batch, loss_fn, kwargs)


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"model file {str(path)!r} does not exist")
    # A name of its own in sys.modules: dataclasses and pickling look modules up there.
    module_name = f"shardfx_user_{abs(hash(str(path.resolve())))}_{path.stem}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load {str(path)!r} as Python source")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file: named, with its error
        del sys.modules[module_name]
        raise ValueError(f"running {str(path)!r} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _check_factory_result(text: str, made: Any) -> tuple[nn.Module, tuple[torch.Tensor, ...], Any]:
    expected = "(model, example_batch) or (model, example_batch, loss_fn)"
    if not isinstance(made, (tuple, list)) or len(made) not in (2, 3):
        raise TypeError(f"factory {text} must return {expected}; got {_kind(made)}")
    model, batch, loss_fn = (*made, None) if len(made) == 2 else made
    if not isinstance(model, nn.Module):
        raise TypeError(f"factory {text} returned {_kind(model)} as the model; expected a torch.nn.Module ({expected})")
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    if not isinstance(batch, (tuple, list)) or not batch or not all(isinstance(x, torch.Tensor) for x in batch):
        raise TypeError(
            f"factory {text} returned {_kind(batch)} as the example batch; expected a non-empty tuple of tensors"
        )
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"factory {text} returned {_kind(loss_fn)} as the loss_fn; expected a callable or None")
    return model, tuple(batch), loss_fn


def _kind(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}: ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


def _describe(kwargs: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in kwargs.items())
