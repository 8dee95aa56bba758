"""A DeepSpeed config trains as DeepSpeed would: its optimizer, its LR curve at every step, fp16
with dynamic loss scaling (an overflow skips the step and lowers the scale), strict mode."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pytest
import torch

import shardfx
from shardfx import deepspeed
from shardfx.graphs import collectives
from shardfx.models import gpt_loss
from shardfx.runtime import lr_schedules
from tests.fixtures import tiny_gpt

# DeepSpeed's formulas, written out here from its documentation: the lr at DeepSpeed's
# last_batch_iteration i (-1 when the scheduler is built; the k-th scheduler step makes it k - 1).


def warmup(i: int, lo: float, hi: float, steps: int, kind: str) -> float:
    steps = max(2, steps)
    if i < 0:
        return lo
    gamma = (math.log(i + 1) / math.log(steps) if kind == "log" else i / steps) if i < steps else 1.0
    return lo + (hi - lo) * gamma


def warmup_decay(i: int, total: int, lo: float, hi: float, steps: int, kind: str) -> float:
    steps = max(2, steps)
    if i < steps:
        return warmup(i, lo, hi, steps, kind)
    return lo + (hi - lo) * max(0.0, (total - i) / max(1.0, total - steps))


def warmup_cosine(i: int, base: float, total: int, min_ratio: float, steps: int, cos_min: float, kind: str) -> float:
    steps = max(2, steps)
    if i < 0:
        return 0.0
    if i < steps:
        frac = math.log(i + 1) / math.log(steps) if kind == "log" else i / steps
        return base * (min_ratio + frac * (1 - min_ratio))
    phase = (1 + math.cos(math.pi * (i - steps + 1) / (total - steps))) / 2
    return base * max(0.0, cos_min + (1 - cos_min) * phase)


def one_cycle(i: int, lo: float, hi: float, first: int, second: int, decay_rate: float, decay_size: int) -> float:
    total = first + second
    if i < total:
        x = (i + 1) / total - math.floor((i + 1) / total)
        ratio = first / total
        scale = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
        return lo + (hi - lo) * scale
    if decay_rate == 0:
        return lo
    return lo / (1 + decay_rate * (i - total + 1) / decay_size)


def range_test(i: int, lo: float, size: int, rate: float, staircase: bool) -> float:
    interval = (i + 1) / size
    return lo * (1 + rate * (math.floor(interval) if staircase else interval))


SCHEDULES = [
    ("WarmupLR", {"warmup_min_lr": 1e-4, "warmup_max_lr": 1e-2, "warmup_num_steps": 7}, lambda i: warmup(i, 1e-4, 1e-2, 7, "log")),
    (
        "WarmupLR",
        {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 5, "warmup_type": "linear"},
        lambda i: warmup(i, 0.0, 1e-3, 5, "linear"),
    ),
    (
        "WarmupDecayLR",
        {"total_num_steps": 20, "warmup_min_lr": 0.0, "warmup_max_lr": 3e-4, "warmup_num_steps": 6},
        lambda i: warmup_decay(i, 20, 0.0, 3e-4, 6, "log"),
    ),
    (
        "WarmupCosineLR",
        {"total_num_steps": 18, "warmup_min_ratio": 0.1, "warmup_num_steps": 4, "cos_min_ratio": 0.01, "warmup_type": "linear"},
        lambda i: warmup_cosine(i, 0.5, 18, 0.1, 4, 0.01, "linear"),
    ),
    (
        "OneCycle",
        {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-2, "cycle_first_step_size": 5, "cycle_second_step_size": 7,
         "decay_lr_rate": 0.5, "decay_step_size": 3},
        lambda i: one_cycle(i, 1e-3, 1e-2, 5, 7, 0.5, 3),
    ),
    (
        "LRRangeTest",
        {"lr_range_test_min_lr": 1e-4, "lr_range_test_step_size": 4, "lr_range_test_step_rate": 2.0,
         "lr_range_test_staircase": True},
        lambda i: range_test(i, 1e-4, 4, 2.0, True),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("name", "params", "formula"), SCHEDULES, ids=[f"{s[0]}-{i}" for i, s in enumerate(SCHEDULES)])
def test_schedule_follows_deepspeeds_formula_point_by_point(name, params, formula) -> None:
    setup = deepspeed.from_config({"scheduler": {"type": name, "params": params}})
    optimizer = torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=0.5)
    scheduler = setup.scheduler(optimizer)
    for i in range(-1, 30):  # built at -1; each step moves one on
        assert optimizer.param_groups[0]["lr"] == pytest.approx(formula(i), rel=1e-12, abs=1e-15), i
        optimizer.step()
        scheduler.step()


def test_warmup_values_by_hand() -> None:
    """A few values computed by hand, so the curves do not rest on formulas written twice."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    linear = lr_schedules.WarmupLR(
        optimizer, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=4, warmup_type="linear"
    )
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        linear.step()
    assert seen == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0]
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    decay = lr_schedules.WarmupDecayLR(
        optimizer, total_num_steps=6, warmup_max_lr=1.0, warmup_num_steps=2, warmup_type="linear"
    )
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        decay.step()
    assert seen == pytest.approx([0.0, 0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0])


