"""`shardfx passes`: the per-pass table against the graph and the analyses, dumps, --show, --diff and options."""

from __future__ import annotations

import json
import re

import pytest

from shardfx.config import Config
from shardfx.graphs.analysis import collective_summary, memory_timeline
from shardfx.models import build_model
from shardfx.tools.cli import main
from shardfx.tools.model_spec import load_model_spec
from shardfx.tools.passes_cmd import format_table, stage_row
from shardfx.tools.stages import compile_stages
from tests.fixtures import run_cli

# one collective per parameter, synchronous (the cost model plans bucketing and overlap by default)
UNPLANNED = ["--config", "bucket_mb=0", "--config", "overlap=False"]
GPT_ZERO3 = ["passes", "gpt", "--preset", "tiny", "--set", "bias=False", *UNPLANNED, "--zero", "3", "--no-progress"]


@pytest.fixture(scope="module")
def gpt_zero3(tmp_path_factory):
    """One run of the command on the bias-free tiny GPT, ZeRO-3, with every output option."""
    folder = tmp_path_factory.mktemp("passes")
    argv = [*GPT_ZERO3, "--dump", str(folder / "dump"), "--json", str(folder / "rows.json")]
    argv += ["--show", "shard_parameters", "--diff", "capture", "shard_parameters"]
    code, out, err = run_cli(argv)
    assert code == 0, err
    return out, json.loads((folder / "rows.json").read_text()), folder / "dump"


def table_row(out: str, name: str) -> dict[str, str]:
    """The cells of one row by column name ("12.5 KiB" and "3.1 ms" are one cell)."""
    lines = [re.sub(r"(\d) (B|KiB|MiB|GiB|TiB|ms|s)\b", r"\1+\2", line) for line in out.splitlines()]
    header = next(line for line in lines if line.split()[:2] == ["#", "stage"]).split()
    row = next(line for line in lines if line.split()[1:2] == [name]).split()
    return {column: cell.replace("+", " ") for column, cell in zip(header, row)}


def test_zero3_collective_counts_equal_the_graph(gpt_zero3):
    out, rows, dump = gpt_zero3
    row = table_row(out, "shard_parameters")
    program = (dump / "02_shard_parameters.txt").read_text()
    in_graph = {
        kind: len(re.findall(rf"^%\S+ = shardfx\.{kind}\(", program, re.M))
        for kind in ("all_gather", "reduce_scatter", "all_reduce")
    }
    # Every parameter gathered before its forward use and again for its backward, except wpe
    # (its embedding backward needs no weight); one reduce-scatter per parameter; one loss all-reduce.
    assert in_graph == {"all_gather": 29, "reduce_scatter": 15, "all_reduce": 1}
    assert (int(row["AG"]), int(row["RS"]), int(row["AR"])) == (29, 15, 1)
    assert rows[2]["name"] == "shard_parameters" and rows[2]["collectives"] == in_graph
    # grad_norm sums the dp shards' squares in one scalar all-reduce, which also carries the loss
    # (its own all-reduce is folded in): still one
    assert rows[-1]["name"] == "grad_norm" and rows[-1]["collectives"] == {**in_graph, "all_reduce": 1}
    capture = table_row(out, "capture")
    assert (capture["AG"], capture["RS"], capture["AR"]) == ("-", "-", "-")


def test_zero3_bytes_follow_the_zero_formula(gpt_zero3):
    _, rows, _ = gpt_zero3
    model, _, _ = build_model("gpt", preset="tiny", bias=False)
    param_bytes = 4 * sum(p.numel() for p in model.parameters())  # 2 ranks divide every dim 0 evenly: no padding
    wpe_bytes = 4 * model.wpe.weight.numel()
    scalar_bytes = 2 * 4  # all-reduce of one fp32 scalar counts twice its input: the loss, then the grad norm
    assert rows[2]["comm_bytes"] == 3 * param_bytes - wpe_bytes + scalar_bytes
    assert rows[-1]["comm_bytes"] == 3 * param_bytes - wpe_bytes + 2 * scalar_bytes
    assert rows[0]["comm_bytes"] == 0


def test_output_fits_80_columns_and_has_every_part(gpt_zero3):
    out, rows, dump = gpt_zero3
    # the line naming the dump folder is as long as the folder's path, which is not the tool's
    too_wide = [line for line in out.splitlines() if len(line) > 80 and str(dump) not in line]
    assert not too_wide, too_wide[:3]
    assert [r["name"] for r in rows] == ["capture", "sync_batch_norm", "shard_parameters", "grad_norm"]
    assert sorted(p.name for p in dump.iterdir()) == [
        "00_capture.txt",
        "01_sync_batch_norm.txt",
        "02_shard_parameters.txt",
        "03_grad_norm.txt",
    ]
    assert "# after shard_parameters" in out and "%all_gather_default_1 = shardfx.all_gather(" in out
    summary = re.search(r"^# capture -> shard_parameters: (\d+) added, (\d+) removed, (\d+) moved", out, re.M)
    assert summary and summary.group(2) == "0", out
    unwrapped = out.replace("\n      ", " ")  # continuation lines of wrapped nodes
    added = re.findall(r"^\+ %\S+ = shardfx\.(\w+)\(", unwrapped, re.M)
    assert {kind: added.count(kind) for kind in set(added)} == rows[2]["collectives"]
    assert re.search(r"^## added by shard_parameters \(\d+\)$", out, re.M)


