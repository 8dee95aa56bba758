"""The MODEL argument: built-in models, factories in files and modules, and clear errors for bad specs."""

from __future__ import annotations

import re
import textwrap

import pytest
import torch

from shardfx.tools.cli import main
from shardfx.tools.model_spec import load_model_spec, load_object
from tests.tools.factories import TwoLayer

FACTORY_FILE = """
import torch
import torch.nn.functional as F
from torch import nn

NOT_CALLABLE = 3


def make(width=5):
    return nn.Linear(4, width), (torch.randn(6, 4), torch.randn(6, width)), F.mse_loss


def make_without_loss():
    return nn.Linear(4, 1), torch.randn(6, 4)


def returns_a_module():
    return nn.Linear(4, 1)


def returns_no_module():
    return "model", (torch.randn(6, 4),)


def returns_no_tensors():
    return nn.Linear(4, 1), ([1, 2, 3],)


def returns_bad_loss():
    return nn.Linear(4, 1), (torch.randn(6, 4),), "mse"


def raises():
    raise RuntimeError("no data here")
"""


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "user_models.py"
    path.write_text(textwrap.dedent(FACTORY_FILE))
    return path


def test_builtin_model_with_size_and_batch():
    spec = load_model_spec("gpt", "tiny", {"n_layer": 1}, batch_size=6, seed=3)
    assert spec.model.config.n_layer == 1 and spec.loss_fn is not None
    assert [tuple(x.shape) for x in spec.batch] == [(6, 16), (6, 16)]
    assert spec.label == "gpt (preset=tiny n_layer=1)"
    again = load_model_spec("gpt", "tiny", {"n_layer": 1}, batch_size=6, seed=3)
    assert torch.equal(spec.batch[0], again.batch[0])  # the seed fixes parameters and batch
    assert all(torch.equal(a, b) for a, b in zip(spec.model.parameters(), again.model.parameters()))


def test_factory_in_a_file_gets_the_set_values(factory_file):
    spec = load_model_spec(f"{factory_file}:make", overrides={"width": 7})
    assert spec.model.out_features == 7 and spec.loss_fn is torch.nn.functional.mse_loss
    assert [tuple(x.shape) for x in spec.batch] == [(6, 4), (6, 7)]
    bare = load_model_spec(f"{factory_file}:make_without_loss")
    assert bare.loss_fn is None and len(bare.batch) == 1  # a lone tensor is a batch of one element


def test_factory_in_a_module():
    spec = load_model_spec("tests.tools.factories:make", overrides={"hidden": 4})
    assert isinstance(spec.model, TwoLayer) and spec.model.encoder.out_features == 4


@pytest.mark.parametrize(
    "name, error, message",
    [
        ("{file}:nothing", ValueError, r"has no attribute 'nothing'; it defines: .*make"),
        ("{file}:NOT_CALLABLE", TypeError, r"must be a function returning \(model, example_batch"),
        ("{file}:returns_a_module", TypeError, r"must return \(model, example_batch\).*got a Linear"),
        ("{file}:returns_no_module", TypeError, r"returned a str as the model; expected a torch.nn.Module"),
        ("{file}:returns_no_tensors", TypeError, r"as the example batch; expected a non-empty tuple of tensors"),
        ("{file}:returns_bad_loss", TypeError, r"returned a str as the loss_fn"),
        ("{file}:raises", ValueError, r"raises raised RuntimeError: no data here"),
        ("{missing}:make", ValueError, r"model file '.*missing.py' does not exist"),
        ("no_such_package.models:make", ValueError, r"cannot import module 'no_such_package.models'"),
        ("gtp", ValueError, r"unknown model 'gtp'; give a built-in model \(gpt, mlp\)"),
        ("{file}", ValueError, r"names a file but no factory; write .*:FACTORY"),
    ],
)
def test_bad_specs_say_what_is_wrong(name, error, message, factory_file, tmp_path):
    text = name.format(file=factory_file, missing=tmp_path / "missing.py")
    with pytest.raises(error, match=message):
        load_model_spec(text)


def test_size_flags_do_not_apply_to_factories(factory_file):
    with pytest.raises(ValueError, match="--preset sizes a built-in model"):
        load_model_spec(f"{factory_file}:make", preset="tiny")
    with pytest.raises(ValueError, match="--batch-size sizes a built-in model's batch"):
        load_model_spec(f"{factory_file}:make", batch_size=4, batch_size_given=True)


def test_a_file_that_fails_to_run_is_named(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import torch\ndef make(:\n")
    with pytest.raises(ValueError, match=r"running '.*broken.py' failed: SyntaxError"):
        load_object(f"{path}:make")


@pytest.mark.parametrize("command", ["passes", "viz", "bisect"])
def test_bad_spec_on_the_command_line_is_one_line_and_exit_2(command, tmp_path, capsys):
    output = ["-o", str(tmp_path / "x.html")] if command == "viz" else []
    assert main([command, f"{tmp_path / 'missing.py'}:make", *output]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(rf"shardfx {command}: error: model file '.*missing.py' does not exist", err), err
