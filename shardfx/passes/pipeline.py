"""The table of contents of the compiler: which passes run, in which order, and why.

Read this file to learn what shardfx does to a training step. PASSES declares
every pass once with its contract (what it needs and provides, what must run
before it, whether the program is correct without it: see passes/manager.py);
`pipeline(config, mesh)` picks and binds them for one program of the step, and
`schedule(config)` says which programs a step needs and which runs when.
"""

from __future__ import annotations

from functools import partial

import torch

from shardfx.config import Config
from shardfx.graphs.pp_schedule import alive_by_stage
from shardfx.graphs.program import Mesh, Schedule
from shardfx.passes import facts as f
from shardfx.passes.accumulate_gradients import accumulate_gradients
from shardfx.passes.apply_mixed_precision import apply_mixed_precision
from shardfx.passes.bucket_collectives import bucket_collectives
from shardfx.passes.clip_gradients import clip_gradients
from shardfx.passes.data_parallel import data_parallel
from shardfx.passes.fuse import fuse
from shardfx.passes.lower_to_triton import lower_to_triton
from shardfx.passes.manager import Pass
from shardfx.passes.recompute import recompute
from shardfx.passes.reuse_replicas import reuse_replicas
from shardfx.passes.scale_loss import scale_loss
from shardfx.passes.schedule_overlap import schedule_overlap
from shardfx.passes.shard_gradients import shard_gradients
from shardfx.passes.shard_optimizer_state import shard_optimizer_state
from shardfx.passes.shard_parameters import shard_parameters
from shardfx.passes.split_stages import MemoryLimit, split_stages
from shardfx.passes.sum_gradients import sum_gradients
from shardfx.passes.sync_batch_norm import sync_batch_norm
from shardfx.passes.tensor_parallel import tensor_parallel
from shardfx.passes.tune_communication import tune_communication

