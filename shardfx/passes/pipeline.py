"""The table of contents of the compiler: which passes run, in which order, and why.

Read this file to learn what shardfx does to a training step.
"""

from __future__ import annotations

from functools import partial

import torch

from shardfx.config import Config
from shardfx.graphs.program import Mesh
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
from shardfx.passes.schedule_overlap import schedule_overlap
from shardfx.passes.shard_gradients import shard_gradients
from shardfx.passes.shard_optimizer_state import shard_optimizer_state
from shardfx.passes.shard_parameters import shard_parameters
from shardfx.passes.sync_batch_norm import sync_batch_norm
from shardfx.passes.tensor_parallel import tensor_parallel
from shardfx.passes.tune_communication import tune_communication


def pipeline(config: Config, mesh: Mesh, grad_accum: str | None = None, replicas: str | None = None) -> list[Pass]:
    """The passes for `config` on `mesh`. Under gradient accumulation a step has variants:
    grad_accum "keep" or "reduce" (accumulate_gradients), replicas "gather" or "reuse"
    (reuse_replicas, ZeRO-1/2); None: a plain step."""
    dp = mesh.size("dp")
    passes: list[Pass] = []
    if config.batchnorm == "global" and dp > 1:
        passes.append(
            Pass(
                "sync_batch_norm",
                partial(sync_batch_norm, axis="dp"),
                "batch statistics over the global batch, as on one device",
            )
        )
    if config.tp_size > 1:
        passes.append(
            Pass(
                "tensor_parallel",
                partial(tensor_parallel, axis="tp", plan=config.tp_plan),
                "split Linear layers over the tp ranks: colwise then rowwise, collectives where placements change",
            )
        )
    if config.recompute != "none":
        passes.append(
            Pass(
                "recompute",
                partial(recompute, policy=config.recompute, budget=config.memory_budget, hw=config.hardware),
                "drop forward values the backward needs and compute them again there: activation memory",
            )
        )
    reduce_dtype = torch.float32 if config.reduce_dtype == "fp32" else torch.bfloat16
    if grad_accum is not None:
        bf16 = config.mixed_precision == "bf16"
        passes.append(
            Pass(
                "accumulate_gradients",
                partial(
                    accumulate_gradients,
                    variant=grad_accum,
                    acc_dtype=torch.float32 if bf16 else None,
                    reduce_dtype=reduce_dtype if bf16 else None,
                ),
                "keep: add each gradient to a local accumulator, reduce nothing; "
                "reduce: reduce the accumulated sum once, at the last micro-batch",
            )
        )
    passes.append(_data_parallel_pass(config))
    if config.mixed_precision == "bf16":
        passes.append(
            Pass(
                "apply_mixed_precision",
                partial(apply_mixed_precision, param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype),
                "fp32 master shards; bf16 compute and all-gathers; gradients reduced in reduce_dtype",
                exact=False,
            )
        )
    if config.grad_clip is not None:
        passes.append(
            Pass(
                "clip_gradients",
                partial(clip_gradients, max_norm=config.grad_clip),
                "scale gradients to a global norm, computed across shards; return the norm",
            )
        )
    else:
        passes.append(
            Pass(
                "grad_norm",
                partial(clip_gradients, max_norm=None),
                "return the global gradient norm, computed across shards (non-finite check, stats)",
            )
        )
    if replicas is not None:
        passes.append(
            Pass(
                "reuse_replicas",
                partial(reuse_replicas, variant=replicas),
                "gather: also return the gathered parameters; reuse: read them instead of gathering again",
            )
        )
    if config.tune_communication:
        passes.append(
            Pass(
                "tune_communication",
                partial(tune_communication, hw=config.hardware, memory_cap=config.comm_memory_cap),
                "the cost model picks bucket size and prefetch depth under the memory cap",
            )
        )
        return _with_fusion(passes, config)
    if config.bucket_mb > 0:
        passes.append(
            Pass(
                "bucket_collectives",
                partial(bucket_collectives, bucket_bytes=int(config.bucket_mb * 2**20)),
                "one flat collective per block instead of one per parameter: fewer latencies",
            )
        )
    if config.overlap:
        passes.append(
            Pass(
                "schedule_overlap",
                partial(schedule_overlap, depth=config.prefetch),
                "async collectives: prefetch parameter gathers, reduce gradients behind the backward",
            )
        )
    return _with_fusion(passes, config)


def step_variants(config: Config) -> dict[str, tuple[str | None, str | None]]:
    """The programs one batch shape needs: name -> (accumulate_gradients variant, reuse_replicas variant).

    The engine runs "first" for an optimizer step's first micro-batch, "last" for its last,
    "middle" for the others, falling back to "middle" where a name is missing; "step" is the
    one program of a step without accumulation. Under accumulation ZeRO-1/2 gather the
    parameters only in "first" and keep them; boundary sync reduces gradients only in "last".
    """
    k = config.grad_accum_steps
    if k == 1:
        return {"step": (None, None)}
    boundary = config.grad_accum_sync == "boundary"
    if config.zero_stage in (1, 2):
        variants = {"first": ("keep" if boundary else None, "gather")}
        if k > 2 or not boundary:
            variants["middle"] = ("keep" if boundary else None, "reuse")
        if boundary:
            variants["last"] = ("reduce", "reuse")
        return variants
    if boundary:
        return {"middle": ("keep", None), "last": ("reduce", None)}
    return {"step": (None, None)}


def variant_config(config: Config) -> Config:
    """The Config the step's programs are compiled with: under accumulation the engine clips the
    summed gradient at the boundary, so the programs do not clip each micro-batch."""
    return config.replace(grad_clip=None) if config.grad_accum_steps > 1 else config


def _with_fusion(passes: list[Pass], config: Config) -> list[Pass]:
    if _fuse_enabled(config):
        passes.append(
            Pass(
                "fuse", fuse, "group memory-bound ops (pointwise, casts, last-dim reductions) into regions", exact=False
            )
        )
        passes.append(
            Pass(
                "lower_to_triton",
                partial(lower_to_triton, cache_dir=config.kernel_cache_dir),
                "one generated Triton kernel per region: each value read once, each result written once",
                exact=False,
            )
        )
    return passes


def _fuse_enabled(config: Config) -> bool:
    """Config.fuse; None: on where CUDA is, off on CPU (kernels would run only in Triton's interpreter)."""
    return config.fuse if config.fuse is not None else torch.cuda.is_available()


def _data_parallel_pass(config: Config) -> Pass:
    """The one pass that decides how parameters, gradients and optimizer state lie on the dp axis."""
    stage = config.zero_stage
    if stage == 0:
        return Pass("data_parallel", partial(data_parallel, axis="dp"), "average every gradient (DDP)")
    if stage == 1:
        return Pass(
            "shard_optimizer_state",
            partial(shard_optimizer_state, axis="dp"),
            "ZeRO-1: each rank updates 1/N of every parameter; gradients reduce-scattered after the backward",
        )
    if stage == 2:
        return Pass(
            "shard_gradients",
            partial(shard_gradients, axis="dp"),
            "ZeRO-2: as ZeRO-1, each gradient reduce-scattered as soon as it is produced",
        )
    return Pass(
        "shard_parameters",
        partial(shard_parameters, axis="dp", reshard_after_forward=config.reshard_after_forward),
        "ZeRO-3: parameters sharded, all-gathered around each use, gradients reduce-scattered",
    )