def test_one_cycle_cycles_adam_beta1_inversely() -> None:
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
    cycle = lr_schedules.OneCycle(optimizer, 0.1, 1.0, cycle_first_step_size=2, cycle_min_mom=0.8, cycle_max_mom=0.9)
    betas = []
    for _ in range(5):
        betas.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        cycle.step()
    assert betas == pytest.approx([0.8, 0.85, 0.8, 0.85, 0.9])  # min at build, then opposite to the lr


# The config of DeepSpeed's documentation (config-json page: optimizer, scheduler, fp16 and ZeRO
# sections), at the tests' sizes: AdamW, WarmupDecayLR, fp16 with dynamic loss scaling, ZeRO-2,
# gradient clipping.
DOCS_CONFIG = {
    "train_batch_size": 8,
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "steps_per_print": 2,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7}},
    "scheduler": {
        "type": "WarmupDecayLR",
        "params": {"total_num_steps": 10, "warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 4},
    },
    "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 10, "loss_scale_window": 3, "hysteresis": 2,
             "min_loss_scale": 1},
    "zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 5e8, "contiguous_gradients": True},
}  # fmt: skip


def test_docs_config_maps_every_key() -> None:
    setup = deepspeed.from_config(DOCS_CONFIG, world_size=2, strict=True)  # strict: nothing is dropped
    config = setup.config
    assert (config.zero_stage, config.mixed_precision, config.grad_clip, config.overlap) == (2, "fp16", 1.0, True)
    assert (config.loss_scale, config.initial_loss_scale, config.loss_scale_window) == (None, 1024.0, 3)
    assert (config.loss_scale_hysteresis, config.min_loss_scale, setup.steps_per_print) == (2, 1.0, 2)
    optimizer = setup.optimizer([torch.nn.Parameter(torch.zeros(3))])
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["betas"] == (0.8, 0.999) and optimizer.defaults["weight_decay"] == 3e-7


def _engine(ds: dict, model=None):
    torch.manual_seed(0)
    model = model or tiny_gpt()
    tokens = torch.randint(0, 64, (8, 16))
    engine = deepspeed.initialize(model, ds, example_inputs=(tokens, tokens), loss_fn=gpt_loss, world_size=2)
    return engine, tokens


def test_docs_config_trains_with_deepspeeds_lr_and_loss_scale() -> None:
    engine, tokens = _engine(DOCS_CONFIG)
    lrs, scales, losses = [], [], []
    for _ in range(8):
        lrs.append(engine.get_lr()[0])
        scales.append(engine.stats()["loss_scale"])
        losses.append(float(engine.train_step(tokens, tokens)))
    assert engine.skipped_steps == 0
    # the n-th applied step runs at DeepSpeed's iteration n - 2 (-1 for the first)
    assert lrs == pytest.approx([warmup_decay(n - 2, 10, 0.0, 1e-3, 4, "log") for n in range(1, 9)], rel=1e-12)
    # 3 clean steps double the scale (loss_scale_window=3): after steps 3 and 6
    assert scales == [1024.0, 1024.0, 1024.0, 2048.0, 2048.0, 2048.0, 4096.0, 4096.0]
    assert losses[-1] < losses[0]


def test_injected_overflow_skips_the_step_and_halves_the_scale() -> None:
    ds = copy.deepcopy(DOCS_CONFIG)
    ds["fp16"].update(hysteresis=1, loss_scale_window=1000)
    engine, tokens = _engine(ds)
    for _ in range(2):
        engine.train_step(tokens, tokens)
    before = engine.state_dict()
    lr = engine.get_lr()[0]
    engine.loss_scaler.scale = 2.0**40  # scaled gradients overflow fp16 (max 65504) at once
    engine._set_loss_scale()
    engine.train_step(tokens, tokens)
    assert engine.skipped_steps == 1 and engine.stats()["loss_scale"] == 2.0**39
    after = engine.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing updated
    assert engine.get_lr()[0] == lr  # and the scheduler did not advance, as in DeepSpeed