SYNC_BATCH_NORM = Pass(
    "sync_batch_norm",
    sync_batch_norm,
    "batch statistics over the global batch, as on one device",
    needs=(f.PHASES,),
    provides=(f.GLOBAL_BATCH_STATS,),
)
TENSOR_PARALLEL = Pass(
    "tensor_parallel",
    tensor_parallel,
    "split Linear layers over the tp ranks: colwise then rowwise, collectives where placements change",
    needs=(f.PHASES, f.MODULES),
    provides=(f.TP_SPECS, f.PLACEMENT, f.TP_REDISTRIBUTES),
    after=("sync_batch_norm",),
)
SPLIT_STAGES = Pass(
    "split_stages",
    split_stages,
    "keep one pipeline stage: cut where the cost model balances the stages, send what crosses a cut",
    needs=(f.PHASES, f.MODULES, f.SIGNATURE),
    provides=(f.STAGES,),
    after=("sync_batch_norm", "tensor_parallel"),
    required=True,
)
RECOMPUTE = Pass(
    "recompute",
    recompute,
    "drop forward values the backward needs and compute them again there: activation memory",
    needs=(f.PHASES, f.MODULES),
    provides=(f.RECOMPUTE,),
    after=("sync_batch_norm", "tensor_parallel", "split_stages"),
)
ACCUMULATE_GRADIENTS = Pass(
    "accumulate_gradients",
    accumulate_gradients,
    "keep: add each gradient to a local accumulator, reduce nothing; "
    "reduce: reduce the accumulated sum once, at the last micro-batch",
    needs=(f.SIGNATURE,),
    provides=(f.GRAD_ACCUMULATORS,),
    after=("tensor_parallel", "split_stages", "recompute"),
)
# The one pass that decides how parameters, gradients and optimizer state lie on the dp axis.
# Each runs after the passes that rewrite the single-rank step (its gathers serve their nodes).
_BEFORE_SHARDING = ("sync_batch_norm", "tensor_parallel", "split_stages", "recompute", "accumulate_gradients")
DATA_PARALLEL = Pass(
    "data_parallel",
    data_parallel,
    "average every gradient (DDP)",
    needs=(f.PHASES, f.SIGNATURE),
    provides=(f.GRAD_SYNCS,),
    after=_BEFORE_SHARDING,
    required=True,
)
SHARD_OPTIMIZER_STATE = Pass(
    "shard_optimizer_state",
    shard_optimizer_state,
    "ZeRO-1: each rank updates 1/N of every parameter; gradients reduce-scattered after the backward",
    needs=(f.PHASES, f.SIGNATURE),
    provides=(f.GRAD_SYNCS, f.PARAM_GATHERS, f.SHARD_SPECS, f.PLACEMENT),
    after=_BEFORE_SHARDING,
    required=True,
)
SHARD_GRADIENTS = Pass(
    "shard_gradients",
    shard_gradients,
    "ZeRO-2: as ZeRO-1, each gradient reduce-scattered as soon as it is produced",
    needs=(f.PHASES, f.SIGNATURE),
    provides=(f.GRAD_SYNCS, f.PARAM_GATHERS, f.SHARD_SPECS, f.PLACEMENT),
    after=_BEFORE_SHARDING,
    required=True,
)
SHARD_PARAMETERS = Pass(
    "shard_parameters",
    shard_parameters,
    "ZeRO-3: parameters sharded, all-gathered around each use, gradients reduce-scattered",
    needs=(f.PHASES, f.SIGNATURE),
    provides=(f.GRAD_SYNCS, f.PARAM_GATHERS, f.SHARD_SPECS, f.PLACEMENT),
    after=_BEFORE_SHARDING,
    required=True,
)
APPLY_MIXED_PRECISION = Pass(
    "apply_mixed_precision",
    apply_mixed_precision,
    "fp32 master shards; bf16 compute and all-gathers; gradients reduced in reduce_dtype",
    exact=False,
    needs=(f.GRAD_SYNCS,),
    provides=(f.MIXED_PRECISION,),
)
# Before the norm (it must see true gradients: an overflow shows as a non-finite norm) and before
# sum_gradients (the kept sum it adds in is unscaled already).
SCALE_LOSS = Pass(
    "scale_loss",
    scale_loss,
    "fp16: the backward starts from the loss scale; reduced gradients divided by it (overflow shows in the norm)",
    exact=False,
    needs=(f.GRAD_SYNCS, f.MIXED_PRECISION),
    provides=(f.LOSS_SCALED,),
    after=("apply_mixed_precision",),
    required=True,
)
# The norm is taken over the gradients as the optimizer will see them: reduced, in fp32.
CLIP_GRADIENTS = Pass(
    "clip_gradients",
    clip_gradients,
    "scale gradients to a global norm, computed across shards; return the norm",
    needs=(f.GRAD_SYNCS,),
    provides=(f.GRAD_NORM_OUTPUT, f.CLIPPED_GRADIENTS),
    after=("apply_mixed_precision", "scale_loss", "sum_gradients"),
    required=True,
)
GRAD_NORM = Pass(
    "grad_norm",
    partial(clip_gradients, max_norm=None),
    "return the global gradient norm, computed across shards (non-finite check, stats)",
    needs=(f.GRAD_SYNCS,),
    provides=(f.GRAD_NORM_OUTPUT,),
    after=("apply_mixed_precision", "scale_loss", "sum_gradients"),
    required=True,
)
SUM_GRADIENTS = Pass(
    "sum_gradients",
    sum_gradients,
    "the last micro-batch adds the reduced gradients kept from the others: norm and clip see the whole step",
    needs=(f.GRAD_SYNCS,),
    provides=(f.KEPT_GRADIENT_SUM,),
    after=("apply_mixed_precision", "scale_loss"),
    required=True,
)
REUSE_REPLICAS = Pass(
    "reuse_replicas",
    reuse_replicas,
    "gather: also return the gathered parameters; reuse: read them instead of gathering again",
    needs=(f.PARAM_GATHERS,),
    provides=(f.KEPT_REPLICAS,),
    after=("apply_mixed_precision", "clip_gradients", "grad_norm"),
)
# Communication scheduling runs on the final set of collectives.
_COLLECTIVES_FINAL = ("apply_mixed_precision", "clip_gradients", "grad_norm", "reuse_replicas")
TUNE_COMMUNICATION = Pass(
    "tune_communication",
    tune_communication,
    "the cost model plans bucket sizes, overlap and prefetch depth (what the Config leaves unset) under the memory cap",
    needs=(f.GRAD_SYNCS,),
    provides=(f.BUCKET, f.ASYNC_COLLECTIVES),
    after=_COLLECTIVES_FINAL,
)
BUCKET_COLLECTIVES = Pass(
    "bucket_collectives",
    bucket_collectives,
    "flat collectives instead of one per parameter (gathers, scatters per block): fewer latencies",
    needs=(f.GRAD_SYNCS,),
    provides=(f.BUCKET,),
    after=_COLLECTIVES_FINAL,
)
SCHEDULE_OVERLAP = Pass(
    "schedule_overlap",
    schedule_overlap,
    "async collectives: prefetch parameter gathers, reduce gradients behind the backward",
    needs=(f.GRAD_SYNCS,),
    provides=(f.ASYNC_COLLECTIVES,),
    after=(*_COLLECTIVES_FINAL, "bucket_collectives"),
)
FUSE = Pass(
    "fuse",
    fuse,
    "group memory-bound ops (pointwise, casts, last-dim reductions) into regions",
    exact=False,
    needs=(f.PHASES, f.VALS),
    provides=(f.FUSION, f.FUSION_REGIONS),
    after=(*_COLLECTIVES_FINAL, "tune_communication", "bucket_collectives", "schedule_overlap"),
)
LOWER_TO_TRITON = Pass(
    "lower_to_triton",
    lower_to_triton,
    "one generated Triton kernel per region: each value read once, each result written once",
    exact=False,
    provides=(f.TRITON_REGIONS,),
    after=("fuse",),  # lowers the regions fuse marked; with fuse disabled there are none and it does nothing
)

