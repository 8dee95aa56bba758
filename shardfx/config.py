"""Config: every option of the compiler, validated when it is built.

Unknown keys and bad values are errors that name the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

_CHOICES: dict[str, tuple[Any, ...]] = {
    "zero_stage": (0, 1, 2, 3),
    "mixed_precision": (None, "bf16", "fp16"),
    "reduce_dtype": ("fp32", "bf16"),
    "batchnorm": ("global", "local"),
    "recompute": ("none", "full", "selective", "budget"),
    "on_nonfinite": ("skip", "stop", "ignore"),
    "grad_accum_sync": ("boundary", "micro_batch"),
    "pp_schedule": ("gpipe", "1f1b", "interleaved_1f1b"),
    "plan": (None, "auto"),
}


@dataclass(frozen=True)
class Config:
    """Options of shardfx.compile_distributed.

    zero_stage: 0 (data parallel, DDP semantics), 1 (optimizer state sharded),
        2 (+ gradients sharded), 3 (+ parameters sharded).
    reshard_after_forward: ZeRO-3 only; False keeps gathered parameters from
        forward to backward (less traffic, more memory).
    param_persistence_threshold: ZeRO-3 only; parameters with at most this many elements stay whole on every
        rank (no gathers; their gradients all-reduced), as DeepSpeed's
        stage3_param_persistence_threshold. 0 (the default): every parameter is sharded.
    mixed_precision: None (fp32), "bf16" (bf16 compute, fp32 master shards) or "fp16" (fp16
        compute, fp32 master shards, the loss scaled in the program: see loss_scale).
    reduce_dtype: dtype gradients are reduced in under mixed precision: "fp32", or "bf16" (the
        compute dtype's width: fp16 under mixed_precision="fp16").
    loss_scale: mixed_precision="fp16" only. None: dynamic loss scaling as DeepSpeed's: the loss
        is multiplied by the scale before the backward and the gradients divided by it after the
        reduction, in the program; a step whose gradients overflow (a non-finite norm) is skipped
        and the scale divided by 2 (after loss_scale_hysteresis overflows in a row), and after
        loss_scale_window steps without one it is doubled, never below min_loss_scale. A number
        > 0: a static scale (an overflow is then a non-finite step for on_nonfinite).
    initial_loss_scale, loss_scale_window, loss_scale_hysteresis, min_loss_scale: the dynamic
        scale's start (2**16), the clean steps before it doubles (1000), the overflows it takes
        to halve it (2), its floor (1).
    grad_clip: clip gradients to this global norm (None: no clipping).
    batchnorm: "global" computes batch statistics over the global batch (single-device
        semantics); "local" keeps each rank's own statistics (DDP's behaviour).
    bucket_mb: merge collectives into flat buckets of at most this many MiB, gathers and reduce-scatters
        within a block, all-reduces across blocks as DDP's (0: off;
        None, the default: the cost model plans it, see tune_communication).
    overlap: issue collectives asynchronously: gradient reductions launched while the backward
        still runs, parameter gathers prefetched `prefetch` blocks ahead (None: planned).
    prefetch: collectives in flight, >= 1 (None: planned): parameter gathers issued this many blocks
        ahead of their use, and up to this many gradient reductions running at once.
    tp_size: tensor-parallel ranks (world size = dp x tp); Linear layers split Megatron-style.
    tp_plan: {module pattern: "colwise" | "rowwise" | "replicate"}; None: the automatic plan.
    sequence_parallel: with tp_size > 1, Megatron's sequence parallelism: between the blocks
        (norms, residual adds) activations are split along the sequence (dim 1 of (B, L, ...)),
        each block's all-reduce becomes a reduce-scatter and an all-gather (the same bytes).
    tune_communication: what bucket_mb, overlap and prefetch leave unset (None, their default) the
        cost model plans on the `hardware` profile: of the simulated steps whose peak stays under
        comm_memory_cap bytes (None: no cap), those within 2% of the fastest tie and the smallest
        peak among them wins. A planned depth above 1 may be bounded by depth 1's peak: gathers
        and reductions go that deep only where the live memory leaves room (schedule_overlap).
        True plans all three, overriding them.
    recompute: activation recomputation: "none", "full" (every block, keeping block inputs),
        "selective" (the attention core), "budget" (the cheapest recomputation that brings the
        simulated peak to memory_budget).
    memory_budget: for recompute="budget": peak bytes per rank (> 1) or a fraction of the peak
        without recomputation (<= 1).
    fuse: fuse memory-bound regions into generated Triton kernels (None: on with CUDA, off on CPU).
    kernel_cache_dir: folder for generated kernels (None: $SHARDFX_KERNEL_CACHE or ~/.cache/shardfx/kernels).
    hardware: the cost model's hardware profile for decisions (shardfx.graphs.cost_model.PROFILES);
        "auto": this machine's (the CUDA device's, else "cpu": measured by the first launched gloo job
        at each rank count on this machine, or by `shardfx calibrate`; SHARDFX_CALIBRATE=0 skips it).
    collective_timeout: seconds a rank waits in a collective before every rank fails.
    dump_dir: write the printed program after every pass into this folder.
    disable_passes: names of passes to skip (for bisecting); a name that is no pass is an error
        listing the passes, and a pass the program needs to be correct (data_parallel or the ZeRO
        pass, clip_gradients, grad_norm, sum_gradients, split_stages, scale_loss) is refused unless
        force_disable.
    force_disable: let disable_passes skip passes the program needs to be correct: the program
        is then not the step this Config describes (bisect uses it to find what breaks).
    grad_accum_steps: micro-batches per optimizer step; `engine(*micro_batch)` takes one,
        `train_step(*batch)` takes grad_accum_steps of them stacked on dim 0.
    grad_accum_sync: with grad_accum_steps > 1, when gradients are reduced: "boundary" (once,
        at the last micro-batch; each rank keeps a full-size local gradient accumulator until
        then, as DeepSpeed's and FSDP's no_sync) or "micro_batch" (every micro-batch: k times
        the gradient traffic, but under ZeRO-2/3 a rank never holds more than its shard).
    micro_batch_size: per-rank samples of one micro-batch (None: whatever the example batch holds);
        when set, compile_distributed checks the example batch against it.
    train_batch_size: samples per optimizer step over all ranks (micro_batch_size x
        grad_accum_steps x world size; None: not checked).
    on_nonfinite: what a non-finite loss or gradient norm does: "skip" the optimizer step
        (reported, counted in engine.stats()), "stop" (raise NonFiniteError), "ignore" (step anyway).
    allow_untested_optimizer: let an optimizer shardfx does not know to be elementwise run on
        ZeRO or tensor-parallel slices (DeepSpeed's zero_allow_untested_optimizer); without it such
        an optimizer is refused there (see shardfx/runtime/optimizers.py).
    max_batch_shapes: compiled steps kept for different batch shapes (least recently used
        dropped); 1 makes a new batch shape an error instead of a recompile.
    pp_size: pipeline stages (world size = pp x dp x tp; tp varies fastest, pp slowest, as in
        Megatron). The step's graph is cut into pp_size stages, each on its own ranks; activations
        and their gradients cross the cuts as sends and receives.
    pp_microbatches: micro-batches the global batch is split into for the pipeline (every rank's
        data-parallel slice is split into this many along dim 0).
    pp_schedule: "gpipe" (every forward, then every backward: M micro-batches of activations
        alive), "1f1b" (one forward, one backward in the steady state: at most pp_size alive) or
        "interleaved_1f1b" (Megatron's: each rank runs pp_chunks stages, a smaller bubble for more
        sends; pp_microbatches must be a multiple of pp_size).
    pp_chunks: with interleaved_1f1b, the stages each rank holds (>= 2): the model is cut into
        pp_size x pp_chunks stages, stage v on pipeline rank v % pp_size.
    pp_split: the module names that begin stages 1 .. pp_size x pp_chunks - 1 (None: the cost model balances
        the stages' forward and backward time, cutting between blocks).
    pp_stage_memory: bytes a pipeline stage may hold (None: no limit); the cost model's cut keeps
        every stage within it: model state (16 bytes a parameter, ZeRO's share of it on dp > 1)
        plus the activations of the micro-batches the schedule keeps alive there.
    plan: None (compile this Config as it is) or "auto": the planner (shardfx/planner.py) chooses
        tp_size, pp_size, zero_stage, reshard_after_forward and recompute (and, through
        tune_communication, bucket_mb, overlap, prefetch) for the fastest simulated step whose
        per-rank peak is at most memory_limit. A searched field set away from its default is kept.
    memory_limit: with plan="auto": bytes per rank (None: no limit).
    """

    zero_stage: int = 0
    reshard_after_forward: bool = True
    param_persistence_threshold: int = 0
    mixed_precision: str | None = None
    reduce_dtype: str = "fp32"
    loss_scale: float | None = None
    initial_loss_scale: float = 2.0**16
    loss_scale_window: int = 1000
    loss_scale_hysteresis: int = 2
    min_loss_scale: float = 1.0
    grad_clip: float | None = None
    batchnorm: str = "global"
    bucket_mb: float | None = None
    overlap: bool | None = None
    prefetch: int | None = None
    tune_communication: bool = False
    comm_memory_cap: float | None = None
    tp_size: int = 1
    tp_plan: dict[str, str] | None = None
    sequence_parallel: bool = False
    recompute: str = "none"
    memory_budget: float | None = None
    hardware: str = "auto"
    fuse: bool | None = None
    kernel_cache_dir: str | None = None
    collective_timeout: float = 60.0
    dump_dir: str | None = None
    disable_passes: tuple[str, ...] = field(default_factory=tuple)
    force_disable: bool = False
    grad_accum_steps: int = 1
    grad_accum_sync: str = "boundary"
    micro_batch_size: int | None = None
    train_batch_size: int | None = None
    on_nonfinite: str = "skip"
    allow_untested_optimizer: bool = False
    max_batch_shapes: int = 4
    pp_size: int = 1
    pp_microbatches: int = 1
    pp_schedule: str = "1f1b"
    pp_split: tuple[str, ...] | None = None
    pp_stage_memory: float | None = None
    pp_chunks: int = 1
    plan: str | None = None
    memory_limit: float | None = None

    def __post_init__(self) -> None:
        for key, allowed in _CHOICES.items():
            value = getattr(self, key)
            # the same type as a choice: 1.0 == 1 and True == 1, but neither is zero_stage 1
            if not any(type(value) is type(a) and value == a for a in allowed):
                raise ValueError(f"Config.{key}={value!r} is not allowed; choose one of {list(allowed)}")
        threshold = self.param_persistence_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise ValueError(
                f"Config.param_persistence_threshold must be an integer >= 0 (elements); got {threshold!r}"
            )
        if not isinstance(self.reshard_after_forward, bool):
            raise TypeError(f"Config.reshard_after_forward must be a bool; got {self.reshard_after_forward!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ValueError(f"Config.grad_clip must be a positive number or None; got {self.grad_clip!r}")
        bucket = self.bucket_mb
        if bucket is not None and (isinstance(bucket, bool) or not isinstance(bucket, (int, float)) or bucket < 0):
            raise ValueError(
                f"Config.bucket_mb must be a number >= 0 (0 turns bucketing off) or None (planned); got {bucket!r}"
            )
        from shardfx.graphs.cost_model import AUTO, PROFILES

        if not isinstance(self.hardware, str) or (self.hardware != AUTO and self.hardware not in PROFILES):
            raise ValueError(
                f"Config.hardware={self.hardware!r} is not a profile; choose {AUTO!r} or one of {sorted(PROFILES)}"
            )
        if self.overlap is not None and not isinstance(self.overlap, bool):
            raise TypeError(f"Config.overlap must be a bool or None (planned); got {self.overlap!r}")
        if self.prefetch is not None and not (
            isinstance(self.prefetch, int) and not isinstance(self.prefetch, bool) and self.prefetch >= 1
        ):
            raise ValueError(f"Config.prefetch must be an integer >= 1 or None (planned); got {self.prefetch!r}")
        if not isinstance(self.tune_communication, bool):
            raise TypeError(f"Config.tune_communication must be a bool; got {self.tune_communication!r}")
        if self.comm_memory_cap is not None and not (
            isinstance(self.comm_memory_cap, (int, float)) and self.comm_memory_cap > 0
        ):
            raise ValueError(f"Config.comm_memory_cap must be bytes > 0 or None; got {self.comm_memory_cap!r}")
        if self.fuse is not None and not isinstance(self.fuse, bool):
            raise TypeError(f"Config.fuse must be True, False or None (on with CUDA); got {self.fuse!r}")
        if not (isinstance(self.tp_size, int) and not isinstance(self.tp_size, bool) and self.tp_size >= 1):
            raise ValueError(f"Config.tp_size must be an integer >= 1; got {self.tp_size!r}")
        if not isinstance(self.sequence_parallel, bool):
            raise TypeError(f"Config.sequence_parallel must be a bool; got {self.sequence_parallel!r}")
        if self.sequence_parallel and self.tp_size == 1:
            raise ValueError(
                "Config(sequence_parallel=True) splits along tp ranks: it needs tp_size > 1; got tp_size=1"
            )
        if self.tp_plan is not None and not (
            isinstance(self.tp_plan, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in self.tp_plan.items())
        ):
            raise TypeError(f"Config.tp_plan must be a dict of module pattern -> style, or None; got {self.tp_plan!r}")
        if self.recompute == "budget" and not (isinstance(self.memory_budget, (int, float)) and self.memory_budget > 0):
            raise ValueError(
                f"Config(recompute='budget') needs memory_budget > 0 (bytes, or a fraction <= 1); got {self.memory_budget!r}"
            )
        if not (isinstance(self.collective_timeout, (int, float)) and self.collective_timeout > 0):
            raise ValueError(f"Config.collective_timeout must be positive seconds; got {self.collective_timeout!r}")
        self._check_pipeline()
        self._check_plan()
        self._check_loss_scale()
        for key in ("grad_accum_steps", "max_batch_shapes"):
            _check_int(key, getattr(self, key))
        for key in ("micro_batch_size", "train_batch_size"):
            if getattr(self, key) is not None:
                _check_int(key, getattr(self, key))
        if not isinstance(self.allow_untested_optimizer, bool):
            raise TypeError(f"Config.allow_untested_optimizer must be a bool; got {self.allow_untested_optimizer!r}")
        if not isinstance(self.force_disable, bool):
            raise TypeError(f"Config.force_disable must be a bool; got {self.force_disable!r}")
        passes = (self.disable_passes,) if isinstance(self.disable_passes, str) else self.disable_passes
        if not isinstance(passes, (list, tuple)) or not all(isinstance(name, str) for name in passes):
            raise TypeError(f"Config.disable_passes must be pass names (a list of str, or one str); got {passes!r}")
        object.__setattr__(self, "disable_passes", tuple(passes))
        _check_declared_types(self)

    @property
    def pp_stages(self) -> int:
        """The stages the model is cut into: pp_size x pp_chunks."""
        return self.pp_size * self.pp_chunks

    def _check_plan(self) -> None:
        limit = self.memory_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0):
            raise ValueError(f"Config.memory_limit must be bytes > 0 or None (no limit); got {limit!r}")
        if limit is not None and self.plan != "auto":
            raise ValueError(
                f"Config.memory_limit={limit!r} is the planner's limit; it needs plan='auto' (got plan={self.plan!r})"
            )

    def _check_loss_scale(self) -> None:
        def number(key: str, value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0

        if self.loss_scale is not None and not number("loss_scale", self.loss_scale):
            raise ValueError(
                f"Config.loss_scale must be a number > 0 (static) or None (dynamic); got {self.loss_scale!r}"
            )
        for key in ("initial_loss_scale", "min_loss_scale"):
            if not number(key, getattr(self, key)):
                raise ValueError(f"Config.{key} must be a number > 0; got {getattr(self, key)!r}")
        for key in ("loss_scale_window", "loss_scale_hysteresis"):
            _check_int(key, getattr(self, key))
        if self.min_loss_scale > self.initial_loss_scale:
            raise ValueError(
                f"Config.min_loss_scale={self.min_loss_scale} is above initial_loss_scale={self.initial_loss_scale}"
            )
        if self.loss_scale is not None and self.mixed_precision != "fp16":
            raise ValueError(
                f"Config.loss_scale={self.loss_scale!r} scales an fp16 loss; it needs mixed_precision='fp16' "
                f"(got {self.mixed_precision!r})"
            )
        if self.mixed_precision == "fp16" and self.pp_size > 1:
            raise ValueError(
                f"Config(mixed_precision='fp16') is not supported with pipeline parallelism yet (pp_size={self.pp_size}): "
                "use mixed_precision='bf16', which needs no loss scale"
            )

    def _check_pipeline(self) -> None:
        for key in ("pp_size", "pp_microbatches", "pp_chunks"):
            _check_int(key, getattr(self, key))
        if self.pp_size == 1:
            given = [
                f"{key}={getattr(self, key)!r}"
                for key, default in (
                    ("pp_microbatches", 1),
                    ("pp_split", None),
                    ("pp_stage_memory", None),
                    ("pp_chunks", 1),
                )
                if getattr(self, key) != default
            ] + (["pp_schedule='interleaved_1f1b'"] if self.pp_schedule == "interleaved_1f1b" else [])
            if given:
                raise ValueError(f"Config({', '.join(given)}) configures a pipeline; it needs pp_size > 1")
        interleaved = self.pp_schedule == "interleaved_1f1b"
        if interleaved and self.pp_size > 1 and self.pp_chunks < 2:
            raise ValueError(
                "Config(pp_schedule='interleaved_1f1b') runs pp_chunks >= 2 stages a rank; got pp_chunks=1"
            )
        if not interleaved and self.pp_chunks != 1:
            raise ValueError(
                f"Config.pp_chunks={self.pp_chunks} is for pp_schedule='interleaved_1f1b'; {self.pp_schedule!r} "
                "runs one stage a rank"
            )
        if interleaved and self.pp_size > 1 and self.pp_microbatches % self.pp_size:
            raise ValueError(
                f"Config(pp_schedule='interleaved_1f1b') takes micro-batches in groups of pp_size={self.pp_size}; "
                f"pp_microbatches={self.pp_microbatches} is not a multiple"
            )
        if self.pp_split is not None:
            if not isinstance(self.pp_split, (list, tuple)) or not all(isinstance(m, str) for m in self.pp_split):
                raise TypeError(f"Config.pp_split must be a list of module names or None; got {self.pp_split!r}")
            object.__setattr__(self, "pp_split", tuple(self.pp_split))
            n = self.pp_stages
            if len(self.pp_split) != n - 1:
                raise ValueError(
                    f"Config.pp_split names the modules that begin stages 1 .. {n - 1}: it needs "
                    f"{n - 1} names for {n} stages; got {len(self.pp_split)}: {list(self.pp_split)}"
                )
        if self.pp_stage_memory is not None and not (
            isinstance(self.pp_stage_memory, (int, float))
            and not isinstance(self.pp_stage_memory, bool)
            and self.pp_stage_memory > 0
        ):
            raise ValueError(f"Config.pp_stage_memory must be bytes > 0 or None; got {self.pp_stage_memory!r}")
        if self.pp_size > 1 and self.grad_accum_steps > 1:
            raise ValueError(
                f"Config(pp_size={self.pp_size}) accumulates over its pp_microbatches; grad_accum_steps must be 1 "
                f"(got {self.grad_accum_steps}): use pp_microbatches={self.pp_microbatches * self.grad_accum_steps}"
            )

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ValueError(f"unknown Config keys {unknown}; allowed keys: {cls.keys()}")
        return cls(**values)

    @classmethod
    def from_deepspeed(
        cls,
        source: str | os.PathLike | dict[str, Any],
        *,
        world_size: int | None = None,
        unsupported: str = "warn",
        pp_size: int = 1,
        strict: bool = False,
    ) -> Config:
        """A Config from a DeepSpeed JSON config (a path or the parsed dict): the keys that are
        Config fields (see shardfx.deepspeed.KEYS). The optimizer, scheduler and steps_per_print
        are not: shardfx.deepspeed.from_config (or .initialize) builds them.

        DeepSpeed sets a pipeline's stages in code (PipelineModule(num_stages=P)), not in the JSON:
        give them as `pp_size`. Then, as in DeepSpeed's PipelineEngine, gradient_accumulation_steps
        is the pipeline's micro-batches (pp_microbatches), and the batch sizes count the
        data-parallel ranks (world_size / pp_size).

        Keys not honoured here are reported with their reasons: `unsupported="warn"` (a
        UserWarning, one line), "error" (ValueError; also strict=True) or "ignore". They are also
        kept on the returned object as `config.deepspeed_unsupported` (sorted keys) and
        `config.deepspeed_ignored` (key -> reason); replace() drops both.
        """
        from shardfx import deepspeed

        if unsupported not in ("warn", "error", "ignore"):
            raise ValueError(f"unsupported={unsupported!r} is not allowed; choose one of ['warn', 'error', 'ignore']")
        strict = strict or unsupported == "error"
        ds, where = deepspeed.read_json(source)
        # not Config fields: left to shardfx.deepspeed.from_config, unread here ("auto" values and all)
        others = ("optimizer", "scheduler", "steps_per_print")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setup = deepspeed.from_config(
                {k: v for k, v in ds.items() if k not in others}, world_size=world_size, pp_size=pp_size, strict=strict
            )
        ignored = {k: v for k, v in setup.ignored.items()}
        for key in others:
            if key in ds:
                ignored[key] = "not a Config field: shardfx.deepspeed.from_config builds it"
        if ignored and strict:
            raise ValueError(f"{where}: keys a Config does not hold (strict): {deepspeed._listing(ignored)}")
        if ignored and unsupported == "warn":
            warnings.warn(f"{where}: ignoring {deepspeed._listing(ignored)}", stacklevel=2)
        config = setup.config
        object.__setattr__(config, "deepspeed_unsupported", sorted(ignored))
        object.__setattr__(config, "deepspeed_ignored", dict(sorted(ignored.items())))
        return config

    def replace(self, **changes: Any) -> Config:
        return self.from_dict({**dataclasses.asdict(self), **changes})


def _check_declared_types(config: Config) -> None:
    """What the checks above let through, by each field's declared type: a bool where a number goes
    (True is an int to Python), a float where an int goes, a number that is not finite (NaN passes every
    comparison; inf, or an int past float's range, is no setting), a path that is not a str."""
    for f in dataclasses.fields(config):
        value, kinds = getattr(config, f.name), str(f.type).replace(" ", "").split("|")
        if value is None and "None" in kinds:
            continue
        none = " or None" if "None" in kinds else ""
        if kinds[0] in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            what = "an integer" if kinds[0] == "int" else "a number"
            raise TypeError(f"Config.{f.name} must be {what}{none}; got {value!r}")
        if kinds[0] == "int" and not isinstance(value, int):
            raise TypeError(f"Config.{f.name} must be an integer{none}; got {value!r}")
        if kinds[0] == "float" and not _finite(value):
            raise ValueError(f"Config.{f.name} must be a finite number{none}; got {value!r}")
        if kinds[0] == "bool" and not isinstance(value, bool):
            raise TypeError(f"Config.{f.name} must be a bool{none}; got {value!r}")
        if kinds[0] == "str" and isinstance(value, os.PathLike):
            object.__setattr__(config, f.name, os.fspath(value))  # a Path for a folder: kept as its str
        elif kinds[0] == "str" and not isinstance(value, str):
            raise TypeError(f"Config.{f.name} must be a str{none}; got {value!r}")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past float's range
        return False


def _check_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Config.{key} must be an integer >= 1; got {value!r}")
