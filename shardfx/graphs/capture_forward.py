"""capture_forward: trace the loss alone, in eval mode, into an ATen graph (eval_step's program).

The same ATen level, names, annotations and signature conventions as the
training capture (capture.py), so the same passes and rules apply; no backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from shardfx.graphs.capture import (
    Captured,
    TrainStep,
    annotate,
    cast_params,
    drop_runtime_asserts,
    names_by_tensor,
    rename,
)
from shardfx.graphs.signature import BUFFER, INPUT, LOSS, PARAM, InputSpec, OutputSpec, Signature
from shardfx.graphs.trace_errors import ROOT, trace_error


def capture_forward(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    loss_fn: Callable[..., torch.Tensor] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Captured:
    """Trace the loss of `model` in eval mode, forward only, into an ATen graph with a signature.

    The evaluation program: parameters, buffers and the batch in, the scalar loss out, at the
    same ATen level as the training graph (so the same passes and rules apply). The model's
    train/eval flag is restored afterwards; evaluation writes no state.
    """
    import time

    from torch.fx.experimental.proxy_tensor import make_fx

    start = time.perf_counter()
    batch = tuple(example_inputs)
    traced = cast_params(model, compute_dtype) if compute_dtype is not None else model
    step = TrainStep(traced, loss_fn, compute_dtype)
    params = {k[len(ROOT) + 1 :]: v for k, v in step.named_parameters()}  # tied weights once, first name
    buffers = {k[len(ROOT) + 1 :]: v for k, v in step.named_buffers()}

    def loss_of(params: dict, buffers: dict, *batch: torch.Tensor) -> torch.Tensor:
        state = {f"{ROOT}.{k}": v for k, v in {**params, **buffers}.items()}
        return torch.func.functional_call(step, state, batch, tie_weights=True)

    was_training = traced.training
    traced.eval()
    try:
        with torch.no_grad():
            gm = make_fx(loss_of, tracing_mode="fake", record_module_stack=True)(params, buffers, *batch)
    except Exception as exc:  # noqa: BLE001 - turned into a TraceError with context
        raise trace_error(exc, "could not trace the evaluation step", None) from exc
    finally:
        traced.train(was_training)
    gm.graph._codegen = fx.graph.CodeGen()
    aliases: dict[str, tuple[str, ...]] = {}
    for names in names_by_tensor(model).values():
        aliases[names[0]] = tuple(names[1:])
    inputs = [InputSpec(PARAM, n, trainable=p.requires_grad, aliases=aliases.get(n, ())) for n, p in params.items()]
    inputs += [InputSpec(BUFFER, n) for n in buffers]
    inputs += [InputSpec(INPUT, f"batch[{i}]", batch_index=i) for i in range(len(batch))]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(inputs), (len(placeholders), len(inputs))
    for spec, node in zip(inputs, placeholders):
        prefix = {PARAM: "p_", BUFFER: "b_"}.get(spec.role, "")
        rename(node, prefix + spec.name if prefix else f"batch_{spec.batch_index}")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    loss = output.args[0]
    output.args = ((loss[0] if isinstance(loss, (tuple, list)) else loss,),)
    drop_runtime_asserts(gm)
    annotate(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    fake_mode = next(n.meta["val"].fake_mode for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor))
    return Captured(gm, Signature(inputs, [OutputSpec(LOSS)]), fake_mode, time.perf_counter() - start)
