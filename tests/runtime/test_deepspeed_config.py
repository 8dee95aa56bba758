"""Config validation and Config.from_deepspeed on the examples of DeepSpeed's documentation."""

from __future__ import annotations

import json

import pytest

from shardfx import Config

# deepspeed.ai/docs/config-json: the example at the top of the page.
DOCS_EXAMPLE = {
    "train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "Adam", "params": {"lr": 0.00015}},
    "fp16": {"enabled": True},
    "zero_optimization": True,
}
# deepspeed.ai/tutorials/zero: the ZeRO-2 and ZeRO-3 examples, with the batch keys of the ZeRO tutorial.
ZERO2 = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "train_batch_size": 32,
    "gradient_clipping": 1.0,
    "bf16": {"enabled": True},
    "zero_optimization": {
        "stage": 2,
        "allgather_partitions": True,
        "allgather_bucket_size": 5e8,
        "overlap_comm": False,
        "reduce_scatter": True,
        "reduce_bucket_size": 5e8,
        "contiguous_gradients": True,
    },
}
ZERO3 = {
    "zero_optimization": {
        "stage": 3,
        "contiguous_gradients": True,
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_prefetch_bucket_size": 1e7,
        "stage3_param_persistence_threshold": 1e5,
        "reduce_bucket_size": 1e7,
        "sub_group_size": 1e9,
        "overlap_comm": True,
        "offload_optimizer": {"device": "cpu"},
    }
}


def test_docs_example_maps_and_reports_what_it_drops() -> None:
    with pytest.warns(UserWarning, match=r"ignoring optimizer \(not a Config field: shardfx.deepspeed.from_config"):
        config = Config.from_deepspeed(DOCS_EXAMPLE)
    assert (config.zero_stage, config.train_batch_size, config.grad_accum_steps) == (1, 8, 1)
    assert config.mixed_precision == "fp16" and config.loss_scale is None  # dynamic, DeepSpeed's default
    assert config.deepspeed_unsupported == ["optimizer"]


def test_zero2_file_maps_as_stated(tmp_path) -> None:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(ZERO2))
    config = Config.from_deepspeed(str(path), world_size=4, unsupported="ignore")
    assert config.zero_stage == 2 and config.mixed_precision == "bf16" and config.grad_clip == 1.0
    assert (config.micro_batch_size, config.grad_accum_steps, config.train_batch_size) == (4, 2, 32)
    assert config.bucket_mb == pytest.approx(5e8 * 4 / 2**20) and config.overlap is False
    # allgather_bucket_size equals reduce_bucket_size (one cap here: nothing lost); the other two
    # hold DeepSpeed's defaults for what the compiler does anyway
    assert config.deepspeed_unsupported == []


def test_zero3_prefetch_counts_buckets() -> None:
    with pytest.raises(ValueError, match=r"zero_optimization.offload_optimizer.device \(no CPU/NVMe offload"):
        Config.from_deepspeed(ZERO3, unsupported="error")
    with pytest.raises(ValueError, match=r"zero_optimization.stage3_max_live_parameters"):
        Config.from_deepspeed(ZERO3, strict=True)
    config = Config.from_deepspeed(ZERO3, unsupported="ignore")
    assert (config.zero_stage, config.overlap, config.prefetch) == (3, True, 1)


def test_batch_sizes_must_agree() -> None:
    with pytest.raises(
        ValueError, match=r"train_batch_size=32 but .*micro_batch_size_per_gpu=4 x .*=2 x world size 2 = 16"
    ):
        Config.from_deepspeed(ZERO2, world_size=2, unsupported="ignore")
    with pytest.raises(ValueError, match="train_batch_size=30 is not a multiple of"):
        Config.from_deepspeed({**ZERO2, "train_batch_size": 30}, unsupported="ignore")


@pytest.mark.parametrize(
    ("ds", "message"),
    [
        (
            {"zero_optimization": {"stage": 4}},
            r"zero_optimization.stage=4 is not allowed; expected one of \[0, 1, 2, 3\]",
        ),
        (
            {"gradient_accumulation_steps": "auto"},
            r'gradient_accumulation_steps is "auto" and no value was given for it',
        ),
        (
            {"gradient_accumulation_steps": "2"},
            r"gradient_accumulation_steps='2' is not allowed; expected an integer",
        ),
        ({"bf16": {"enabled": "yes"}}, r"bf16.enabled='yes' is not allowed; expected true or false"),
    ],
)
def test_bad_values_name_the_key(ds, message) -> None:
    with pytest.raises(ValueError, match=message):
        Config.from_deepspeed(ds)


def test_new_fields_are_validated() -> None:
    with pytest.raises(
        ValueError, match=r"Config.on_nonfinite='retry' is not allowed; choose one of \['skip', 'stop', 'ignore'\]"
    ):
        Config(on_nonfinite="retry")
    with pytest.raises(ValueError, match="Config.grad_accum_steps must be an integer >= 1; got 0"):
        Config(grad_accum_steps=0)
    with pytest.raises(ValueError, match="cannot read DeepSpeed config"):
        Config.from_deepspeed("/nonexistent/ds.json")
