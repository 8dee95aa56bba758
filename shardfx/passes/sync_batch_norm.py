"""sync_batch_norm: batch statistics over the global batch, as on one device.

Replaces each training-mode batch norm (forward and backward) with ATen ops
plus all-reduces over the data-parallel axis:

  forward:  mean = all_reduce(sum x) / M; var = all_reduce(sum (x - mean)^2) / M   (two passes, as exact as eager)
  backward: dx = w * rstd * (dy - all_reduce(sum dy) / M - xhat * all_reduce(sum dy * xhat) / M)

where M is the global count per channel. Each rank's dy is N times the
global-loss gradient (its loss is the mean over its own slice), the same
scale as every other local gradient, so the later gradient average is right.
The weight and bias gradients stay local sums: data_parallel averages them.
Running statistics update from the global mean and unbiased variance.

Needs: capture. Provides: nodes with origin "sync_batch_norm".
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor

from shardfx.graphs.program import DistProgram
from shardfx.graphs.rewrite import inline, replace_tuple_node, used_outputs
from shardfx.passes.manager import PassContext, PassResult

BN_FORWARD = torch.ops.aten._native_batch_norm_legit_functional.default
BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default


def _channel_shape(x: Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)  # (1, C, 1, ...)


def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def sync_batch_norm(program: DistProgram, ctx: PassContext, *, axis: str = "dp") -> PassResult:
    world = program.mesh.size(axis)
    graph = program.graph
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is BN_FORWARD and node.args[5]:
            _replace_forward(program, node, axis, world)
            replaced += 1
        elif node.target is BN_BACKWARD and node.args[7]:
            _replace_backward(program, node, axis, world)
    return PassResult(program, {"batch_norms": replaced})


def _replace_forward(program: DistProgram, node: fx.Node, axis: str, world: int) -> None:
    x, weight, bias, running_mean, running_var, _, momentum, eps = node.args

    def forward(x: Tensor, w: Tensor | None, b: Tensor | None, rm: Tensor, rv: Tensor):  # type: ignore[no-untyped-def]
        dims, shape = _reduce_dims(x), _channel_shape(x)
        count = x.numel() // x.shape[1] * world  # elements per channel in the global batch
        mean = torch.ops.shardfx.all_reduce(x.sum(dims), axis, "sum") / count
        centered = x - mean.view(shape)
        var = torch.ops.shardfx.all_reduce((centered * centered).sum(dims), axis, "sum") / count
        rstd = torch.rsqrt(var + eps)
        out = centered * rstd.view(shape)
        if w is not None:
            out = out * w.view(shape)
        if b is not None:
            out = out + b.view(shape)
        new_rm = rm * (1 - momentum) + mean * momentum
        new_rv = rv * (1 - momentum) + var * (count / max(count - 1, 1)) * momentum
        return out, mean, rstd, new_rm, new_rv

    with program.graph.inserting_before(node):
        outs = inline(
            program, forward, [x, weight, bias, running_mean, running_var], provenance=node, origin="sync_batch_norm"
        )
    replace_tuple_node(node, outs)


def _replace_backward(program: DistProgram, node: fx.Node, axis: str, world: int) -> None:
    dy, x, weight, _, _, save_mean, save_rstd, _, _, _ = node.args
    used = used_outputs(node)

    def backward(dy: Tensor, x: Tensor, w: Tensor | None, mean: Tensor, rstd: Tensor):  # type: ignore[no-untyped-def]
        dims, shape = _reduce_dims(x), _channel_shape(x)
        count = x.numel() // x.shape[1] * world
        xhat = (x - mean.view(shape)) * rstd.view(shape)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        dx = None
        if 0 in used:
            g_sum = torch.ops.shardfx.all_reduce(sum_dy, axis, "sum") / count
            g_xhat = torch.ops.shardfx.all_reduce(sum_dy_xhat, axis, "sum") / count
            scale = rstd if w is None else rstd * w
            dx = (dy - g_sum.view(shape) - xhat * g_xhat.view(shape)) * scale.view(shape)
        return dx, (sum_dy_xhat if 1 in used else None), (sum_dy if 2 in used else None)

    with program.graph.inserting_before(node):
        outs = inline(
            program, backward, [dy, x, weight, save_mean, save_rstd], provenance=node, origin="sync_batch_norm"
        )
    replace_tuple_node(node, outs)
