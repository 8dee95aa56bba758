"""Capture: trace one training step (forward + loss + backward) into one ATen FX graph.

torch.export turns the model and loss into an ATen program (keeping module
paths and source lines), then AOTAutograd's joint export adds the backward.
Descriptors on the joint graph's placeholders and outputs become our typed
Signature; the joint graph is cleaned up so it reads as one training step:

- placeholders are named after what they hold (`p_fc_weight`, `b_bn_running_mean`, `batch_0`);
- the loss tangent is a constant 1 instead of an input;
- tied parameters become one placeholder whose gradient sums every use;
- frozen parameters have no gradient output;
- every node carries `val`, a phase and the nn.Module path it came from.

torch's version is read here and nowhere else (docs/DESIGN.md §3). The forward-only
trace of eval_step is capture_forward.py; the errors both raise, trace_errors.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from shardfx.errors import TraceError
from shardfx.graphs import meta
from shardfx.graphs.signature import (
    BUFFER,
    BUFFER_UPDATE,
    GRAD,
    INPUT,
    LOSS,
    PARAM,
    InputSpec,
    OutputSpec,
    Signature,
)
from shardfx.graphs.trace_errors import ROOT, quiet_torch_logs, trace_error

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
SUPPORTED_TORCH = ((2, 11), (2, 14))


@dataclass
class Captured:
    gm: fx.GraphModule
    signature: Signature
    fake_mode: Any
    seconds: float


class TrainStep(nn.Module):
    """model + loss_fn as one module whose forward returns the scalar loss."""

    def __init__(
        self, model: nn.Module, loss_fn: Callable[..., torch.Tensor] | None, compute_dtype: torch.dtype | None
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.compute_dtype = compute_dtype

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype is not None:  # mixed precision: float inputs in the compute dtype, loss in fp32
            batch = tuple(x.to(self.compute_dtype) if x.is_floating_point() else x for x in batch)
        if self.loss_fn is not None:
            loss = extract_loss(self.loss_fn(self.model(*batch[:-1]), batch[-1]), "the loss_fn")
        else:
            loss = extract_loss(self.model(*batch))
        return loss.float() if self.compute_dtype is not None else loss


class LossError(TraceError, TypeError):
    """What the model or loss_fn returned holds no loss to train on (a TypeError too: a user mistake)."""


def extract_loss(out: Any, who: str = "the model") -> torch.Tensor:
    """The loss from what a model (loss_fn=None) or a loss_fn returns: a tensor; in a tuple or list, its
    first floating-point scalar (HF's (loss, logits), nanoGPT's (logits, loss)), the other elements are
    not trained on; or `.loss`. The same rule with and without a loss_fn."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        scalars = [x for x in out if isinstance(x, torch.Tensor) and x.dim() == 0 and x.is_floating_point()]
        if scalars:
            return scalars[0]
        if who != "the model" or not isinstance(out[0], torch.Tensor):
            kinds = ", ".join(
                type(x).__name__ if not isinstance(x, torch.Tensor) else f"tensor{list(x.shape)}" for x in out
            )
            raise LossError(
                f"{who} returned a {type(out).__name__} ({kinds}) with no floating-point scalar to train on; return "
                "the loss (a scalar tensor), or a tuple whose first scalar is the loss (log other values outside)"
            )
        return out[0]
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if who != "the model":
        raise LossError(f"{who} must return the loss as a scalar tensor; it returned {type(out).__name__}")
    raise LossError(
        f"without a loss_fn the model must return its loss (a tensor, a tuple holding it as its first "
        f"scalar, or an object with .loss); it returned {type(out).__name__}. Pass loss_fn=..."
    )