PASSES: tuple[Pass, ...] = (
    SYNC_BATCH_NORM,
    TENSOR_PARALLEL,
    SPLIT_STAGES,
    RECOMPUTE,
    ACCUMULATE_GRADIENTS,
    DATA_PARALLEL,
    SHARD_OPTIMIZER_STATE,
    SHARD_GRADIENTS,
    SHARD_PARAMETERS,
    APPLY_MIXED_PRECISION,
    SCALE_LOSS,
    SUM_GRADIENTS,
    CLIP_GRADIENTS,
    GRAD_NORM,
    REUSE_REPLICAS,
    TUNE_COMMUNICATION,
    BUCKET_COLLECTIVES,
    SCHEDULE_OVERLAP,
    FUSE,
    LOWER_TO_TRITON,
)
PASS_NAMES: tuple[str, ...] = tuple(p.name for p in PASSES)


def pipeline(
    config: Config,
    mesh: Mesh,
    grad_accum: str | None = None,
    replicas: str | None = None,
    stage: int | None = None,
    holders: dict[str, list[int]] | None = None,
) -> list[Pass]:
    """The passes for `config` on `mesh`, for one program of the step (see step_variants), of
    pipeline stage `stage` (with Config.pp_size > 1; `holders`: each parameter's stages, to cut
    eval_step's forward-only program as the training step was):

    grad_accum: None a plain step; with accumulation, "keep" (add to accumulators, reduce nothing),
    "reduce" (reduce the accumulated sum: the step's last micro-batch), "partial" (reduce this
    micro-batch only) or "sum" (reduce it and add the reduced sum the others kept: the last).
    replicas: "gather" or "reuse" (reuse_replicas, ZeRO-1/2), None."""
    if grad_accum not in GRAD_ACCUM_VARIANTS:
        raise ValueError(f"grad_accum must be one of {list(GRAD_ACCUM_VARIANTS)}; got {grad_accum!r}")
    dp = mesh.size("dp")
    passes: list[Pass] = []
    if config.batchnorm == "global" and dp > 1:
        passes.append(SYNC_BATCH_NORM.bind(axis="dp"))
    if config.tp_size > 1:
        passes.append(TENSOR_PARALLEL.bind(axis="tp", plan=config.tp_plan, sequence=config.sequence_parallel))
    if config.pp_size > 1:
        n = config.pp_stages
        if stage is None or not 0 <= stage < n:
            raise ValueError(f"a pipeline of {n} stages compiles stages 0..{n - 1}; got {stage!r}")
        alive = alive_by_stage(config.pp_schedule, config.pp_size, config.pp_microbatches, config.pp_chunks)
        memory = MemoryLimit(config.pp_stage_memory, _state_bytes(config, dp), tuple(alive))
        passes.append(
            SPLIT_STAGES.bind(
                stage=stage, stages=n, ranks=config.pp_size, split=config.pp_split, holders=holders, memory=memory
            )
        )
    if config.recompute != "none":
        passes.append(RECOMPUTE.bind(policy=config.recompute, budget=config.memory_budget, hw=config.hardware))
    half = compute_dtype(config)
    reduce_dtype = torch.float32 if config.reduce_dtype == "fp32" else half
    if grad_accum in ("keep", "reduce"):
        passes.append(
            ACCUMULATE_GRADIENTS.bind(
                variant=grad_accum,
                acc_dtype=torch.float32 if half else None,
                reduce_dtype=reduce_dtype if half else None,
            )
        )
    passes.append(_data_parallel_pass(config))
    if half is not None:
        passes.append(APPLY_MIXED_PRECISION.bind(param_dtype=half, reduce_dtype=reduce_dtype))
    if config.mixed_precision == "fp16":
        passes.append(SCALE_LOSS)
    if grad_accum == "sum":
        passes.append(SUM_GRADIENTS)
    # The norm (and the clip) of the whole step, in the program that holds its gradient; a step of k
    # micro-batches holds their sum, k times the mean gradient one device would clip.
    # Under pipeline parallelism a stage holds part of the gradients (a tied one's part): the
    # runtime takes the norm over every stage after adding the parts, and clips (runtime/pipeline.py).
    if grad_accum in (None, "reduce", "sum") and config.pp_size == 1:
        k = config.grad_accum_steps
        if config.grad_clip is not None:
            passes.append(CLIP_GRADIENTS.bind(max_norm=config.grad_clip * k, eps=1e-6 * k))
        else:
            passes.append(GRAD_NORM)
    if replicas is not None:
        passes.append(REUSE_REPLICAS.bind(variant=replicas))
    passes.extend(_communication_passes(config))
    return _with_fusion(passes, config)


