"""`shardfx train --trace`: one measured step of every rank, the simulated one beside it, in one Chrome /
Perfetto file; `shardfx viz --measured-trace` links it from the page. Structure only, never timing."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from shardfx.tools.cli import main
from shardfx.tools.train import TrainOptions, train
from shardfx.tools.train_options import trace_at
from tests.tools.browser import CHROMIUM, Browser

READY = "new Promise(done => { const poll = () => window.vizReady ? done(window.vizReady) : setTimeout(poll, 10); poll(); })"
TINY = ["train", "--world-size", "2", "--preset", "tiny", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory):
    """A 2-rank ZeRO-3 run on the local runtime whose last step is traced."""
    folder = tmp_path_factory.mktemp("run")
    trace, summary = folder / "traces" / "step.json", folder / "run.json"
    trace.parent.mkdir()
    argv = [*TINY, "--runtime", "local", "--zero-stage", "3", "--steps", "3", "--trace-step", "3"]
    assert main([*argv, "--trace", str(trace), "--json", str(summary)]) == 0
    return trace, json.loads(summary.read_text())


def test_the_trace_holds_every_rank_measured_and_simulated(traced_run, capsys):
    path, summary = traced_run
    data = json.loads(path.read_text())
    other = data["otherData"]
    assert other["measured"] and other["step"] == 3 and other["loss"] == summary["losses"][2]
    assert other["hardware"] == "cpu" and other["simulated_step_ms"] > 0 and other["step_ms"] > 0
    names = {e["pid"]: e["args"]["name"] for e in data["traceEvents"] if e["name"] == "process_name"}
    assert names == {0: "rank 0 (measured)", 1: "rank 1 (measured)", 2: "rank 0 (simulated)", 3: "rank 1 (simulated)"}
    tracks = {(e["pid"], e["tid"]) for e in data["traceEvents"] if e["ph"] == "X"}
    assert {(r, t) for r in range(4) for t in (0, 1)} <= tracks  # compute and communication, every process
    assert summary["trace"] == {
        "path": str(path),
        **{
            k: other[k] for k in ("step", "step_ms", "exposed_comm_ms", "optimizer_ms", "simulated_step_ms", "hardware")
        },
    }


def test_the_page_links_the_measured_trace(traced_run, tmp_path, capsys):
    path, _ = traced_run
    page = path.parent.parent / "program.html"
    argv = ["viz", "gpt", "--preset", "tiny", "--zero", "3", "-o", str(page), "--no-progress"]
    assert main([*argv, "--measured-trace", str(path)]) == 0
    assert f"linked {path} from it (measured step 3: " in capsys.readouterr().out
    raw = re.search(r'<script id="viz-data" type="application/json">(.*?)</script>', page.read_text(), re.S).group(1)
    link = json.loads(raw)["measured_trace"]
    other = json.loads(path.read_text())["otherData"]
    assert link == {
        "file": "traces/step.json",
        **{k: other[k] for k in ("step", "step_ms", "simulated_step_ms", "hardware")},
    }
    if CHROMIUM is None:
        return  # the page's own script needs chromium to run (apt-get install chromium); its data is checked above
    browser = Browser()
    try:
        view = browser.open()
        view.goto(page.as_uri())
        view.evaluate(READY)
        shown = view.evaluate(
            "(() => { const a = document.getElementById('measured-trace');"
            " return [a.hidden, a.getAttribute('href'), a.textContent]; })()"
        )
    finally:
        browser.close()
    assert shown[:2] == [False, "traces/step.json"]
    assert re.fullmatch(r"measured step 3: [\d.]+ ms, simulated [\d.]+ ms on cpu \(trace\)", shown[2]), shown


def test_viz_refuses_what_is_no_measured_trace(tmp_path, capsys):
    simulated = tmp_path / "sim.json"
    simulated.write_text(json.dumps({"traceEvents": [], "otherData": {"simulated": True}}))
    cases = [
        (["-o", str(tmp_path / "p.svg"), "--measured-trace", str(simulated)], "is linked from the HTML page"),
        (["-o", str(tmp_path / "p.html"), "--measured-trace", str(simulated)], "not a measured step"),
        (["-o", str(tmp_path / "p.html"), "--measured-trace", str(tmp_path / "none.json")], "cannot read it"),
    ]
    for flags, message in cases:
        assert main(["viz", "mlp", "--no-progress", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--trace-step", "2"], r"--trace-step 2 says which step --trace measures; give --trace FILE.json"),
        (["--trace", "{tmp}/t.txt"], r"--trace \S+t.txt: the file name must end in .json"),
        (["--trace", "{tmp}/t.json", "--trace-step", "5"], r"--trace-step 5: this run trains steps 1 to 3"),
        (["--trace", "{tmp}/t.json", "--pp-size", "2"], r"a pipeline \(--pp-size 2\) .*not supported"),
        (["--trace", "{tmp}/t.json", "--trace-hardware", "tpu"], r"unknown hardware profile 'tpu'"),
        (["--trace", "{tmp}/folder.json"], r"--trace \S+folder.json: is a directory"),
    ],
)
def test_bad_trace_options_exit_2_before_training(flags, message, tmp_path, capsys):
    (tmp_path / "folder.json").mkdir()
    argv = [*TINY, "--runtime", "local", "--steps", "3", *[f.format(tmp=tmp_path) for f in flags]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_the_default_step_is_the_second_this_run_trains():
    options = TrainOptions(steps=10, trace_path="t.json")
    assert trace_at(options, 0) == 2 and trace_at(options, 4) == 6  # resumed at step 4
    assert trace_at(dataclasses.replace(options, steps=1), 0) == 1  # a one-step run: its only step
    assert trace_at(dataclasses.replace(options, trace_step=7), 4) == 7
    with pytest.raises(ValueError, match="--trace-step 3: this run trains steps 5 to 10"):
        trace_at(dataclasses.replace(options, trace_step=3), 4)


@pytest.mark.multiproc
def test_worker_processes_gather_every_rank_to_one_file(tmp_path):
    path = tmp_path / "step.json"
    options = TrainOptions(world_size=2, preset="tiny", steps=2, batch_size=8, progress=False, zero_stage=2)
    summary = train(dataclasses.replace(options, trace_path=str(path)))
    data = json.loads(path.read_text())
    assert summary["runtime"] == "process" and summary["trace"]["step"] == data["otherData"]["step"] == 2
    assert "barrier" in data["otherData"]["clock"] and data["otherData"]["loss"] == summary["losses"][1]
    for rank in range(2):  # each rank's own events, gathered to rank 0
        kinds = {(e["tid"], e["cat"]) for e in data["traceEvents"] if e["ph"] == "X" and e["pid"] == rank}
        assert {(0, "compute"), (1, "collective"), (2, "optimizer")} <= kinds