def test_hysteresis_keeps_the_scale_for_the_first_overflow() -> None:
    ds = copy.deepcopy(DOCS_CONFIG)
    ds["fp16"].update(initial_scale_power=40, hysteresis=2)
    engine, tokens = _engine(ds)
    scales = []
    for _ in range(3):
        engine.train_step(tokens, tokens)
        scales.append(engine.stats()["loss_scale"])
    assert scales == [2.0**40, 2.0**39, 2.0**38] and engine.skipped_steps == 3


def test_fp16_training_tracks_fp32() -> None:
    """fp16 compute with fp32 masters and a loss scale lands near the fp32 run (SGD with momentum)."""
    torch.manual_seed(0)
    model = tiny_gpt()
    tokens = torch.randint(0, 64, (8, 16))

    def run(**options):
        engine = shardfx.compile_distributed(
            copy.deepcopy(model), 2, example_inputs=(tokens, tokens), loss_fn=gpt_loss,
            optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
            config=shardfx.Config(zero_stage=3, **options),
        )  # fmt: skip
        for _ in range(3):
            engine.train_step(tokens, tokens)
        return engine

    fp32, fp16 = run(), run(mixed_precision="fp16", initial_loss_scale=1024.0)
    assert fp16.skipped_steps == 0
    reference, state = fp32.state_dict(), fp16.state_dict()
    for key in reference:  # fp16 rounds each activation to 11 bits: agreement to ~1e-3 of the largest value
        torch.testing.assert_close(state[key], reference[key], rtol=0, atol=2e-3 * float(reference[key].abs().max()))
    # the program scales the seed and unscales the gradients
    text = shardfx.graphs.format.format_program(fp16.program)
    assert "loss_scale = input" in text and "aten.reciprocal(%loss_scale)" in text


@pytest.mark.parametrize(
    ("ds", "message"),
    [
        ({"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}}, r"optimizer type 'Lamb' is not supported: LAMB's trust ratio"),
        ({"optimizer": {"type": "Sophia"}}, r"optimizer type 'Sophia' is neither DeepSpeed's nor torch.optim's"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "momentum": 0.9}}}, r"optimizer AdamW with params .*momentum"),
        ({"scheduler": {"type": "CosineAnnealing"}}, r"scheduler type 'CosineAnnealing' is not supported; choose one of"),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cubic"}}}, r"warmup_type='cubic' is not allowed"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16.enabled and bf16.enabled are both true"),
        ({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}}}, r'total_num_steps is "auto"'),
    ],
)  # fmt: skip
def test_bad_sections_are_named(ds, message) -> None:
    with pytest.raises(ValueError, match=message):
        deepspeed.from_config(ds)


def test_adam_is_adamw_unless_adam_w_mode_is_false() -> None:
    param = [torch.nn.Parameter(torch.zeros(1))]
    assert type(deepspeed.from_config({"optimizer": {"type": "Adam"}}).optimizer(param)) is torch.optim.AdamW
    off = {"optimizer": {"type": "Adam", "params": {"adam_w_mode": False, "torch_adam": True}}}
    assert type(deepspeed.from_config(off).optimizer(param)) is torch.optim.Adam


def test_strict_refuses_what_it_cannot_honour_and_lax_names_the_reason() -> None:
    ds = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}, "my_key": 1}
    with pytest.raises(ValueError, match=r"my_key \(not supported by shardfx\).*offload_optimizer.device \(no CPU"):
        deepspeed.from_config(ds, strict=True)
    with pytest.warns(UserWarning, match=r"ignoring my_key \(not supported by shardfx\)"):
        setup = deepspeed.from_config(ds)
    assert setup.ignored == {
        "my_key": "not supported by shardfx",
        "zero_optimization.offload_optimizer.device": "no CPU/NVMe offload in shardfx",
    }


def test_auto_values_come_from_the_caller() -> None:
    ds = {
        "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto", "warmup_max_lr": "auto"}},
    }
    setup = deepspeed.from_config(ds, auto={"lr": 3e-4, "warmup_max_lr": 3e-4, "total_num_steps": 50})
    assert setup.optimizer([torch.nn.Parameter(torch.zeros(1))]).defaults["lr"] == 3e-4
    assert "total_num_steps=50" in setup.scheduler_text


