"""How a runtime's per-rank state maps onto a checkpoint's logical tensors, and back.

A logical tensor is what a single device would hold: the full, unpadded parameter (or
optimizer state shaped like it). The local runtime holds every rank, so it builds the
full tensor from the shards (ShardSpec.unshard) and cuts it again on load
(ShardSpec.shard) for whatever world size and stage it now has. The distributed runtime
holds one rank: it wraps its unpadded rows in a DTensor sharded on dim `shard.dim`
(ShardSpec shards are torch.chunk's: ceil(n / world) rows a rank, the last ranks
short or empty), and DCP moves rows between the saved and the current layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from shardfx.graphs.placement import ShardSpec
from shardfx.runtime.state import RankState


def is_distributed(runtime: Any) -> bool:
    return not hasattr(runtime, "states")


def held_states(runtime: Any) -> list[tuple[int, RankState]]:
    """(rank, state) of every rank this process holds."""
    if is_distributed(runtime):
        return [(runtime.rank, runtime.state)]
    return list(enumerate(runtime.states))


def global_shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)  # a DTensor's shape is already the global one


def collect(runtime: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(logical tensors by checkpoint key, JSON part of the optimizer: groups and non-tensor state)."""
    program = runtime.program
    states = held_states(runtime)
    first = states[0][1]
    tensors: dict[str, Tensor] = {}
    for spec in program.signature.params():
        tensors[f"model/{spec.name}"] = _logical(runtime, spec.name, lambda st, n=spec.name: st.params[n].detach())
    for name, buf in first.buffers.items():
        tensors[f"buffer/{name}"] = buf
    params = {n for s in program.signature.params() for n in (s.name, *s.aliases)}
    for name, value in runtime.model.state_dict().items():  # buffers the step never reads: the model's value
        if name not in params and f"buffer/{name}" not in tensors:
            tensors[f"buffer/{name}"] = value.detach()
    extra: dict[str, Any] = {"groups": [], "state": {}}
    if first.optimizer is None:
        return tensors, extra
    extra["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in first.optimizer.param_groups]
    for name, st in optimizer_state(first).items():
        shape = first.params[name].shape
        for key, value in st.items():
            if not isinstance(value, Tensor):
                extra["state"].setdefault(name, {})[key] = value
            elif value.shape == shape and name in program.shard_specs:
                tensors[f"optim/{name}/{key}"] = _logical(
                    runtime, name, lambda s, n=name, k=key: optimizer_state(s)[n][k]
                )
            else:
                tensors[f"optim/{name}/{key}"] = value
    return tensors, extra


def template(runtime: Any, saved: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, Tensor]:
    """Empty tensors, laid out as this runtime holds them, for every saved key it can take."""
    program = runtime.program
    first = held_states(runtime)[0][1]
    full_shapes = {s.name: _full_shape(program, first, s.name) for s in program.signature.params()}
    saved_params = {k.split("/", 1)[1] for k in saved if k.startswith("model/")}
    missing, extra = sorted(set(full_shapes) - saved_params), sorted(saved_params - set(full_shapes))
    if missing or extra:
        raise ValueError(
            f"checkpoint parameters do not match the model: missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    out: dict[str, Tensor] = {}
    for key, (shape, dtype) in saved.items():
        kind, _, rest = key.partition("/")
        name = rest.split("/")[0] if kind == "optim" else rest
        if kind == "buffer" and name not in first.buffers:
            continue  # a buffer the step does not read keeps the model's value, as in state_dict()
        if kind == "optim" and (first.optimizer is None or not first.params[name].requires_grad):
            continue
        if kind == "model" and shape != full_shapes[name]:
            raise ValueError(
                f"checkpoint holds {name} with shape {list(shape)}; the model's is {list(full_shapes[name])}"
            )
        if kind in ("model", "optim") and shape == full_shapes[name] and name in program.shard_specs:
            out[key] = _empty_logical(runtime, program.shard_specs[name], dtype)
        else:
            out[key] = torch.empty(shape, dtype=dtype)
    return out


def restore(runtime: Any, loaded: dict[str, Tensor], extra: dict[str, Any]) -> None:
    """Copy loaded logical tensors into every held rank's parameters, buffers and optimizer."""
    program = runtime.program
    for rank, state in held_states(runtime):
        coords = program.mesh.coords(rank)

        def local(key: str, name: str, coords: dict[str, int] = coords) -> Tensor:
            shard = program.shard_specs.get(name)
            value = loaded[key]
            if shard is None or value.dim() == 0 or tuple(value.shape) != shard.full_shape:
                return value.clone()
            return _local_shard(value, shard, coords[shard.axis])

        with torch.no_grad():
            for name, param in state.params.items():
                param.copy_(local(f"model/{name}", name))
            for name, buf in state.buffers.items():
                if f"buffer/{name}" in loaded:
                    buf.copy_(loaded[f"buffer/{name}"])
        if state.optimizer is None:
            continue
        named: dict[str, dict[str, Any]] = {}
        for key in loaded:
            if key.startswith("optim/"):
                name, item = key[len("optim/") :].rsplit("/", 1)
                named.setdefault(name, {})[item] = local(key, name)
        for name, items in extra.get("state", {}).items():
            named.setdefault(name, {}).update(items)
        load_optimizer(state, named, extra.get("groups", []))


def optimizer_state(state: RankState) -> dict[str, dict[str, Any]]:
    """The optimizer's per-parameter state, keyed by parameter name instead of tensor."""
    assert state.optimizer is not None
    names = {id(p): n for n, p in state.params.items()}
    return {names[id(p)]: st for p, st in state.optimizer.state.items()}


def load_optimizer(state: RankState, named: dict[str, dict[str, Any]], groups: list[dict[str, Any]]) -> None:
    """Hand per-name optimizer state and saved group hyperparameters to the optimizer's load_state_dict."""
    opt = state.optimizer
    assert opt is not None
    sd = opt.state_dict()
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    sd["state"] = {index[id(state.params[n])]: st for n, st in named.items()}
    if groups and len(groups) != len(sd["param_groups"]):
        raise ValueError(
            f"checkpoint has {len(groups)} optimizer param groups; this optimizer has {len(sd['param_groups'])}"
        )
    for current, saved in zip(sd["param_groups"], groups):
        for key, value in saved.items():
            current[key] = tuple(value) if isinstance(current.get(key), tuple) else value
    opt.load_state_dict(sd)


def _full_shape(program: Any, state: RankState, name: str) -> tuple[int, ...]:
    shard = program.shard_specs.get(name)
    return shard.full_shape if shard is not None else tuple(state.params[name].shape)


def _logical(runtime: Any, name: str, get: Any) -> Tensor:
    """The full logical tensor of a parameter-shaped value: concatenated (local) or a DTensor (distributed)."""
    program = runtime.program
    shard = program.shard_specs.get(name)
    states = held_states(runtime)
    if shard is None:
        return get(states[0][1])
    if not is_distributed(runtime):
        group = program.mesh.group(0, shard.axis)
        return shard.unshard([get(runtime.states[r]) for r in group])
    coord = program.mesh.coords(runtime.rank)[shard.axis]
    rows = _rows(shard, coord)[1]
    return _dtensor(runtime, get(states[0][1]).narrow(shard.dim, 0, rows).contiguous(), shard)


def _empty_logical(runtime: Any, shard: ShardSpec, dtype: torch.dtype) -> Tensor:
    if not is_distributed(runtime):
        return torch.empty(shard.full_shape, dtype=dtype)
    coord = runtime.program.mesh.coords(runtime.rank)[shard.axis]
    shape = list(shard.full_shape)
    shape[shard.dim] = _rows(shard, coord)[1]
    return _dtensor(runtime, torch.empty(shape, dtype=dtype), shard)


def _local_shard(value: Tensor, shard: ShardSpec, coord: int) -> Tensor:
    """This rank's padded shard from a full tensor (local) or a DTensor over unpadded rows (distributed)."""
    if not hasattr(value, "to_local"):
        return shard.shard(value, coord)
    piece = value.to_local()
    out = piece.new_zeros(shard.shard_shape)
    out.narrow(shard.dim, 0, piece.shape[shard.dim]).copy_(piece)
    return out


def _rows(shard: ShardSpec, coord: int) -> tuple[int, int]:
    """(first row, number of real rows) of rank `coord`'s shard, padding excluded."""
    start = coord * shard.shard_size
    return start, max(0, min(shard.shard_size, shard.full_shape[shard.dim] - start))


def _dtensor(runtime: Any, local: Tensor, shard: ShardSpec) -> Tensor:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Shard as DShard

    mesh = runtime.program.mesh
    if mesh.names != (shard.axis,):
        raise NotImplementedError(f"distributed checkpoints support a mesh with one axis; this one has {mesh.names}")
    device_mesh = getattr(runtime, "_checkpoint_mesh", None)
    if device_mesh is None:
        device_type = "cuda" if local.is_cuda else "cpu"
        device_mesh = init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=(shard.axis,))
        runtime._checkpoint_mesh = device_mesh
    full = torch.Size(shard.full_shape)
    stride = torch.empty(full, device="meta").stride()
    return DTensor.from_local(local, device_mesh, [DShard(shard.dim)], run_check=False, shape=full, stride=stride)
