"""Options that several subcommands share: argument types and the model choice.

A model is chosen on the command line as `--model NAME [--preset P] [--set key=value ...]`.
Presets are named sets of builder arguments; `model_kwargs` merges them with the
`--set` overrides into the keyword arguments of `shardfx.models.build_model`.
"""

from __future__ import annotations

import argparse
import ast
import os
import tempfile
from collections.abc import Callable
from typing import Any

from shardfx.models.registry import GPT_PRESETS

# Named sizes per model. Each row holds build_model keyword arguments.
# "small" is the default of `shardfx train`: it learns visibly within a minute on
# two CPU cores (vocab 256 keeps the head cheap; seq 64 gives the Markov chain's
# one-token context plenty of positions per sequence).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "gpt": {
        "small": {"preset": "base", "vocab_size": 256, "n_layer": 2, "d_model": 64, "n_head": 4, "seq_len": 64},
        **{name: {"preset": name} for name in GPT_PRESETS},
    },
}
DEFAULT_PRESET: dict[str, str] = {"gpt": "small"}


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {value}")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def positive_int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 1, e.g. 2,4 (each one once, in the order given)."""
    values = [positive_int(part.strip()) for part in text.split(",")]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"each number once; got {text!r}")
    return values


def positive_float(text: str) -> float:
    """argparse type: a number > 0 (accepts 7.5e9)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number; got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number; got {text!r}")
    return value


def key_value(text: str) -> tuple[str, Any]:
    """argparse type: `key=value`; the value is a Python literal when it parses as one, else a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value (e.g. n_layer=12); got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def add_model_arguments(parser: argparse.ArgumentParser, *, model_default: str | None = "gpt") -> None:
    """--model, --preset and --set, as `shardfx train` and `shardfx estimate` read them."""
    parser.add_argument(
        "--model",
        default=model_default,
        help="built-in model name (see shardfx.models.build_model), or file.py:factory / package.module:factory"
        + (f"; default {model_default}" if model_default else ""),
    )
    add_size_arguments(parser)


def add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset and --set: the size of a model named elsewhere (by --model or a MODEL argument)."""
    presets = ", ".join(f"{m}: {'/'.join(p)}" for m, p in PRESETS.items())
    defaults = ", ".join(f"{m}: {p}" for m, p in DEFAULT_PRESET.items())
    parser.add_argument("--preset", help=f"named model size ({presets}); default ({defaults})")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        type=key_value,
        action="append",
        default=[],
        help="override one model argument, e.g. --set n_layer=12 (repeatable)",
    )


def model_kwargs(model: str, preset: str | None, overrides: list[tuple[str, Any]] | dict[str, Any]) -> dict[str, Any]:
    """build_model keyword arguments for a model name, a preset (None: the default) and overrides."""
    presets = PRESETS.get(model, {})
    if preset is None:
        preset = DEFAULT_PRESET.get(model)
    if preset is None:
        base: dict[str, Any] = {}
    elif not presets:
        raise ValueError(f"--preset is not defined for model {model!r}; use --set key=value to size it")
    elif preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for model {model!r}; allowed: {sorted(presets)}")
    else:
        base = presets[preset]
    return {**base, **dict(overrides)}


def unwritable(path: str, is_dir: bool) -> str | None:
    """Why `path` cannot be written (None: it can), found by writing: permission bits say nothing to
    root or on /proc. A missing directory is made, as the run would make it."""
    if is_dir:
        if os.path.exists(path) and not os.path.isdir(path):
            return "exists and is not a directory"
        try:
            os.makedirs(path, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=path, prefix=".shardfx-write-test-")
            os.close(fd)
            os.remove(probe)
        except OSError as exc:
            return f"cannot write there ({exc.strerror})"
        return None
    if os.path.isdir(path):
        return "is a directory"
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        return f"cannot write there ({exc.strerror})"
    if not existed:
        os.remove(path)
    return None
