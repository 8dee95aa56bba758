"""The commands under pipeline parallelism: train --pp-size, passes/viz --pp-stage, estimate --pp."""

from __future__ import annotations

from tests.fixtures import run_cli


def test_train_with_a_pipeline_locally() -> None:
    code, out, err = run_cli(
        ["train", "--runtime", "local", "--world-size", "2", "--pp-size", "2", "--steps", "2", "--no-progress"]
    )
    assert code == 0, err
    assert "pp=2 x dp=1" in out and "pipeline 1f1b, 4 micro-batches" in out and "split_stages" in out


def test_passes_shows_one_stage_and_the_cut() -> None:
    code, out, err = run_cli(
        ["passes", "gpt", "--config", "pp_size=2", "--config", "pp_microbatches=2", "--pp-stage", "0", "--no-progress"]
    )
    assert code == 0, err
    assert "split_stages" in out
    assert "pipeline: 2 stages, cut by the cost model; showing stage 0" in out
    assert "stage 1: from blocks.1" in out and "this stage: 1 sends, 1 receives" in out
    assert "rank 0: F0 F1 B0 B1" in out and "rank 1: F0 B0 F1 B1" in out  # the 1F1B table
    code, _, err = run_cli(["passes", "gpt", "--config", "pp_size=2", "--pp-stage", "2", "--no-progress"])
    assert code != 0 and "--pp-stage 2: a pipeline of 2 stages has stages 0 .. 1" in err


def test_estimate_per_stage() -> None:
    code, out, err = run_cli(["estimate", "--model", "gpt", "--set", "n_layer=4", "--world-size", "1", "--pp", "4"])
    assert code == 0, err
    assert "(P-1)/(M+P-1) = 27.3%" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and "Mi" in line]
    assert [r[1] for r in rows] == ["(input)", "blocks.1", "blocks.2", "blocks.3"]
    assert [int(r[-2]) for r in rows] == [4, 3, 2, 1]  # 1F1B keeps P - s micro-batches alive on stage s


def test_passes_shows_a_stages_forward_and_backward_parts() -> None:
    base = ["passes", "gpt", "--preset", "tiny", "--config", "pp_size=2", "--config", "pp_microbatches=2"]
    base += ["--pp-stage", "0", "--show", "data_parallel", "--no-progress"]
    code, forward, err = run_cli([*base, "--part", "forward"])
    assert code == 0, err
    code, backward, err = run_cli([*base, "--part", "backward"])
    assert code == 0, err
    program = lambda out: out.split("the stage's")[1]  # noqa: E731 - the printed part, after the tables
    assert "saved" in program(forward) and "shardfx.send" in program(forward)
    assert "shardfx.recv" not in program(forward)  # stage 0's forward receives nothing
    assert "shardfx.recv" in program(backward) and "shardfx.send" not in program(backward)
    code, _, err = run_cli(["passes", "gpt", "--preset", "tiny", "--show", "data_parallel", "--part", "forward"])
    assert code != 0 and "--part shows a pipeline stage's forward or backward" in err
