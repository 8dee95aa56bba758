"""The `shardfx` command: help, the ZeRO memory estimate, input errors, and a tiny training run."""

import argparse
import dataclasses
import json
import math
import re

import pytest

from shardfx.models import build_model, num_params
from shardfx.tools.cli import build_parser, main
from shardfx.tools.estimate import zero_model_state_bytes
from shardfx.tools.train import TrainOptions, train

SUBCOMMANDS = ["train", "estimate", "passes", "plan", "viz", "bisect", "calibrate", "export", "prepare-data"]


def test_help_lists_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert re.search(rf"^\s+{name}\s+\S", out, re.M), f"{name} missing from shardfx --help:\n{out}"


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: shardfx {name}" in out


def test_every_command_and_option_has_help():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(commands.choices) == sorted(SUBCOMMANDS)
    for choice in commands._choices_actions:
        assert choice.help, f"command {choice.dest} has no help"
    for name, sub in [("shardfx", parser), *commands.choices.items()]:
        for action in sub._actions:
            if action.option_strings:
                assert action.help, f"{name} {action.option_strings} has no help"


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().err


def _estimate_gb(out: str) -> dict[int, str]:
    """Stage -> the printed per-rank GB column."""
    rows = re.findall(r"^([0-3])\s.*?(\S+)$", out, re.M)
    return {int(stage): gb for stage, gb in rows}


def test_estimate_reproduces_zero_paper_table(capsys):
    # ZeRO paper, Table 1: 7.5B parameters, Nd=64, K=12.
    assert main(["estimate", "--params", "7.5e9", "--world-size", "64"]) == 0
    assert _estimate_gb(capsys.readouterr().out) == {0: "120", 1: "31.4", 2: "16.6", 3: "1.88"}


def test_zero_model_state_bytes_formulas():
    psi, nd, k = 1e9, 8, 12
    assert zero_model_state_bytes(psi, nd, 0) == (2 + 2 + k) * psi
    assert zero_model_state_bytes(psi, nd, 1) == pytest.approx((2 + 2 + k / nd) * psi)
    assert zero_model_state_bytes(psi, nd, 2) == pytest.approx((2 + (2 + k) / nd) * psi)
    assert zero_model_state_bytes(psi, nd, 3) == pytest.approx((2 + 2 + k) * psi / nd)
    assert zero_model_state_bytes(psi, 1, 3, k=4) == zero_model_state_bytes(psi, 1, 0, k=4) == 8 * psi
    with pytest.raises(ValueError, match="stage"):
        zero_model_state_bytes(psi, nd, 4)
    with pytest.raises(ValueError, match="world_size"):
        zero_model_state_bytes(psi, 0, 1)


def test_estimate_counts_a_registry_model_once_per_tied_parameter(capsys):
    assert main(["estimate", "--model", "gpt", "--preset", "tiny", "--set", "n_layer=3", "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    model, _, _ = build_model("gpt", preset="tiny", n_layer=3)
    params = num_params(model)  # the tied head/embedding counted once
    assert f"{params / 1e3:.3g}K parameters" in out
    assert _estimate_gb(out)[0] == f"{16 * params / 1e9:.3g}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--world-size", "0"], r"--world-size: must be an integer >= 1; got 0"),
        (["estimate", "--params", "1e9", "--world-size", "0"], r"--world-size: must be an integer >= 1; got 0"),
        (["train", "--world-size", "4", "--batch-size", "6"], r"--batch-size 6 does not divide into --world-size 4"),
        (["estimate", "--world-size", "8"], r"give the model size"),
        (["estimate", "--model", "gpt", "--set", "n_layr=2", "--world-size", "8"], r"unknown GPT overrides"),
        (["train", "--preset", "huge"], r"unknown preset 'huge'"),
        (["calibrate", "--world-size", "2,0"], r"--world-size: must be an integer >= 1; got 0"),
        (["calibrate", "--world-size", "2,2"], r"--world-size: each number once; got '2,2'"),
        (["calibrate", "--world-size", "2,x"], r"--world-size: must be an integer >= 1; got 'x'"),
        (["calibrate", "--world-size", "1,2"], r"--world-size: each count must be at least 2 .*; got '1,2'"),
        (["viz", "mlp", "-o", "no_such_dir/x.html"], r"-o no_such_dir/x.html: cannot write there \(No such"),
        (["viz", "mlp", "--trace", "/"], r"--trace /: the file name must end in .json"),
        (["viz", "mlp", "--trace", "no/t.json"], r"--trace no/t.json: cannot write there"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_tiny_training_run_learns(tmp_path, capsys):
    summary = train(TrainOptions(world_size=2, preset="tiny", steps=20, batch_size=8, progress=False, runtime="local"))
    losses = summary["losses"]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert summary["first_loss"] == losses[0]
    assert summary["last_loss"] == pytest.approx(sum(losses[-10:]) / 10)
    assert summary["last_loss"] < summary["first_loss"]
    # The Markov chain's entropy rate is a hard floor; the start is near a uniform guess.
    assert summary["floor"] < summary["last_loss"]
    assert summary["first_loss"] == pytest.approx(math.log(64), abs=0.2)
    assert summary["graph_nodes"] > 0 and summary["params"] == 28_032


def test_train_command_writes_json(tmp_path, capsys):
    path = tmp_path / "run.json"
    argv = ["train", "--world-size", "2", "--preset", "tiny", "--steps", "3", "--batch-size", "4", "--runtime", "local"]
    assert main([*argv, "--no-progress", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for field in ("parameters", "world size 2", "ZeRO stage 0", "graph nodes", "first", "last", "floor", "tok/s"):
        assert field in out
    summary = json.loads(path.read_text())
    assert len(summary["losses"]) == 3 and summary["world_size"] == 2


@pytest.mark.multiproc
def test_train_on_worker_processes_matches_threads(tmp_path):
    """The main job's default runtime (one process per rank) gives the losses of the local runtime."""
    options = TrainOptions(world_size=2, preset="tiny", steps=4, batch_size=8, progress=False, zero_stage=3)
    path = tmp_path / "run.json"
    on_processes = train(dataclasses.replace(options, json_path=str(path)))
    on_threads = train(dataclasses.replace(options, runtime="local"))
    assert on_processes["runtime"] == "process" and json.loads(path.read_text())["runtime"] == "process"
    assert on_processes["losses"] == pytest.approx(on_threads["losses"], rel=1e-5)
