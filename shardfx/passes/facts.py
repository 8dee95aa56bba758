"""The vocabulary of pass contracts: what a pass needs (Pass.needs) and provides (Pass.provides).

A fact is a string naming a node meta key, a role some nodes carry, a
signature role, a program field or a property of the step. The capture
provides CAPTURED; every other fact is provided by a pass, and the runner
(passes/manager.py) checks, before running anything, that each pass's needs
are provided by the capture or by a pass that runs before it.
"""

from __future__ import annotations

from shardfx.graphs import meta
from shardfx.graphs.program import FUSION_REGIONS as _FUSION_REGIONS
from shardfx.graphs.program import TRITON_REGIONS as _TRITON_REGIONS
from shardfx.graphs.signature import GRAD_ACC as _GRAD_ACC
from shardfx.graphs.signature import GRAD_NORM as _GRAD_NORM
from shardfx.graphs.signature import GRAD_SUM as _GRAD_SUM
from shardfx.graphs.signature import REPLICA as _REPLICA

# From the capture.
PHASES = f"meta[{meta.PHASE}]"
MODULES = f"meta[{meta.MODULE}]"
VALS = "meta[val]"
SIGNATURE = "signature roles (param, input, loss, grad)"
CAPTURED = frozenset({PHASES, MODULES, VALS, SIGNATURE})

# Node meta and collective roles.
PLACEMENT = f"meta[{meta.PLACEMENT}]"
RECOMPUTE = f"meta[{meta.RECOMPUTE}]"
FUSION = f"meta[{meta.FUSION}]"
BUCKET = f"meta[{meta.BUCKET}]"
PARAM_GATHERS = f"{meta.PARAM_GATHER} collectives"
GRAD_SYNCS = f"{meta.GRAD_SYNC} collectives (gradients reduced across dp)"
TP_REDISTRIBUTES = f"{meta.TP_REDISTRIBUTE} collectives"
ASYNC_COLLECTIVES = "async collectives (*_start / wait)"

# Signature roles passes add.
GRAD_ACCUMULATORS = f"signature {_GRAD_ACC}"
GRAD_NORM_OUTPUT = f"signature {_GRAD_NORM}"
KEPT_REPLICAS = f"signature {_REPLICA}"
KEPT_GRADIENT_SUM = f"signature {_GRAD_SUM} (GRAD outputs are the step's total)"

# Program fields and notes.
SHARD_SPECS = "program.shard_specs (ZeRO on dp)"
TP_SPECS = "program.tp_specs"
FUSION_REGIONS = f"program.notes[{_FUSION_REGIONS}]"
TRITON_REGIONS = f"program.notes[{_TRITON_REGIONS}]"

# What the step computes (tools that compare with eager read these).
GLOBAL_BATCH_STATS = "batch-norm statistics over the global batch"
STAGES = "one pipeline stage, with sends and receives on pp (program.notes[pipeline])"
CLIPPED_GRADIENTS = "gradients clipped to Config.grad_clip"
MIXED_PRECISION = "bf16 compute with fp32 master parameters"
LOSS_SCALED = "the loss scaled before the backward, GRAD outputs unscaled (signature loss_scale input)"