def compute_dtype(config: Config) -> torch.dtype | None:
    """The dtype the step computes in: bf16 or fp16 under mixed precision, None (fp32) otherwise."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision or "")


def _communication_passes(config: Config) -> list[Pass]:
    """Bucketing and overlap as the Config sets them; what it leaves unset (None) the cost model
    plans (tune_communication), so a default Config buckets and overlaps as DDP and FSDP do."""
    bucket, overlap, prefetch = config.bucket_mb, config.overlap, config.prefetch
    if config.tune_communication:
        bucket = overlap = prefetch = None
    if bucket is not None and (overlap is False or (overlap and prefetch is not None)):
        passes = [BUCKET_COLLECTIVES.bind(bucket_bytes=int(bucket * 2**20))] if bucket > 0 else []
        return passes + ([SCHEDULE_OVERLAP.bind(depth=prefetch)] if overlap else [])
    return [
        TUNE_COMMUNICATION.bind(
            hw=config.hardware, memory_cap=config.comm_memory_cap, bucket_mb=bucket, overlap=overlap, prefetch=prefetch
        )
    ]


GRAD_ACCUM_VARIANTS = (None, "keep", "reduce", "partial", "sum")


def step_variants(config: Config) -> dict[str, tuple[str | None, str | None]]:
    """The programs one batch shape needs: name -> (grad_accum variant of pipeline(), reuse_replicas variant).

    "first" runs an optimizer step's first micro-batch, "last" its last, "middle" the others
    (see schedule); "step" is the one program of a step without accumulation. Under accumulation
    ZeRO-1/2 gather the parameters only in "first" and keep them; boundary sync reduces gradients
    only in "last"; micro-batch sync (also what disabling accumulate_gradients means) reduces in
    every one, and "last" adds in the reduced sum the others kept.
    """
    k = accumulated(config)
    if k == 1:
        return {"step": (None, None)}
    boundary = config.grad_accum_sync == "boundary" and "accumulate_gradients" not in config.disable_passes
    early, last = ("keep", "reduce") if boundary else ("partial", "sum")
    if config.zero_stage in (1, 2) and config.pp_size == 1:  # a pipeline's forwards run ahead of backwards
        variants = {"first": (early, "gather")}
        if k > 2:
            variants["middle"] = (early, "reuse")
        variants["last"] = (last, "reuse")
        return variants
    return {"middle": (early, None), "last": (last, None)}


def schedule(config: Config) -> Schedule:
    """Which of step_variants(config) runs at each micro-batch of an optimizer step, and which of
    them hold the whole step's gradients and norm (a plain step, or an accumulating step's last)."""
    variants = step_variants(config)
    k = accumulated(config)

    def at(i: int) -> str:
        if "step" in variants:
            return "step"
        if i == k - 1:
            return "last"
        if i == 0 and "first" in variants:
            return "first"
        return "middle"

    return Schedule(tuple(at(i) for i in range(k)), frozenset({"step", "last"} & set(variants)))


def _state_bytes(config: Config, dp: int) -> float:
    """Model-state bytes a rank holds per parameter element (fp32 parameter, gradient, Adam's two
    moments: 4 + 4 + 8), as ZeRO's stage shares them over the dp ranks."""
    return {0: 16.0, 1: 8.0 + 8.0 / dp, 2: 4.0 + 12.0 / dp, 3: 16.0 / dp}[config.zero_stage]


