"""`shardfx viz` without a browser: the HTML is self-contained, the SVG comes from graphviz, the memory plot from matplotlib."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest

from shardfx.config import Config
from shardfx.graphs.analysis import collective_summary
from shardfx.tools import viz
from shardfx.tools.cli import main
from shardfx.tools.model_spec import load_model_spec
from shardfx.tools.stages import compile_stages
from shardfx.tools.viz_html import node_records, render_html

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mlp_stages():
    return compile_stages(load_model_spec("mlp", batch_size=8), Config(zero_stage=3), 2, stop_after="shard_parameters")


def embedded_data(page: str) -> dict:
    raw = re.search(r'<script id="viz-data" type="application/json">(.*?)</script>', page, re.S).group(1)
    return json.loads(raw)


def test_html_is_one_self_contained_file(mlp_stages):
    page = render_html("mlp </script> test", [mlp_stages[0], mlp_stages[-1]])
    # Nothing is fetched: no external scripts, styles, fonts or images.
    assert not re.search(r"https?://|<link|\bsrc=|@import|url\(", page)
    assert page.count("<script") == 2  # the data and the viewer, both inline
    data = embedded_data(page)  # a '</script>' in the title cannot end the data early
    assert data["title"] == "mlp </script> test"
    assert [s["name"] for s in data["stages"]] == ["capture", "shard_parameters"]
    final = data["stages"][1]
    assert len(final["nodes"]) == len(mlp_stages[-1].program.graph.nodes)
    assert final["stats"]["collectives"] == collective_summary(mlp_stages[-1].program)["calls"]


def test_node_records_carry_what_the_viewer_shows(mlp_stages):
    records = {r["n"]: r for r in node_records(mlp_stages[-1])}
    weight = records["p_layers_0_weight"]
    assert (weight["k"], weight["m"], weight["dt"], weight["sh"], weight["pl"]) == (
        "input",
        "layers.0",  # a parameter sits in the module that owns it
        "f32",
        [16, 16],  # this rank's shard of the (32, 16) weight
        "dp:S(0)",
    )
    gathers = [r for r in records.values() if r["op"] == "shardfx.all_gather"]
    assert gathers and all(r["k"] == "collective" and r["o"] == "shard_parameters" for r in gathers)
    assert {r["ph"] for r in gathers} == {"fwd", "bwd"}
    assert all(r["src"].startswith('File "') for r in records.values() if r["op"].startswith("aten.addmm"))
    assert records["output"]["k"] == "output" and records["output"]["a"]


def test_svg_through_graphviz(tmp_path, capsys):
    if shutil.which("dot") is None:
        pytest.skip("graphviz's dot is not installed (apt-get install graphviz)")
    out = tmp_path / "mlp.svg"
    assert main(["viz", "mlp", "--zero", "2", "--after", "shard_gradients", "-o", str(out), "--no-progress"]) == 0
    svg = out.read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "cluster_layers.0" in svg and "all_gather" in svg
    collapsed = tmp_path / "collapsed.svg"
    assert main(["viz", "mlp", "--depth", "1", "-o", str(collapsed), "--no-progress"]) == 0
    assert "nodes" in collapsed.read_text() and len(collapsed.read_text()) < len(svg)


def test_clear_error_without_graphviz(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(viz.shutil, "which", lambda name: None)
    assert main(["viz", "mlp", "-o", str(tmp_path / "x.svg")]) == 2
    err = capsys.readouterr().err
    assert "SVG output needs graphviz's 'dot'" in err and "apt-get install graphviz" in err


def test_memory_plot_and_html_of_a_user_factory(user_factory_file, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")
    png = tmp_path / "memory.png"
    argv = ["viz", f"{user_factory_file}:make", "--zero", "3", "--compare", "capture", "--no-progress"]
    assert main([*argv, "--memory-plot", str(png), "-o", str(tmp_path / "f.html")]) == 0
    assert png.read_bytes().startswith(PNG) and png.stat().st_size > 10_000
    stages = [s["name"] for s in embedded_data((tmp_path / "f.html").read_text())["stages"]]
    assert stages == ["capture", "tune_communication"]  # --after defaults to the last pass
    assert "wrote" in capsys.readouterr().out


def test_clear_error_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["viz", "mlp", "--memory-plot", str(tmp_path / "m.png")]) == 2
    assert "--memory-plot needs matplotlib, which is not installed: pip install matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], r"nothing to write: give -o FILE.html\|FILE.svg, --memory-plot FILE.png and/or --trace FILE.json"),
        (["-o", "x.png"], r"-o x.png: the file name must end in .html or .svg"),
        (["-o", "x.svg", "--compare", "capture"], r"--compare draws two stages side by side in HTML"),
        (["-o", "{tmp}/x.html", "--after", "zero"], r"--after zero: no such stage"),
    ],
)
def test_bad_options_exit_2(flags, message, tmp_path, capsys, monkeypatch):
    # As on a machine without graphviz (CI has it): a usage error is named before a missing tool.
    which = shutil.which
    monkeypatch.setattr(viz.shutil, "which", lambda name, *a, **k: None if name == "dot" else which(name, *a, **k))
    assert main(["viz", "mlp", "--no-progress", *[f.format(tmp=tmp_path) for f in flags]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_trace_of_the_simulated_step_beside_the_page(tmp_path, capsys):
    page, events = tmp_path / "z3.html", tmp_path / "traces" / "z3.json"
    events.parent.mkdir()
    argv = ["viz", "gpt", "--preset", "tiny", "--zero", "3", "-o", str(page), "--trace", str(events), "--no-progress"]
    assert main([*argv, "--hardware", "h100"]) == 0
    data = json.loads(events.read_text())
    assert data["otherData"]["hardware"] == "h100" and data["otherData"]["simulated"]
    assert {e["tid"] for e in data["traceEvents"] if e["ph"] == "X"} == {0, 1}  # compute, communication
    link = embedded_data(page.read_text())["trace"]
    assert link["file"] == "traces/z3.json" and link["step_ms"] == data["otherData"]["step_ms"]
    assert "ui.perfetto.dev" in capsys.readouterr().out
    assert main(["viz", "gpt", "--preset", "tiny", "--trace", str(tmp_path / "t.txt"), "--no-progress"]) == 2
    assert "--trace " in (err := capsys.readouterr().err) and "the file name must end in .json" in err
