"""A DeepSpeed JSON config, mapped to what it means in shardfx.

    setup = shardfx.deepspeed.from_config("ds_config.json", world_size=4)
    engine = shardfx.compile_distributed(model, 4, example_inputs=batch, loss_fn=loss_fn,
                                         optimizer=setup.optimizer, scheduler=setup.scheduler,
                                         config=setup.config)
    # or, as deepspeed.initialize:
    engine = shardfx.deepspeed.initialize(model, "ds_config.json", example_inputs=batch, loss_fn=loss_fn)

What each key becomes is in KEYS (docs/deepspeed.md shows the same table). The "optimizer"
section is built with torch.optim as DeepSpeed builds it (type "Adam" is AdamW unless
"adam_w_mode": false, as DeepSpeed's FusedAdam), the "scheduler" section with
shardfx.runtime.lr_schedules (DeepSpeed's curves), "fp16" turns on fp16 compute with
(dynamic) loss scaling in the program. A key shardfx cannot honour is reported with its
reason, once: strict=True makes any such key an error.

A value "auto" (as the Hugging Face Trainer writes them) is taken from `auto`, e.g.
auto={"total_num_steps": 1000, "lr": 3e-4}; an "auto" with no value given is an error.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from shardfx.config import Config, _check_int
from shardfx.runtime.lr_schedules import SCHEDULES

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]

# DeepSpeed key (dotted) -> what it becomes here.
KEYS: dict[str, str] = {
    "train_batch_size": "Config.train_batch_size (checked: micro x accumulation x data-parallel size)",
    "train_micro_batch_size_per_gpu": "Config.micro_batch_size",
    "gradient_accumulation_steps": "Config.grad_accum_steps (with pp_size > 1: pp_microbatches)",
    "gradient_clipping": "Config.grad_clip (0: none)",
    "steps_per_print": "DeepSpeedSetup.steps_per_print (shardfx train: --log-every)",
    "optimizer.type": "torch.optim: Adam (AdamW unless adam_w_mode is false), AdamW, SGD, Adagrad, "
    "or any other torch.optim class by name",
    "optimizer.params": "the optimizer's keyword arguments, as given (torch_adam, adam_w_mode read as DeepSpeed does)",
    "scheduler.type": "shardfx.runtime.lr_schedules: WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest",
    "scheduler.params": "the schedule's arguments, as given",
    "fp16.enabled": 'Config.mixed_precision="fp16"',
    "fp16.loss_scale": "Config.loss_scale (0: dynamic)",
    "fp16.initial_scale_power": "Config.initial_loss_scale = 2 ** power",
    "fp16.loss_scale_window": "Config.loss_scale_window",
    "fp16.hysteresis": "Config.loss_scale_hysteresis",
    "fp16.min_loss_scale": "Config.min_loss_scale",
    "bf16.enabled": 'Config.mixed_precision="bf16"',
    "zero_optimization.stage": "Config.zero_stage",
    "zero_allow_untested_optimizer": "Config.allow_untested_optimizer (an optimizer not known to be elementwise "
    "may run on shards)",
    "zero_optimization.reduce_bucket_size": "Config.bucket_mb (elements x 4 bytes)",
    "zero_optimization.allgather_bucket_size": "Config.bucket_mb when reduce_bucket_size is not given "
    "(one bucket cap here)",
    "zero_optimization.stage3_prefetch_bucket_size": "Config.prefetch (in buckets of reduce_bucket_size, at least 1)",
    "zero_optimization.overlap_comm": "Config.overlap",
    "zero_optimization.stage3_param_persistence_threshold": "Config.param_persistence_threshold (parameters "
    "with at most this many elements stay whole under ZeRO-3; DeepSpeed defaults to 1e5, shardfx to 0)",
    "activation_checkpointing": 'Config.recompute="full" (every block recomputed in the backward, as '
    "checkpointing each layer)",
}

# Keys that change nothing when they hold these values (DeepSpeed's defaults for what shardfx does anyway).
_HARMLESS: dict[str, Any] = {
    "fp16.enabled": False,
    "bf16.enabled": False,
    "fp16.auto_cast": False,
    "fp16.consecutive_hysteresis": False,
    "zero_optimization.reduce_scatter": True,
    "zero_optimization.contiguous_gradients": True,
    "zero_optimization.allgather_partitions": True,
    "activation_checkpointing.partition_activations": False,
    "activation_checkpointing.cpu_checkpointing": False,
    "activation_checkpointing.contiguous_memory_optimization": False,
    "activation_checkpointing.synchronize_checkpoint_boundary": False,
    "activation_checkpointing.profile": False,
    "wall_clock_breakdown": False,
}
# Why a key is not honoured, by key or by the section it sits in (the longest prefix wins).
_REASONS: dict[str, str] = {
    "zero_optimization.offload_optimizer": "no CPU/NVMe offload in shardfx",
    "zero_optimization.offload_param": "no CPU/NVMe offload in shardfx",
    "zero_optimization.contiguous_gradients": "gradients are laid out by the compiled program",
    "zero_optimization.allgather_partitions": "gathers are planned by the compiler",
    "zero_optimization.allgather_bucket_size": "shardfx has one bucket cap: reduce_bucket_size's is used",
    "zero_optimization.stage3_max_live_parameters": "gathered parameters live as the program's schedule says",
    "zero_optimization.stage3_max_reuse_distance": "gathered parameters live as the program's schedule says",
    "zero_optimization.sub_group_size": "the optimizer steps each rank's shards at once",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": "checkpoints hold full fp32 tensors "
    "(shardfx export writes them)",
    "activation_checkpointing": "recompute is the compiler's (Config.recompute); this option has no equivalent",
    "fp16.auto_cast": "the whole step computes in fp16",
    "fp16.consecutive_hysteresis": "the hysteresis refills after loss_scale_window clean steps only",
    "optimizer.params.max_grad_norm": "use gradient_clipping",
}
_DEFAULT_REASON = "not supported by shardfx"

# DeepSpeed optimizer names (case-insensitive) with a torch.optim equivalent here.
_OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "adagrad": "Adagrad"}
# DeepSpeed's own optimizers with no elementwise torch equivalent: named, and refused.
_NO_EQUIVALENT = {
    "lamb": "LAMB's trust ratio reads whole-tensor norms: no torch.optim equivalent, and it would be wrong on ZeRO "
    "shards; use AdamW",
    "onebitadam": "1-bit Adam compresses DeepSpeed's own communication; use Adam",
    "zerooneadam": "0/1 Adam compresses DeepSpeed's own communication; use Adam",
    "onebitlamb": "1-bit LAMB compresses DeepSpeed's own communication; use AdamW",
    "lion": "no Lion in torch.optim",
    "muadam": "muP optimizers need the mup package's parameter shapes; use Adam",
    "muadamw": "muP optimizers need the mup package's parameter shapes; use AdamW",
    "musgd": "muP optimizers need the mup package's parameter shapes; use SGD",
}


@dataclass
class DeepSpeedSetup:
    """What a DeepSpeed config maps to: the Config, the optimizer and scheduler factories (None
    where the file has no such section), steps_per_print, and the keys that were not honoured
    with the reason for each."""

    config: Config
    optimizer: OptimizerFactory | None = None
    scheduler: SchedulerFactory | None = None
    steps_per_print: int | None = None
    ignored: dict[str, str] = field(default_factory=dict)
    optimizer_text: str | None = None  # e.g. "AdamW(lr=0.0003, weight_decay=0.01)", for headers
    scheduler_text: str | None = None


def from_config(
    source: str | os.PathLike | dict[str, Any],
    *,
    world_size: int | None = None,
    pp_size: int = 1,
    strict: bool = False,
    auto: dict[str, Any] | None = None,
) -> DeepSpeedSetup:
    """Map a DeepSpeed JSON config (a path or the parsed dict); see the module docstring.

    `world_size` checks the batch sizes; `pp_size` gives the pipeline stages DeepSpeed sets in
    code (PipelineModule(num_stages=P)): then gradient_accumulation_steps is the pipeline's
    micro-batches and the batch sizes count the data-parallel ranks, as in its PipelineEngine.
    strict=True: any key not honoured is a ValueError naming it; otherwise a UserWarning lists
    each with its reason (also kept in `.ignored`).
    """
    ds, where = read_json(source)
    flat = _resolve_auto(_flatten(ds), auto or {}, where)
    if isinstance(flat.get("zero_optimization"), bool):  # the old form: "zero_optimization": true means stage 1
        flat["zero_optimization.stage"] = int(flat.pop("zero_optimization"))
    optimizer, optimizer_text = _optimizer(flat, where)
    scheduler, scheduler_text = _scheduler(flat, where)
    steps_per_print = None
    if "steps_per_print" in flat:
        steps_per_print = _take(flat, "steps_per_print", int, "an integer >= 1")
        if steps_per_print < 1:
            raise ValueError(f"{where}: steps_per_print={steps_per_print!r} must be an integer >= 1")
    values = _config_values(flat, where)
    _check_int("pp_size", pp_size)
    if world_size is not None and world_size % pp_size:
        raise ValueError(f"{where}: world size {world_size} does not divide into pp_size={pp_size} stages")
    _check_batch_sizes(values, None if world_size is None else world_size // pp_size, where)
    if pp_size > 1:
        values["pp_size"] = pp_size
        values["pp_microbatches"] = values.pop("grad_accum_steps", 1)
    ignored = {k: _reason(k) for k in sorted(flat) if not (k in _HARMLESS and flat[k] == _HARMLESS[k])}
    if ignored and strict:
        raise ValueError(f"{where}: keys shardfx does not honour (strict): {_listing(ignored)}")
    if ignored:
        warnings.warn(f"{where}: ignoring {_listing(ignored)}", stacklevel=2)
    return DeepSpeedSetup(
        Config.from_dict(values), optimizer, scheduler, steps_per_print, ignored, optimizer_text, scheduler_text
    )


def initialize(
    model: torch.nn.Module,
    config: str | os.PathLike | dict[str, Any],
    *,
    example_inputs: tuple[torch.Tensor, ...],
    loss_fn: Callable[..., torch.Tensor] | None = None,
    world_size: int | None = None,
    optimizer: OptimizerFactory | None = None,
    lr_scheduler: SchedulerFactory | None = None,
    strict: bool = False,
    auto: dict[str, Any] | None = None,
) -> Any:
    """deepspeed.initialize's counterpart: an Engine from a model and a DeepSpeed config.

    The optimizer and scheduler come from the config's sections unless given as factories here
    (as DeepSpeed's client optimizer and client lr_scheduler); a config with an "optimizer"
    section and an `optimizer` argument is an error, as it is for DeepSpeed.
    """
    from shardfx.api import _launched, compile_distributed

    if world_size is None and not _launched():
        raise ValueError("shardfx.deepspeed.initialize needs world_size outside torchrun (under torchrun: None)")
    size = world_size
    if size is None:
        import torch.distributed as dist

        size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    setup = from_config(config, world_size=size, strict=strict, auto=auto)
    if optimizer is not None and setup.optimizer is not None:
        raise ValueError(
            "the DeepSpeed config has an optimizer section and an optimizer was passed too; keep one of them"
        )
    make_optimizer = optimizer or setup.optimizer
    if make_optimizer is None:
        raise ValueError(
            "no optimizer: the DeepSpeed config has no optimizer section and none was passed "
            "(e.g. optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))"
        )
    return compile_distributed(
        model,
        world_size,
        example_inputs=example_inputs,
        loss_fn=loss_fn,
        optimizer=make_optimizer,
        scheduler=lr_scheduler or setup.scheduler,
        config=setup.config,
    )


# --- reading --------------------------------------------------------------------------------------


def read_json(source: Any) -> tuple[dict[str, Any], str]:
    """(the parsed config, how to name it in errors)."""
    if isinstance(source, dict):
        return source, "DeepSpeed config"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a DeepSpeed config is a path to a JSON file or a dict; got {type(source).__name__}")
    try:
        with open(source) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read DeepSpeed config {os.fspath(source)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"DeepSpeed config {os.fspath(source)!r} must hold a JSON object; got {type(data).__name__}")
    return data, os.fspath(source)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):  # an empty section says nothing
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resolve_auto(flat: dict[str, Any], auto: dict[str, Any], where: str) -> dict[str, Any]:
    """Replace "auto" values by auto[last part of the key] (e.g. "lr", "total_num_steps")."""
    out = {}
    for key, value in flat.items():
        if value == "auto":
            name = key.rsplit(".", 1)[-1]
            if name not in auto:
                raise ValueError(
                    f'{where}: {key} is "auto" and no value was given for it '
                    f"(shardfx train fills lr, warmup_max_lr and total_num_steps; the API takes auto={{{name!r}: ...}})"
                )
            value = auto[name]
        out[key] = value
    return out


def _reason(key: str) -> str:
    for prefix in sorted(_REASONS, key=len, reverse=True):
        if key == prefix or key.startswith(prefix + "."):
            return _REASONS[prefix]
    return _DEFAULT_REASON


def _listing(ignored: dict[str, str]) -> str:
    """'a, b (reason); c (other reason)': each reason once, after the keys it covers."""
    by_reason: dict[str, list[str]] = {}
    for key, reason in ignored.items():
        by_reason.setdefault(reason, []).append(key)
    return "; ".join(f"{', '.join(keys)} ({reason})" for reason, keys in by_reason.items())


def _take(flat: dict[str, Any], key: str, kind: Any, allowed: str) -> Any:
    value = flat.pop(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        raise ValueError(f"DeepSpeed key {key}={value!r} is not allowed; expected {allowed}")
    return value


def _section(flat: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Pop every key under `prefix.` (nested dicts folded back), keyed by the rest of its name."""
    out: dict[str, Any] = {}
    for key in [k for k in flat if k.startswith(prefix + ".")]:
        out[key[len(prefix) + 1 :]] = flat.pop(key)
    return out


# --- optimizer and scheduler ------------------------------------------------------------------------


def _optimizer(flat: dict[str, Any], where: str) -> tuple[OptimizerFactory | None, str | None]:
    if not any(k == "optimizer" or k.startswith("optimizer.") for k in flat):
        return None, None
    if "optimizer.type" not in flat:
        raise ValueError(f'{where}: the optimizer section needs a type (e.g. "AdamW")')
    name = _take(flat, "optimizer.type", str, "an optimizer name")
    flat.pop("optimizer.params", None)  # an empty params dict
    params = _section(flat, "optimizer.params")
    for key in [k for k in flat if k == "optimizer" or k.startswith("optimizer.")]:
        raise ValueError(f"{where}: unknown optimizer key {key}; the section holds type and params")
    if "max_grad_norm" in params:
        raise ValueError(
            f"{where}: optimizer.params.max_grad_norm is not an optimizer parameter; use gradient_clipping"
        )
    lower = name.lower()
    if lower in _NO_EQUIVALENT:
        raise ValueError(f"{where}: optimizer type {name!r} is not supported: {_NO_EQUIVALENT[lower]}")
    kwargs = dict(params)
    if lower in ("adam", "adamw"):
        torch_adam = kwargs.pop("torch_adam", False)  # DeepSpeed: torch's Adam instead of its fused one
        adam_w_mode = kwargs.pop("adam_w_mode", True)
        cls_name = "AdamW" if lower == "adamw" or adam_w_mode else "Adam"
        if not torch_adam:  # DeepSpeed's FusedAdam: no weight decay unless asked (torch's AdamW: 0.01)
            kwargs.setdefault("weight_decay", 0.0)
        if kwargs.pop("bias_correction", True) is not True:
            raise ValueError(f"{where}: optimizer.params.bias_correction=false: torch's Adam always corrects the bias")
    elif lower in _OPTIMIZERS:
        cls_name = _OPTIMIZERS[lower]
    else:
        cls_name = name  # DeepSpeed falls back to torch.optim.<type>
    cls = getattr(torch.optim, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        known = sorted({*(_OPTIMIZERS[k] for k in _OPTIMIZERS), "Adamax", "NAdam", "RAdam", "RMSprop"})
        raise ValueError(f"{where}: optimizer type {name!r} is neither DeepSpeed's nor torch.optim's; e.g. {known}")
    if "betas" in kwargs and isinstance(kwargs["betas"], list):
        kwargs["betas"] = tuple(kwargs["betas"])
    try:  # the arguments are checked now, not when the first rank builds it
        cls([torch.zeros(1, requires_grad=True)], **kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: optimizer {name} with params {params}: {exc}") from None

    def make(parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return cls(parameters, **kwargs)

    text = f"{cls_name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    return make, text


def _scheduler(flat: dict[str, Any], where: str) -> tuple[SchedulerFactory | None, str | None]:
    if not any(k == "scheduler" or k.startswith("scheduler.") for k in flat):
        return None, None
    if "scheduler.type" not in flat:
        raise ValueError(f"{where}: the scheduler section needs a type (one of {sorted(SCHEDULES)})")
    name = _take(flat, "scheduler.type", str, "a scheduler name")
    flat.pop("scheduler.params", None)
    params = _section(flat, "scheduler.params")
    for key in [k for k in flat if k == "scheduler" or k.startswith("scheduler.")]:
        raise ValueError(f"{where}: unknown scheduler key {key}; the section holds type and params")
    if params.get("last_batch_iteration") == -1:  # DeepSpeed's default: start from the beginning
        del params["last_batch_iteration"]
    if "last_batch_iteration" in params:
        raise ValueError(
            f"{where}: scheduler.params.last_batch_iteration={params['last_batch_iteration']!r}: resume from a "
            "shardfx checkpoint instead (it keeps the scheduler's position)"
        )
    cls = SCHEDULES.get(name)
    if cls is None:
        raise ValueError(f"{where}: scheduler type {name!r} is not supported; choose one of {sorted(SCHEDULES)}")
    for key, value in params.items():
        if isinstance(value, (list, tuple)):
            raise ValueError(
                f"{where}: scheduler.params.{key}={value!r}: one value, not one per param group "
                "(the optimizer built from the config has one group)"
            )
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:  # checked now, with DeepSpeed's argument names
        cls(probe, **params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: scheduler {name} with params {params}: {exc}") from None

    def make(optimizer: torch.optim.Optimizer) -> Any:
        return cls(optimizer, **params)

    return make, f"{name}({', '.join(f'{k}={v}' for k, v in params.items())})"


# --- Config keys -------------------------------------------------------------------------------------


def _config_values(flat: dict[str, Any], where: str) -> dict[str, Any]:
    """Config keyword arguments from the keys that map to Config fields (popped from `flat`)."""
    values: dict[str, Any] = {}
    if "zero_optimization.stage" in flat:
        stage = _take(flat, "zero_optimization.stage", int, "one of [0, 1, 2, 3]")
        if stage not in (0, 1, 2, 3):
            raise ValueError(
                f"DeepSpeed key zero_optimization.stage={stage!r} is not allowed; expected one of [0, 1, 2, 3]"
            )
        values["zero_stage"] = stage
    reduce_key, gather_key = "zero_optimization.reduce_bucket_size", "zero_optimization.allgather_bucket_size"
    bucket = None
    key = reduce_key if reduce_key in flat else gather_key if gather_key in flat else None
    if key is not None:
        bucket = _take(flat, key, (int, float), "a number of elements >= 0")
        if bucket < 0:
            raise ValueError(f"DeepSpeed key {key}={bucket!r} must be >= 0")
        values["bucket_mb"] = bucket * 4 / 2**20
    if flat.get(gather_key, object()) == bucket:
        flat.pop(gather_key)  # the same cap as the reduce bucket: nothing lost
    if "zero_optimization.stage3_prefetch_bucket_size" in flat:
        fetch = _take(flat, "zero_optimization.stage3_prefetch_bucket_size", (int, float), "a number of elements >= 0")
        if fetch < 0:
            raise ValueError(f"DeepSpeed key zero_optimization.stage3_prefetch_bucket_size={fetch!r} must be >= 0")
        values["prefetch"] = max(1, round(fetch / bucket)) if bucket else 1
    if "zero_optimization.overlap_comm" in flat:
        values["overlap"] = _take(flat, "zero_optimization.overlap_comm", bool, "true or false")
    key = "zero_optimization.stage3_param_persistence_threshold"
    if key in flat:
        threshold = _take(flat, key, (int, float), "a number of elements >= 0")
        if threshold < 0 or threshold != int(threshold):
            raise ValueError(f"DeepSpeed key {key}={threshold!r} must be a whole number of elements >= 0")
        values["param_persistence_threshold"] = int(threshold)
    bf16 = "bf16.enabled" in flat and _take(flat, "bf16.enabled", bool, "true or false")
    fp16 = "fp16.enabled" in flat and _take(flat, "fp16.enabled", bool, "true or false")
    if bf16 and fp16:
        raise ValueError(f"{where}: fp16.enabled and bf16.enabled are both true; choose one")
    if bf16:
        values["mixed_precision"] = "bf16"
    scaling = {k: flat.pop(k) for k in _LOSS_SCALE_KEYS if k in flat}
    if fp16:
        values.update(_loss_scale(scaling))
    # (the loss-scale settings of a disabled fp16 section change nothing)
    if "zero_allow_untested_optimizer" in flat:
        values["allow_untested_optimizer"] = _take(flat, "zero_allow_untested_optimizer", bool, "true or false")
    if "gradient_clipping" in flat:
        clip = _take(flat, "gradient_clipping", (int, float), "a number >= 0 (0: no clipping)")
        if clip < 0:
            raise ValueError(f"DeepSpeed key gradient_clipping={clip!r} must be >= 0 (0: no clipping)")
        values["grad_clip"] = float(clip) if clip > 0 else None
    for ds_key, key in (
        ("gradient_accumulation_steps", "grad_accum_steps"),
        ("train_micro_batch_size_per_gpu", "micro_batch_size"),
        ("train_batch_size", "train_batch_size"),
    ):
        if ds_key in flat:
            value = _take(flat, ds_key, int, "an integer >= 1")
            if value < 1:
                raise ValueError(f"DeepSpeed key {ds_key}={value!r} is not allowed; expected an integer >= 1")
            values[key] = value
    checkpointing = {
        k: v for k, v in flat.items() if k == "activation_checkpointing" or k.startswith("activation_checkpointing.")
    }
    if checkpointing:
        values["recompute"] = "full"
        for key, value in checkpointing.items():
            # what is harmless or only tunes DeepSpeed's own checkpointing is consumed; the rest is reported
            if (key in _HARMLESS and value == _HARMLESS[key]) or key in (
                "activation_checkpointing",
                "activation_checkpointing.number_checkpoints",
            ):
                flat.pop(key)
    return values


_LOSS_SCALE_KEYS = (
    "fp16.loss_scale",
    "fp16.initial_scale_power",
    "fp16.loss_scale_window",
    "fp16.hysteresis",
    "fp16.min_loss_scale",
)


def _loss_scale(keys: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {"mixed_precision": "fp16"}

    def number(key: str, allowed: str, minimum: float = 0.0) -> float:
        value = keys.pop(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            raise ValueError(f"DeepSpeed key {key}={value!r} is not allowed; expected {allowed}")
        return value

    if "fp16.loss_scale" in keys:
        scale = number("fp16.loss_scale", "a number >= 0 (0: dynamic)")
        values["loss_scale"] = float(scale) if scale > 0 else None
    if "fp16.initial_scale_power" in keys:
        power = number("fp16.initial_scale_power", "an integer >= 0")
        if power != int(power) or power > 127:
            raise ValueError(f"DeepSpeed key fp16.initial_scale_power={power!r} is not allowed; expected 0..127")
        values["initial_loss_scale"] = float(2 ** int(power))
    for ds_key, key in (("fp16.loss_scale_window", "loss_scale_window"), ("fp16.hysteresis", "loss_scale_hysteresis")):
        if ds_key in keys:
            value = number(ds_key, "an integer >= 1", 1)
            if value != int(value):
                raise ValueError(f"DeepSpeed key {ds_key}={value!r} is not allowed; expected an integer >= 1")
            values[key] = int(value)
    if "fp16.min_loss_scale" in keys:
        values["min_loss_scale"] = float(number("fp16.min_loss_scale", "a number > 0", math.ulp(0.0)))
    return values


def _check_batch_sizes(values: dict[str, Any], world_size: int | None, where: str) -> None:
    """train_batch_size = micro_batch_size x grad_accum_steps x world size, as DeepSpeed requires."""
    total, micro = values.get("train_batch_size"), values.get("micro_batch_size")
    accum = values.get("grad_accum_steps", 1)
    if total is None or micro is None:
        return
    if world_size is not None and total != micro * accum * world_size:
        raise ValueError(
            f"{where}: train_batch_size={total} but train_micro_batch_size_per_gpu={micro} x "
            f"gradient_accumulation_steps={accum} x world size {world_size} = {micro * accum * world_size}"
        )
    if total % (micro * accum) != 0:
        raise ValueError(
            f"{where}: train_batch_size={total} is not a multiple of train_micro_batch_size_per_gpu={micro} x "
            f"gradient_accumulation_steps={accum} = {micro * accum}, so no world size fits"
        )