def test_activation_checkpointing_means_recompute() -> None:
    ds = {"activation_checkpointing": {"partition_activations": False, "number_checkpoints": 4}}
    assert deepspeed.from_config(ds, strict=True).config.recompute == "full"
    with pytest.raises(ValueError, match=r"activation_checkpointing.cpu_checkpointing \(recompute is the compiler's"):
        deepspeed.from_config({"activation_checkpointing": {"cpu_checkpointing": True}}, strict=True)


def test_initialize_refuses_two_optimizers() -> None:
    with pytest.raises(ValueError, match="has an optimizer section and an optimizer was passed too"):
        deepspeed.initialize(
            tiny_gpt(), DOCS_CONFIG, example_inputs=(torch.zeros(8, 16, dtype=torch.long),) * 2, loss_fn=gpt_loss,
            world_size=2, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
        )  # fmt: skip


def test_the_loss_scale_survives_a_checkpoint(tmp_path) -> None:
    ds = copy.deepcopy(DOCS_CONFIG)
    ds["fp16"].update(initial_scale_power=40, hysteresis=1)
    engine, tokens = _engine(ds)
    for _ in range(2):
        engine.train_step(tokens, tokens)  # two overflows: 2**40 -> 2**38
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    resumed, _ = _engine(ds)
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    assert resumed.stats()["loss_scale"] == 2.0**38 == engine.stats()["loss_scale"]
    assert resumed.loss_scaler.state_dict() == engine.loss_scaler.state_dict()
    assert float(resumed.runtime.held_states()[0][1].loss_scale) == 2.0**38  # handed to the program


def test_small_parameters_persist_under_zero3_and_train_as_eager() -> None:
    """stage3_param_persistence_threshold: parameters under it stay whole (no gathers; their
    gradients all-reduced); the step is still exactly eager's (SGD with momentum)."""
    from tests.fixtures import gpt_batch
    from tests.parity_util import assert_parity

    # 32: the layer norms' weights hold exactly 32 elements and stay whole, as in DeepSpeed (numel <= threshold)
    ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 32}}
    config = deepspeed.from_config(ds, strict=True).config.replace(bucket_mb=0.0, overlap=False)
    assert config.param_persistence_threshold == 32
    model = tiny_gpt()
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731
    engine = assert_parity(model, gpt_batch(8), gpt_loss, 2, config, steps=3, optimizer=sgd)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    assert set(engine.program.shard_specs) == {n for n, size in sizes.items() if size > 32}
    assert any(size == 32 for size in sizes.values())
    small = sum(size <= 32 for size in sizes.values())

    def kinds(config: shardfx.Config) -> Counter:
        program = shardfx.compile_distributed(
            tiny_gpt(), 2, example_inputs=gpt_batch(8), loss_fn=gpt_loss, optimizer=sgd, config=config
        ).program
        return Counter(collectives.kind(n) for n in program.graph.nodes if collectives.is_collective(n))

    # each small parameter (read in forward and backward) saves two gathers and a reduce-scatter,
    # and its gradient is all-reduced instead
    with_threshold, without = kinds(config), kinds(config.replace(param_persistence_threshold=0))
    assert without["all_gather"] - with_threshold["all_gather"] == 2 * small
    assert without["reduce_scatter"] - with_threshold["reduce_scatter"] == small
    assert with_threshold["all_reduce"] - without["all_reduce"] == small


def test_the_deepspeed_page_lists_every_mapped_key() -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "deepspeed.md").read_text()
    missing = [key for key in deepspeed.KEYS if f"| `{key}` |" not in page]
    assert missing == []


def test_an_optimizer_not_known_to_be_elementwise_is_refused_on_shards() -> None:
    """Adafactor's factored second moment reads row and column means: on ZeRO shards it would
    train differently from one device. Refused there, named; fine unsharded or when allowed."""
    tokens = torch.zeros(8, 16, dtype=torch.long)

    def compile_with(**options):
        return shardfx.compile_distributed(
            tiny_gpt(), 2, example_inputs=(tokens, tokens), loss_fn=gpt_loss,
            optimizer=lambda ps: torch.optim.Adafactor(ps, lr=1e-2), config=shardfx.Config(**options),
        )  # fmt: skip

    with pytest.raises(
        ValueError, match=r"torch.optim.Adafactor is not one .* under ZeRO stage 1 each rank holds slices"
    ):
        compile_with(zero_stage=1)
    with pytest.raises(ValueError, match=r"tensor parallelism \(tp_size=2\)"):
        compile_with(tp_size=2)
    compile_with(zero_stage=0)  # whole tensors on every rank: its update is eager's
    compile_with(zero_stage=3, allow_untested_optimizer=True)
    ds = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    assert deepspeed.from_config(ds, strict=True).config.allow_untested_optimizer is True