def test_table_figures_are_the_analyses():
    spec = load_model_spec("mlp", batch_size=8)
    stages = compile_stages(spec, Config(zero_stage=2), 2)
    for stage in stages:
        row = stage_row(stage)
        summary = collective_summary(stage.program)
        assert row["collectives"] == summary["calls"]
        assert row["comm_bytes"] == sum(summary["volume"].values())
        assert row["peak_bytes"] == memory_timeline(stage.program).peak
        assert row["nodes"] == len(stage.program.graph.nodes)
    table = format_table([stage_row(s) for s in stages])
    assert max(len(line) for line in table.splitlines()) <= 80
    assert re.search(r"^ 2  shard_gradients\s+\d+\s+6\s+6\s+1\s", table, re.M), table  # 6 params, the loss


def test_stop_after_and_disable(capsys):
    assert main(["passes", "mlp", "--stop-after", "sync_batch_norm", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert table_row(out, "sync_batch_norm") and "data_parallel" not in out
    assert main(["passes", "mlp", "--disable", "sync_batch_norm", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert table_row(out, "sync_batch_norm")["time"] == "disabled"
    assert table_row(out, "data_parallel")["AR"] == "7"  # 6 gradients and the loss


def test_user_factory_file(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text(
        "import torch\nfrom torch import nn\n\n\ndef make():\n"
        "    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\n"
        "    return model, (torch.randn(4, 4), torch.randn(4, 2)), nn.functional.mse_loss\n"
    )
    assert main(["passes", f"{path}:make", "--zero", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    row = table_row(out, "shard_parameters")
    # 4 parameters gathered for the forward; for the backward only the second weight (the first
    # layer's input needs no gradient); one reduce-scatter per parameter.
    assert (row["AG"], row["RS"]) == ("5", "4")


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--show", "shard_params"],
            r"--show shard_params: no such stage \(compiled: capture, sync_batch_norm, data_parallel, grad_norm, "
            r"tune_communication\)",
        ),
        (["--stop-after", "bucket"], r"--stop-after bucket: no such pass in this pipeline; allowed: capture, "),
        (["--disable", "capture"], r"--disable capture: no such pass in this pipeline; allowed: sync_batch_norm"),
        (["--diff", "capture"], r"argument --diff: expected 2 arguments"),
        (["--config", "zero_stag=1"], r"unknown Config keys \['zero_stag'\]"),
        (["--batch-size", "3"], r"dim 0 must divide into 2 ranks"),
    ],
)
def test_bad_options_exit_2_with_one_line(flags, message, capsys):
    assert main(["passes", "mlp", "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_width_zero_keeps_lines_whole(capsys):
    assert main(["passes", "mlp", "--no-progress", "--show", "data_parallel", "--width", "0"]) == 0
    out = capsys.readouterr().out
    assert any(len(line) > 80 and line.startswith("%") for line in out.splitlines())


def test_variant_shows_each_program_of_an_accumulating_step(tmp_path):
    """ZeRO-2, 3 micro-batches: first gathers and reduces nothing, middle moves no tensor, last reduce-scatters."""
    argv = [*GPT_ZERO3[:-3], "--zero", "2", "--config", "grad_accum_steps=3", "--no-progress"]
    collectives = {}
    for variant in ("first", "middle", "last"):
        code, out, err = run_cli([*argv, "--variant", variant, "--json", str(tmp_path / f"{variant}.json")])
        assert code == 0, err
        rows = json.loads((tmp_path / f"{variant}.json").read_text())
        collectives[variant] = rows[-1]["collectives"]
        assert "accumulate_gradients" in [r["name"] for r in rows] and rows[-1]["name"] == "reuse_replicas"
    model, _, _ = build_model("gpt", preset="tiny", bias=False)
    params = len(list(model.parameters()))  # the tied embedding once
    # every program all-reduces the loss; in the last that all-reduce also sums the grad norm's shards
    assert collectives["first"] == {"all_gather": params, "all_reduce": 1}
    assert collectives["middle"] == {"all_reduce": 1}
    assert collectives["last"] == {"reduce_scatter": params, "all_reduce": 1}
    code, _, err = run_cli([*argv, "--zero", "3", "--variant", "first"])
    assert code == 2 and "--variant first: this configuration compiles middle, last" in err
