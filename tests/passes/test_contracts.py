"""Pass contracts are data the runner checks before running anything."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import shardfx
from shardfx.driver import build_mesh, compile_step, plan
from shardfx.models import MLP
from shardfx.passes import facts
from shardfx.passes.manager import Pass, PassContext, PassResult, check_pipeline, run_passes
from shardfx.passes.pipeline import BUCKET_COLLECTIVES, DATA_PARALLEL, GRAD_NORM, PASS_NAMES, PASSES
from tests.fixtures import gpt_batch, tiny_gpt


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 4, generator=g), torch.randn(4, 3, generator=g)


def compile_mlp(**config: object) -> shardfx.Engine:
    torch.manual_seed(0)
    return shardfx.compile_distributed(
        MLP(4, (5,), 3), 2, example_inputs=batch(), loss_fn=F.mse_loss, config=shardfx.Config(**config)
    )


def test_a_misspelled_disabled_pass_is_a_value_error_naming_the_passes() -> None:
    with pytest.raises(ValueError) as info:
        compile_mlp(disable_passes=("data_paralel",))
    text = str(info.value)
    assert "'data_paralel', which is not a pass" in text
    assert all(name in text for name in PASS_NAMES)


def test_disabling_a_required_pass_is_refused_unless_forced() -> None:
    with pytest.raises(ValueError, match=r"'data_parallel', which the program needs to be correct.*force_disable"):
        compile_mlp(disable_passes=("data_parallel",))
    engine = compile_mlp(disable_passes=("data_parallel",), force_disable=True)
    assert [r.name for r in engine.pass_records if r.skipped] == ["data_parallel"]


def test_disabling_the_pass_that_provides_a_need_names_both() -> None:
    maker = Pass("maker", lambda p, c: PassResult(p), "makes a thing", provides=("a thing",))
    user = Pass("user", lambda p, c: PassResult(p), "uses it", needs=("a thing",))
    with pytest.raises(ValueError) as info:
        check_pipeline([maker, user], disabled=("maker",))
    assert str(info.value) == "pass 'user' needs a thing, which 'maker' provides, and 'maker' is disabled"
    check_pipeline([maker, user], disabled=("maker",), force_disable=True)  # asked for: runs without it


def test_disabling_fuse_leaves_lower_to_triton_nothing_to_do() -> None:
    config = shardfx.Config(fuse=True, disable_passes=("fuse",))
    names = [p.name for p in plan(config, build_mesh(config, 2))["step"]]
    assert names[-2:] == ["fuse", "lower_to_triton"]


def test_an_order_that_breaks_a_need_fails_before_running_naming_both() -> None:
    ran: list[str] = []

    def record(program, ctx):  # type: ignore[no-untyped-def]
        ran.append("ran")
        return PassResult(program)

    first = Pass("first", record, "runs first, would record that it ran")
    passes = [first, BUCKET_COLLECTIVES.bind(bucket_bytes=2**20), DATA_PARALLEL.bind(axis="dp")]
    with pytest.raises(ValueError, match=r"'bucket_collectives' needs .*'data_parallel' provides.*runs after it"):
        run_passes(None, passes, PassContext(shardfx.Config()))  # type: ignore[arg-type]
    assert ran == []  # nothing ran: the check comes first


def test_an_after_constraint_names_both_passes() -> None:
    passes = [GRAD_NORM, DATA_PARALLEL.bind(axis="dp")]  # data_parallel provides what grad_norm needs, too late
    with pytest.raises(ValueError, match="'grad_norm' needs .*'data_parallel' provides"):
        check_pipeline(passes)
    late = Pass("late", lambda p, c: PassResult(p), "why", after=("data_parallel",))
    with pytest.raises(ValueError, match=r"pass 'late' must run after 'data_parallel', but the pipeline puts"):
        check_pipeline([late, DATA_PARALLEL])


def test_every_pipeline_pass_declares_its_contract() -> None:
    providers = {f for p in PASSES for f in p.provides} | facts.CAPTURED
    for p in PASSES:
        assert p.why and p.provides, p.name
        assert set(p.needs) <= providers, (p.name, set(p.needs) - providers)
        assert set(p.after) <= set(PASS_NAMES), (p.name, set(p.after) - set(PASS_NAMES))
    required = {p.name for p in PASSES if p.required}
    dp_passes = {"data_parallel", "shard_optimizer_state", "shard_gradients", "shard_parameters"}
    assert required == dp_passes | {"clip_gradients", "grad_norm", "sum_gradients", "split_stages", "scale_loss"}


@pytest.mark.parametrize(
    "config",
    [
        shardfx.Config(zero_stage=3, tp_size=2, bucket_mb=1, overlap=True, recompute="full"),
        shardfx.Config(zero_stage=2, grad_accum_steps=3, mixed_precision="bf16", grad_clip=1.0),
        shardfx.Config(zero_stage=1, tune_communication=True, fuse=True),
        shardfx.Config(zero_stage=3, grad_accum_steps=2, grad_accum_sync="micro_batch", mixed_precision="fp16"),
    ],
    ids=["zero3-tp-overlap-recompute", "zero2-accum-bf16-clip", "zero1-tune-fuse", "zero3-accum-fp16"],
)
def test_the_pipelines_config_builds_satisfy_their_contracts(config: shardfx.Config) -> None:
    plans = plan(config, build_mesh(config, 4))
    assert plans and all(plans.values())


def test_the_observer_sees_capture_and_every_pass_of_every_program() -> None:
    seen: list[tuple[str, int, str]] = []
    config = shardfx.Config(zero_stage=1, grad_accum_steps=3)
    compiled = compile_step(
        tiny_gpt(),
        gpt_batch(4),
        shardfx.models.gpt_loss,
        config,
        build_mesh(config, 2),
        observer=lambda variant, i, p, program, record: seen.append((variant, i, p.name if p else "capture")),
    )
    assert list(compiled.programs) == ["first", "middle", "last"]
    assert compiled.schedule.micro_batches == ("first", "middle", "last")
    assert compiled.schedule.whole_step == frozenset({"last"})
    for variant, passes in compiled.passes.items():
        assert [(i, name) for v, i, name in seen if v == variant] == list(
            enumerate(["capture", *(p.name for p in passes)])
        )