def test_no_optimizer_says_nothing_trains(caplog) -> None:
    tokens = torch.zeros(8, 16, dtype=torch.long)
    engine = shardfx.compile_distributed(tiny_gpt(), 2, example_inputs=(tokens, tokens), loss_fn=gpt_loss)
    with caplog.at_level("WARNING", logger="shardfx"):
        engine.train_step(tokens, tokens)
        engine.train_step(tokens, tokens)
    said = [r.message for r in caplog.records if "there is no optimizer" in r.message]
    assert len(said) == 1 and "nothing trains" in said[0]


def test_eval_step_under_fp16() -> None:
    """eval_step's forward-only program goes through the same passes: scale_loss has no backward
    to scale there; the loss is the trained weights' loss, to fp16's rounding."""
    engine, tokens = _engine(DOCS_CONFIG)
    engine.train_step(tokens, tokens)
    model = tiny_gpt()
    model.load_state_dict(engine.state_dict())
    model.eval()
    with torch.no_grad():
        expected = float(gpt_loss(model(tokens), tokens))
    assert float(engine.eval_step(tokens, tokens)) == pytest.approx(expected, abs=1e-2)
    assert "loss_scale" not in shardfx.graphs.format.format_program(engine.eval_program())


def test_fp16_without_gradients_is_no_overflow() -> None:
    """No trainable parameter: no gradient norm, so nothing overflowed; the scale stays."""
    engine, tokens = _engine(DOCS_CONFIG, model=tiny_gpt().requires_grad_(False))
    for _ in range(3):
        engine.train_step(tokens, tokens)
    assert engine.last_grad_norm is None
    assert engine.skipped_steps == 0 and engine.stats()["loss_scale"] == 1024.0


def test_resuming_follows_the_new_schedule_settings() -> None:
    """A checkpoint keeps the schedule's position, not its settings (DeepSpeed keeps only
    last_batch_iteration): resumed with a longer total_num_steps, the new curve applies."""
    params = {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 2}
    short = deepspeed.from_config({"scheduler": {"type": "WarmupDecayLR", "params": {**params, "total_num_steps": 4}}})
    long = deepspeed.from_config({"scheduler": {"type": "WarmupDecayLR", "params": {**params, "total_num_steps": 8}}})
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    first = short.scheduler(optimizer)
    for _ in range(4):
        optimizer.step()
        first.step()
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps: JSON
    assert state == {"last_batch_iteration": 3, "step_count": 5}
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    resumed = long.scheduler(optimizer)
    resumed.load_state_dict(state)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(warmup_decay(3, 8, 0.0, 1e-3, 2, "log"))
    optimizer.step()
    resumed.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(warmup_decay(4, 8, 0.0, 1e-3, 2, "log"))


def test_adam_defaults_are_deepspeeds() -> None:
    """DeepSpeed's FusedAdam decays no weights unless asked (torch's AdamW decays 0.01)."""
    param = [torch.nn.Parameter(torch.zeros(1))]
    fused = deepspeed.from_config({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "bias_correction": True}}})
    assert fused.optimizer(param).defaults["weight_decay"] == 0.0
    torch_adam = deepspeed.from_config({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}})
    assert torch_adam.optimizer(param).defaults["weight_decay"] == 0.01  # torch.optim.AdamW's, as DeepSpeed builds it
    with pytest.raises(ValueError, match="bias_correction=false: torch's Adam always corrects the bias"):
        deepspeed.from_config({"optimizer": {"type": "Adam", "params": {"bias_correction": False}}})


def test_config_from_deepspeed_leaves_the_optimizer_sections_alone() -> None:
    """A Hugging Face Trainer file ("auto" everywhere in optimizer and scheduler) still gives its Config,
    and empty sections say nothing."""
    ds = {
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto"}},
        "fp16": {},
    }
    config = shardfx.Config.from_deepspeed(ds, unsupported="ignore")
    assert config.zero_stage == 2 and config.mixed_precision is None
    assert config.deepspeed_unsupported == ["optimizer", "scheduler"]