def accumulated(config: Config) -> int:
    """Micro-batches whose gradients one optimizer step adds up: grad_accum_steps, or a pipeline's
    pp_microbatches."""
    return config.pp_microbatches if config.pp_size > 1 else config.grad_accum_steps


def _with_fusion(passes: list[Pass], config: Config) -> list[Pass]:
    if _fuse_enabled(config):
        passes.append(FUSE)
        passes.append(LOWER_TO_TRITON.bind(cache_dir=config.kernel_cache_dir))
    return passes


def _fuse_enabled(config: Config) -> bool:
    """Config.fuse; None: on where CUDA is, off on CPU (kernels would run only in Triton's interpreter)."""
    return config.fuse if config.fuse is not None else torch.cuda.is_available()


def _data_parallel_pass(config: Config) -> Pass:
    stage = config.zero_stage
    if stage == 0:
        return DATA_PARALLEL.bind(axis="dp")
    if stage == 1:
        return SHARD_OPTIMIZER_STATE.bind(axis="dp")
    if stage == 2:
        return SHARD_GRADIENTS.bind(axis="dp")
    return SHARD_PARAMETERS.bind(
        axis="dp",
        reshard_after_forward=config.reshard_after_forward,
        persistence_threshold=config.param_persistence_threshold,
    )
