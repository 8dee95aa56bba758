"""`shardfx bisect`: clean pipelines match eager at every stage; a broken pass is named with the rank and parameter."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shardfx.config import Config
from shardfx.passes.manager import Pass
from shardfx.tools.bisect import bisect
from shardfx.tools.cli import main
from shardfx.tools.model_spec import load_model_spec
from tests.fixtures import UNPLANNED
from tests.tools.broken_pass import drop_one_grad_reduction

BROKEN = Path(__file__).with_name("broken_pass.py")


@pytest.mark.parametrize(
    "config",
    [
        Config(zero_stage=0),
        Config(zero_stage=1, grad_clip=0.05),
        Config(zero_stage=2),
        Config(zero_stage=3, reshard_after_forward=False),
    ],
    ids=["dp", "zero1-clip", "zero2", "zero3-keep"],
)
def test_every_stage_of_a_correct_pipeline_matches_eager(config):
    spec = load_model_spec("mlp", overrides={"batchnorm": True}, batch_size=8)
    result = bisect(spec, config, 2)
    assert result.first_bad is None, [(c.stage.name, c.mismatches, c.error) for c in result.checks]
    assert [c.stage.name for c in result.checks][0] == "capture" and len(result.checks) >= 3
    assert all(c.grad_diff < 1e-5 and c.loss_diff < 1e-5 for c in result.checks)


def test_names_the_pass_that_drops_a_gradient_reduction_with_rank_and_parameter():
    spec = load_model_spec("mlp", batch_size=8)
    broken = Pass("drop_one_grad_reduction", drop_one_grad_reduction, "test: forgets one all-reduce")
    # one all-reduce per parameter (not a bucket of them), so one gradient is spoiled
    result = bisect(spec, Config(zero_stage=0, **UNPLANNED), 2, extra_passes=[broken])
    bad = result.first_bad
    assert bad is not None and bad.stage.name == "drop_one_grad_reduction"
    assert all(c.ok for c in result.checks[:-1])  # capture, sync_batch_norm, data_parallel, grad_norm match eager
    spoiled = bad.stage.record.stats["spoiled"]
    assert {m.param for m in bad.mismatches} == {spoiled}  # only that gradient, on its own ranks
    assert {m.rank for m in bad.mismatches} <= {0, 1} and all(m.max_abs > 1e-3 for m in bad.mismatches)


def test_command_exits_1_naming_pass_rank_and_parameter(capsys):
    argv = ["bisect", "mlp", "--no-progress", "--append-pass", f"{BROKEN}:drop_one_grad_reduction"]
    # one synchronous all-reduce per parameter (no bucket, no overlap), so one gradient is spoiled
    argv += ["--config", "bucket_mb=0", "--config", "overlap=False"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    # stages: capture, sync_batch_norm, data_parallel, grad_norm, the broken pass
    assert "first divergence: after pass 'drop_one_grad_reduction' (stage 4)" in out
    assert re.search(r"gradient of layers\.\d\.(weight|bias) on rank [01]: max \|diff\| \d", out), out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_sharded_gradients_are_checked_per_rank_shard(capsys):
    argv = ["bisect", "gpt", "--preset", "tiny", "--zero", "3", "--no-progress"]
    argv += ["--append-pass", "tests.tools.broken_pass:sum_one_grad_reduction"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    rows = {line.split()[1]: line for line in out.splitlines() if re.match(r"^ \d  ", line)}
    assert all(" ok " in rows[name] for name in ("capture", "sync_batch_norm", "shard_parameters")), out
    assert " DIVERGED " in rows["sum_one_grad_reduction"]
    # Summing instead of averaging over 2 ranks doubles that gradient on every rank's shard.
    assert re.search(r"gradient of \S+ on rank [01]: max \|diff\| .* \(relative 1\)", out), out


def test_user_factory_without_loss_fn_and_bf16(user_factory_file, capsys):
    assert main(["bisect", f"{user_factory_file}:make_with_loss", "--zero", "2", "--no-progress"]) == 0
    assert "no divergence: every stage matches eager within rtol 1e-05, atol 1e-05" in capsys.readouterr().out
    # bf16: prefixes before apply_mixed_precision run on a bf16 copy of the model, with bf16 tolerances.
    assert main(["bisect", "tests.tools.factories:make", "--zero", "3", "--bf16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert " apply_mixed_precision " in out and "within rtol 0.05, atol 0.05" in out


def test_accumulating_configs_are_refused_with_the_way_to_see_them(capsys):
    assert main(["bisect", "mlp", "--config", "grad_accum_steps=2", "--no-progress"]) == 2
    assert "see them with shardfx passes --variant" in capsys.readouterr().err