def capture(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    loss_fn: Callable[..., torch.Tensor] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Captured:
    """Trace one training step of `model` on `example_inputs` into a joint graph with a signature.

    With a compute_dtype (mixed precision), the step is traced on a copy of the model whose
    floating-point parameters have that dtype; buffers keep theirs.
    """
    import time

    if not (SUPPORTED_TORCH[0] <= TORCH_VERSION <= SUPPORTED_TORCH[1]):
        raise RuntimeError(f"shardfx supports torch 2.11 to 2.14; this is torch {torch.__version__}")
    start = time.perf_counter()
    batch = tuple(example_inputs)
    for i, x in enumerate(batch):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"example_inputs[{i}] must be a tensor; got {type(x).__name__}")
    if compute_dtype is not None:
        model = cast_params(model, compute_dtype)
    step = TrainStep(model, loss_fn, compute_dtype)
    exported = _export(step, batch)
    _check_loss(exported)
    with contextlib.ExitStack() as stack:
        try:
            from torch._functorch.aot_autograd import aot_export_joint_with_descriptors

            joint = aot_export_joint_with_descriptors(stack, exported.module(), batch)
        except Exception as exc:  # noqa: BLE001 - turned into a TraceError with context
            raise trace_error(exc, "AOTAutograd could not trace the backward", None, exported.graph) from exc
        gm = joint.graph_module
        fake_mode = joint.fake_mode
    gm.graph._codegen = fx.graph.CodeGen()  # plain positional placeholders, flat tuple output
    signature = _build_signature(gm, model)
    drop_runtime_asserts(gm)
    annotate(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return Captured(gm, signature, fake_mode, time.perf_counter() - start)


def cast_params(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` whose floating-point parameters have `dtype` (ties kept; buffers copied as they
    are). The tensors are made here, not by deepcopy: deepcopy would first copy every parameter at its
    own dtype, and it gives a fake tensor a fake mode of its own (a model built on paper,
    tools/simulate.build_on_paper, would then mix two modes in one trace). Every cast is a copy, also
    of a parameter already in `dtype` (the user's model is never shared); a Parameter subclass comes
    back as nn.Parameter, and tensors held as plain attributes are deepcopied as before."""
    import copy

    memo: dict[int, Any] = {}
    for p in model.parameters():  # each tensor once: a tied one is one entry
        data = p.detach().to(dtype, copy=True) if p.is_floating_point() else p.detach().clone()
        memo[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.clone()
    return copy.deepcopy(model, memo)


def _check_loss(exported: torch.export.ExportedProgram) -> None:
    """Fail early, in plain words, when the loss is not a floating-point scalar."""
    out = next(n for n in exported.graph.nodes if n.op == "output").args[0]
    val = out[0].meta.get("val") if isinstance(out, (tuple, list)) and out else None
    if isinstance(val, torch.Tensor) and (val.dim() != 0 or not val.dtype.is_floating_point):
        raise TypeError(
            f"the loss must be a floating-point scalar; got shape {list(val.shape)} dtype {val.dtype}. "
            "Reduce it (e.g. .mean()) in the model or the loss_fn."
        )


def _export(step: TrainStep, batch: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    stack: list[tuple[str, str]] = []  # (module path, class name) of the modules being run
    hooks = []

    def enter(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            stack.append((name, type(module).__name__))

        return hook

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        stack.pop()

    for name, module in step.model.named_modules():
        hooks.append(module.register_forward_pre_hook(enter(name)))
        hooks.append(module.register_forward_hook(leave))
    try:
        with quiet_torch_logs():
            return torch.export.export(step, batch, strict=False)
    except LossError:
        raise
    except Exception as exc:  # noqa: BLE001 - turned into a TraceError with context
        raise trace_error(exc, "torch.export could not trace the model", stack[-1] if stack else None) from exc
    finally:
        for h in hooks:
            h.remove()


def _descriptor_name(desc: Any) -> str:
    return type(desc).__name__


def _fqn(desc: Any) -> str:
    target = desc.target
    return target[len(ROOT) + 1 :] if target.startswith(ROOT + ".") else target


def _build_signature(gm: fx.GraphModule, model: nn.Module) -> Signature:
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    out_values = list(output.args[0])
    out_descs = list(output.meta["desc"])

    # Tied parameters: every name of one tensor, first name canonical.
    names_of = names_by_tensor(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    canonical = {name: names[0] for names in names_of.values() for name in names}

    loss_node: fx.Node | None = None
    grads: dict[str, list[fx.Node]] = {}
    buffer_updates: dict[str, fx.Node] = {}
    for desc, value in zip(out_descs, out_values):
        kind = _descriptor_name(desc)
        if desc is None or value is None:
            continue
        if kind == "PlainAOTOutput":
            loss_node = value
        elif kind == "GradAOTOutput" and _descriptor_name(desc.grad_of) == "ParamAOTInput":
            grads.setdefault(canonical[_fqn(desc.grad_of)], []).append(value)
        elif kind == "InputMutationAOTOutput" and _descriptor_name(desc.mutated_input) == "BufferAOTInput":
            buffer_updates[_fqn(desc.mutated_input)] = value
        else:
            raise TraceError(f"the training step writes to something shardfx cannot route back: {desc}")
    assert loss_node is not None, "the joint graph has no loss output"

    param_node: dict[str, fx.Node] = {}
    inputs: list[tuple[InputSpec, fx.Node]] = []
    for node in placeholders:
        desc = node.meta["desc"]
        kind = _descriptor_name(desc)
        if kind == "ParamAOTInput":
            name = canonical[_fqn(desc)]
            if name in param_node:  # a second placeholder of a tied parameter
                node.replace_all_uses_with(param_node[name])
                graph.erase_node(node)
                continue
            param_node[name] = node
            aliases = tuple(n for n in names_of[id(params[name])] if n != name)
            spec = InputSpec(PARAM, name, trainable=params[name].requires_grad, aliases=aliases)
            inputs.append((spec, node))
            rename(node, "p_" + name)
        elif kind == "BufferAOTInput":
            name = _fqn(desc)
            inputs.append((InputSpec(BUFFER, name), node))
            rename(node, "b_" + name)
        elif kind == "PlainAOTInput":
            inputs.append((InputSpec(INPUT, f"batch[{desc.idx}]", batch_index=desc.idx), node))
            rename(node, f"batch_{desc.idx}")
        elif kind == "TangentAOTInput":
            with graph.inserting_after(loss_node):
                one = graph.call_function(torch.ops.aten.ones_like.default, (loss_node,))
            one.meta["val"] = loss_node.meta["val"]
            one.meta["partitioner_tag"] = "is_backward"
            one.meta[meta.ROLE] = meta.LOSS_SEED
            node.replace_all_uses_with(one)
            graph.erase_node(node)
        else:
            raise TraceError(f"unsupported graph input {desc}", node)

    outputs: list[OutputSpec] = [OutputSpec(LOSS)]
    values: list[fx.Node] = [loss_node]
    for spec, _ in inputs:
        if spec.role == PARAM and spec.name in grads:
            parts = grads[spec.name]
            total = parts[0]
            for extra in parts[1:]:  # tied uses that AOTAutograd did not already sum
                with graph.inserting_before(output):
                    total = graph.call_function(torch.ops.aten.add.Tensor, (total, extra))
                total.meta["val"] = parts[0].meta["val"]
                total.meta["partitioner_tag"] = "is_backward"
            outputs.append(OutputSpec(GRAD, spec.name))
            values.append(total)
    for spec, _ in inputs:
        if spec.role == BUFFER and spec.name in buffer_updates:
            outputs.append(OutputSpec(BUFFER_UPDATE, spec.name))
            values.append(buffer_updates[spec.name])
    output.args = (tuple(values),)
    output.meta.pop("desc", None)
    for _, node in inputs:
        node.meta.pop("desc", None)
    return Signature([s for s, _ in inputs], outputs)


_ASSERTS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
}


def drop_runtime_asserts(gm: fx.GraphModule) -> None:
    """export's dtype/shape asserts hold by construction for our static graph; they carry no value."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            gm.graph.erase_node(node)


def rename(node: fx.Node, name: str) -> None:
    node._rename(name.replace(".", "_"))
    node.target = node.name


def annotate(gm: fx.GraphModule) -> None:
    """phase, module path and origin on every node."""
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        tag = node.meta.get("partitioner_tag")
        if node.op == "placeholder":
            node.meta[meta.PHASE] = meta.FORWARD
        else:
            node.meta[meta.PHASE] = meta.BACKWARD if tag == "is_backward" else meta.FORWARD
        stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        if path.startswith(ROOT + "."):
            path = path[len(ROOT) + 1 :]
        elif path == ROOT:
            path = ""
        node.meta[meta.MODULE] = path
        node.meta[meta.ORIGIN] = "capture"


def names_by_tensor(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names
