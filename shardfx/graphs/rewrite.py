"""Helpers that passes use to add nodes, each new node with `val`, phase, module and origin.

`insert_call` adds one op; `inline` traces a small Python function of torch
ops (collectives included) at the shapes of its argument nodes and splices
the resulting ATen nodes into the graph, so a pass can write its rewrite as
ordinary tensor code.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from shardfx.graphs import collectives, meta
from shardfx.graphs.program import DistProgram


def _val(arg: Any) -> Any:
    return arg.meta["val"] if isinstance(arg, fx.Node) else arg


def insert_call(
    program: DistProgram,
    target: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    provenance: fx.Node,
    origin: str,
    val: Any = None,
) -> fx.Node:
    """Add `target(*args)` at the graph's current insertion point, with `val` computed on fake
    tensors (or the `val` given, when the caller knows it: a fake call costs milliseconds)."""
    kwargs = kwargs or {}
    node = program.graph.call_function(target, args, kwargs)
    if val is None:
        with program.fake_mode, collectives.mesh_sizes(dict(program.mesh.axes)):
            val = target(*fx.map_arg(args, _val), **fx.map_arg(kwargs, _val))
    node.meta["val"] = val
    meta.copy_provenance(provenance, node, origin)
    return node


def add_input(
    program: DistProgram, name: str, val: Any, role: str, target: str, *, provenance: fx.Node, origin: str
) -> fx.Node:
    """A new placeholder after the last one, with its signature entry (role, target) and `val`."""
    from shardfx.graphs.signature import InputSpec

    with program.graph.inserting_after(program.placeholders()[-1]):
        node = program.graph.placeholder(name)
    node.meta["val"] = val
    meta.copy_provenance(provenance, node, origin)
    node.meta[meta.PHASE] = meta.FORWARD  # inputs exist from the start of the step
    node.meta[meta.ROLE] = role
    node.meta[meta.TARGET] = target
    program.signature.inputs.append(InputSpec(role, target))
    return node


def add_gradient_input(
    program: DistProgram,
    prefix: str,
    grad: fx.Node,
    target: str,
    role: str,
    *,
    origin: str,
    dtype: torch.dtype | None = None,
) -> fx.Node:
    """A placeholder shaped like `grad`, the gradient of parameter `target` (in `dtype`, None: the
    gradient's), named `prefix` + the parameter's name, with signature role `role`."""
    from shardfx.graphs.signature import PARAM

    param = program.placeholders()[program.signature.input_index(PARAM, target)]
    val = grad.meta["val"]
    with program.fake_mode:
        like = torch.empty(val.shape, dtype=dtype or val.dtype, device=val.device)
    name = prefix + param.name.removeprefix("p_")
    return add_input(program, name, like, role, target, provenance=param, origin=origin)


def inline(
    program: DistProgram,
    fn: Callable[..., Any],
    args: Sequence[fx.Node | None],
    *,
    provenance: fx.Node,
    origin: str,
    key: Hashable | None = None,
) -> list[fx.Node | None]:
    """Trace `fn(*args)` to ATen and insert its nodes at the current insertion point.

    Returns the nodes for fn's outputs (a tensor or a tuple of tensors/None). `key`: everything
    besides its arguments' shapes, dtypes and strides that fn's trace depends on (the values
    it closes over); with a key, a trace is made once per key and argument layout and reused
    (a pass rewriting every block of a deep model the same way traces once).
    """
    graph = program.graph
    fake_args = [a.meta["val"] if a is not None else None for a in args]
    cache = _TRACES.setdefault(program.fake_mode, {}) if key is not None else {}
    layout = (key, tuple(program.mesh.axes), tuple(_layout(v) for v in fake_args))
    sub = cache.get(layout) if key is not None else None
    if sub is None:
        with program.fake_mode, collectives.mesh_sizes(dict(program.mesh.axes)):
            sub = make_fx(fn, tracing_mode="real")(*fake_args)
        if key is not None:
            cache[layout] = sub
    env: dict[fx.Node, Any] = {}
    placeholders = iter(args)
    result: list[fx.Node | None] = []
    for node in sub.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "output":
            outs = node.args[0]
            outs = outs if isinstance(outs, (tuple, list)) else [outs]
            result = [fx.map_arg(o, lambda n: env[n]) if o is not None else None for o in outs]
        elif node.op == "call_function":
            new = graph.node_copy(node, lambda n: env[n])
            new.meta = {"val": node.meta.get("val")}
            meta.copy_provenance(provenance, new, origin)
            env[node] = new
        else:
            raise AssertionError(f"unexpected {node.op} in traced rewrite")
    return result


# fake mode -> {(key, mesh, argument layouts): traced GraphModule}; vals of one fake mode only
_TRACES: weakref.WeakKeyDictionary[Any, dict[Hashable, fx.GraphModule]] = weakref.WeakKeyDictionary()


def _layout(val: Any) -> Hashable:
    if not isinstance(val, torch.Tensor):
        return repr(val)
    return (tuple(val.shape), tuple(val.stride()), val.storage_offset(), val.dtype, val.device, val.requires_grad)


def restore_order(graph: fx.Graph) -> int:
    """Move every node that reads a value defined after it to just after its last input, keeping
    the graph's order otherwise (a stable topological sort). A rewrite that puts one value in
    place of several (a bucket's collective after its last member) leaves the members' early
    readers before it. Returns the nodes moved."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    if all(position[a] < position[n] for n in graph.nodes for a in n.all_input_nodes):
        return 0
    placed: set[fx.Node] = set()
    waiting: dict[fx.Node, list[fx.Node]] = {}  # input not yet placed -> nodes held back for it
    order: list[fx.Node] = []

    def place(first: fx.Node) -> None:
        ready = [first]
        while ready:
            node = ready.pop()
            missing = next((a for a in node.all_input_nodes if a not in placed), None)
            if missing is not None:
                waiting.setdefault(missing, []).append(node)
                continue
            order.append(node)
            placed.add(node)
            ready.extend(reversed(waiting.pop(node, [])))  # in their original order

    for node in list(graph.nodes):
        place(node)
    assert not waiting, f"a cycle through {next(iter(waiting)).name}"
    moved = sum(1 for i, n in enumerate(order) if position[n] != i)
    previous = order[0]
    for node in order[1:]:
        if node.prev is not previous:
            previous.append(node)
        previous = node
    return moved


def replace_tuple_node(node: fx.Node, values: Sequence[fx.Node | None]) -> None:
    """Point every `getitem(node, i)` user at values[i], then drop node and its getitems."""
    graph = node.graph
    for user in list(node.users):
        assert user.target is operator.getitem, user.format_node()
        index = user.args[1]
        replacement = values[index]
        assert replacement is not None, f"output {index} of {node.name} is used but was not computed"
        user.replace_all_uses_with(replacement)
        graph.erase_node(user)
    graph.erase_node(node)


def used_outputs(node: fx.Node) -> set[int]:
    """Indices of a tuple-valued node's outputs that something reads."""
    return {u.args[1] for u in node.users}


def refresh_val(program: DistProgram, node: fx.Node) -> None:
    """Recompute a node's `val` after its inputs changed shape or dtype."""
    with program.fake_mode, collectives.mesh_sizes(dict(program.mesh.axes)):
        node.meta["val"] = node.target(*fx.map_arg(node.args, _val), **fx.map_arg(node.kwargs, _val))
