"""The table of contents of the compiler: which passes run, in which order, and why.

Read this file to learn what shardfx does to a training step.
"""

from __future__ import annotations

from functools import partial

from shardfx.config import Config
from shardfx.graphs.program import Mesh
from shardfx.passes.data_parallel import data_parallel
from shardfx.passes.manager import Pass
from shardfx.passes.sync_batch_norm import sync_batch_norm


def pipeline(config: Config, mesh: Mesh) -> list[Pass]:
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
    passes.append(
        Pass("data_parallel", partial(data_parallel, axis="dp"), "average every gradient across data-parallel ranks")
    )
    return passes
