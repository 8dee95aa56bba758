"""Config: every option of the compiler, validated when it is built.

Unknown keys and bad values are errors that name the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

_CHOICES: dict[str, tuple[Any, ...]] = {
    "zero_stage": (0, 1, 2, 3),
    "mixed_precision": (None, "bf16"),
    "reduce_dtype": ("fp32", "bf16"),
    "batchnorm": ("global", "local"),
    "recompute": ("none", "full", "selective", "budget"),
    "on_nonfinite": ("skip", "stop", "ignore"),
    "grad_accum_sync": ("boundary", "micro_batch"),
    "pp_schedule": ("gpipe", "1f1b", "interleaved_1f1b"),
}


@dataclass(frozen=True)
class Config:
    """Options of shardfx.compile_distributed.

    zero_stage: 0 (data parallel, DDP semantics), 1 (optimizer state sharded),
        2 (+ gradients sharded), 3 (+ parameters sharded).
    reshard_after_forward: ZeRO-3 only; False keeps gathered parameters from
        forward to backward (less traffic, more memory).
    mixed_precision: None (fp32) or "bf16" (bf16 compute, fp32 master shards).
    reduce_dtype: dtype gradients are reduced in under mixed precision.
    grad_clip: clip gradients to this global norm (None: no clipping).
    batchnorm: "global" computes batch statistics over the global batch (single-device
        semantics); "local" keeps each rank's own statistics (DDP's behaviour).
    bucket_mb: merge the collectives of one block into flat buckets of at most this many MiB (0: off;
        None, the default: the cost model plans it, see tune_communication).
    overlap: issue collectives asynchronously: gradient reductions launched while the backward
        still runs, parameter gathers prefetched `prefetch` blocks ahead (None: planned).
    prefetch: parameter gathers in flight ahead of their use, >= 1 (None: planned).
    tp_size: tensor-parallel ranks (world size = dp x tp); Linear layers split Megatron-style.
    tp_plan: {module pattern: "colwise" | "rowwise" | "replicate"}; None: the automatic plan.
    sequence_parallel: with tp_size > 1, Megatron's sequence parallelism: between the blocks
        (norms, residual adds) activations are split along the sequence (dim 1 of (B, L, ...)),
        each block's all-reduce becomes a reduce-scatter and an all-gather (the same bytes).
    tune_communication: what bucket_mb, overlap and prefetch leave unset (None, their default) the
        cost model plans on the `hardware` profile: of the simulated steps whose peak stays under
        comm_memory_cap bytes (None: no cap), those within 2% of the fastest tie and the smallest
        peak among them wins. True plans all three, overriding them.
    recompute: activation recomputation: "none", "full" (every block, keeping block inputs),
        "selective" (the attention core), "budget" (the cheapest recomputation that brings the
        simulated peak to memory_budget).
    memory_budget: for recompute="budget": peak bytes per rank (> 1) or a fraction of the peak
        without recomputation (<= 1).
    fuse: fuse memory-bound regions into generated Triton kernels (None: on with CUDA, off on CPU).
    kernel_cache_dir: folder for generated kernels (None: $SHARDFX_KERNEL_CACHE or ~/.cache/shardfx/kernels).
    hardware: the cost model's hardware profile for decisions (shardfx.graphs.cost_model.PROFILES);
        "auto": this machine's (the CUDA device's, else "cpu", calibrated by `shardfx calibrate`).
    collective_timeout: seconds a rank waits in a collective before every rank fails.
    dump_dir: write the printed program after every pass into this folder.
    disable_passes: names of passes to skip (for bisecting); a name that is no pass is an error
        listing the passes, and a pass the program needs to be correct (data_parallel or the ZeRO
        pass, clip_gradients, grad_norm, sum_gradients, split_stages) is refused unless force_disable.
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
    """

    zero_stage: int = 0
    reshard_after_forward: bool = True
    mixed_precision: str | None = None
    reduce_dtype: str = "fp32"
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
    max_batch_shapes: int = 4
    pp_size: int = 1
    pp_microbatches: int = 1
    pp_schedule: str = "1f1b"
    pp_split: tuple[str, ...] | None = None
    pp_stage_memory: float | None = None
    pp_chunks: int = 1

    def __post_init__(self) -> None:
        for key, allowed in _CHOICES.items():
            value = getattr(self, key)
            if value not in allowed or (isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed)):
                raise ValueError(f"Config.{key}={value!r} is not allowed; choose one of {list(allowed)}")
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

        if self.hardware != AUTO and self.hardware not in PROFILES:
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
        if self.tp_plan is not None and not isinstance(self.tp_plan, dict):
            raise TypeError(f"Config.tp_plan must be a dict of module pattern -> style, or None; got {self.tp_plan!r}")
        if self.recompute == "budget" and not (isinstance(self.memory_budget, (int, float)) and self.memory_budget > 0):
            raise ValueError(
                f"Config(recompute='budget') needs memory_budget > 0 (bytes, or a fraction <= 1); got {self.memory_budget!r}"
            )
        if not (isinstance(self.collective_timeout, (int, float)) and self.collective_timeout > 0):
            raise ValueError(f"Config.collective_timeout must be positive seconds; got {self.collective_timeout!r}")
        self._check_pipeline()
        for key in ("grad_accum_steps", "max_batch_shapes"):
            _check_int(key, getattr(self, key))
        for key in ("micro_batch_size", "train_batch_size"):
            if getattr(self, key) is not None:
                _check_int(key, getattr(self, key))
        if not isinstance(self.force_disable, bool):
            raise TypeError(f"Config.force_disable must be a bool; got {self.force_disable!r}")
        if isinstance(self.disable_passes, str):
            object.__setattr__(self, "disable_passes", (self.disable_passes,))
        object.__setattr__(self, "disable_passes", tuple(self.disable_passes))

    @property
    def pp_stages(self) -> int:
        """The stages the model is cut into: pp_size x pp_chunks."""
        return self.pp_size * self.pp_chunks

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
            if isinstance(self.pp_split, str) or not all(isinstance(m, str) for m in self.pp_split):
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
    ) -> Config:
        """A Config from a DeepSpeed JSON config (a path or the parsed dict); see DEEPSPEED_KEYS.

        DeepSpeed sets a pipeline's stages in code (PipelineModule(num_stages=P)), not in the JSON:
        give them as `pp_size`. Then, as in DeepSpeed's PipelineEngine, gradient_accumulation_steps
        is the pipeline's micro-batches (pp_microbatches), and the batch sizes count the
        data-parallel ranks (world_size / pp_size).

        Keys shardfx does not support are reported by their dotted names: `unsupported="warn"`
        (a UserWarning, one line), "error" (ValueError) or "ignore". The list is also kept on the
        returned object as `config.deepspeed_unsupported` (not a field: replace() drops it).
        """
        if unsupported not in ("warn", "error", "ignore"):
            raise ValueError(f"unsupported={unsupported!r} is not allowed; choose one of ['warn', 'error', 'ignore']")
        ds, where = _read_json(source)
        values, skipped = _map_deepspeed(ds)
        _check_int("pp_size", pp_size)
        if world_size is not None and world_size % pp_size:
            raise ValueError(f"{where}: world size {world_size} does not divide into pp_size={pp_size} stages")
        _check_batch_sizes(values, None if world_size is None else world_size // pp_size, where)
        if pp_size > 1:
            values["pp_size"] = pp_size
            values["pp_microbatches"] = values.pop("grad_accum_steps", 1)
        if skipped and unsupported == "error":
            raise ValueError(f"{where}: keys shardfx does not support: {', '.join(skipped)}")
        if skipped and unsupported == "warn":
            warnings.warn(f"{where}: ignoring keys shardfx does not support: {', '.join(skipped)}", stacklevel=2)
        config = cls.from_dict(values)
        object.__setattr__(config, "deepspeed_unsupported", skipped)
        return config

    def replace(self, **changes: Any) -> Config:
        return self.from_dict({**dataclasses.asdict(self), **changes})


def _check_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Config.{key} must be an integer >= 1; got {value!r}")


# DeepSpeed key (dotted) -> (Config key, how the value converts). Everything else is reported.
# reduce_bucket_size and stage3_prefetch_bucket_size count elements; shardfx buckets count
# MiB of fp32 gradients (4 bytes an element), and prefetches whole buckets ahead.
DEEPSPEED_KEYS: dict[str, str] = {
    "zero_optimization.stage": "zero_stage",
    "zero_optimization.reduce_bucket_size": "bucket_mb (elements x 4 bytes)",
    "zero_optimization.stage3_prefetch_bucket_size": "prefetch (in buckets of reduce_bucket_size, at least 1)",
    "zero_optimization.overlap_comm": "overlap",
    "bf16.enabled": 'mixed_precision ("bf16" or None)',
    "gradient_accumulation_steps": "grad_accum_steps",
    "gradient_clipping": "grad_clip (0: None)",
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "train_batch_size": "train_batch_size (checked: micro x accumulation x world size)",
}
# Keys that change nothing when they hold these values (DeepSpeed's own defaults for what we do).
_HARMLESS = {"fp16.enabled": False, "bf16.enabled": False, "zero_optimization.reduce_scatter": True}


def _read_json(source: Any) -> tuple[dict[str, Any], str]:
    if isinstance(source, dict):
        return source, "DeepSpeed config"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"from_deepspeed takes a path to a JSON file or a dict; got {type(source).__name__}")
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
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _map_deepspeed(ds: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(Config keyword arguments, dotted DeepSpeed keys that were not mapped)."""
    flat = _flatten(ds)
    if isinstance(flat.get("zero_optimization"), bool):  # the old form: "zero_optimization": true means stage 1
        flat["zero_optimization.stage"] = int(flat.pop("zero_optimization"))
    values: dict[str, Any] = {}

    def take(key: str, kind: Any, allowed: str) -> Any:
        value = flat.pop(key)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise ValueError(f"DeepSpeed key {key}={value!r} is not allowed; expected {allowed}")
        return value

    if "zero_optimization.stage" in flat:
        stage = take("zero_optimization.stage", int, "one of [0, 1, 2, 3]")
        if stage not in (0, 1, 2, 3):
            raise ValueError(
                f"DeepSpeed key zero_optimization.stage={stage!r} is not allowed; expected one of [0, 1, 2, 3]"
            )
        values["zero_stage"] = stage
    bucket = None
    if "zero_optimization.reduce_bucket_size" in flat:
        bucket = take("zero_optimization.reduce_bucket_size", (int, float), "a number of elements >= 0")
        if bucket < 0:
            raise ValueError(f"DeepSpeed key zero_optimization.reduce_bucket_size={bucket!r} must be >= 0")
        values["bucket_mb"] = bucket * 4 / 2**20
    if "zero_optimization.stage3_prefetch_bucket_size" in flat:
        fetch = take("zero_optimization.stage3_prefetch_bucket_size", (int, float), "a number of elements >= 0")
        if fetch < 0:
            raise ValueError(f"DeepSpeed key zero_optimization.stage3_prefetch_bucket_size={fetch!r} must be >= 0")
        values["prefetch"] = max(1, round(fetch / bucket)) if bucket else 1
    if "zero_optimization.overlap_comm" in flat:
        values["overlap"] = take("zero_optimization.overlap_comm", bool, "true or false")
    if "bf16.enabled" in flat:
        values["mixed_precision"] = "bf16" if take("bf16.enabled", bool, "true or false") else None
    if "gradient_clipping" in flat:
        clip = take("gradient_clipping", (int, float), "a number >= 0 (0: no clipping)")
        if clip < 0:
            raise ValueError(f"DeepSpeed key gradient_clipping={clip!r} must be >= 0 (0: no clipping)")
        values["grad_clip"] = float(clip) if clip > 0 else None
    for ds_key, key in (
        ("gradient_accumulation_steps", "grad_accum_steps"),
        ("train_micro_batch_size_per_gpu", "micro_batch_size"),
        ("train_batch_size", "train_batch_size"),
    ):
        if ds_key in flat:
            value = take(ds_key, int, "an integer >= 1")
            if value < 1:
                raise ValueError(f"DeepSpeed key {ds_key}={value!r} is not allowed; expected an integer >= 1")
            values[key] = value
    skipped = sorted(k for k, v in flat.items() if not (k in _HARMLESS and v == _HARMLESS[k]))
    return values, skipped


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
