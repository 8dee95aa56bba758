"""How a runtime's per-rank state maps onto a checkpoint's logical tensors, and back.

A logical tensor is what a single device would hold: the full, unpadded parameter (or
optimizer state shaped like it). The local runtime holds every rank, so it builds the
full tensor from the shards (undoing ZeRO, then tensor parallelism) and cuts it again
on load for whatever mesh and stage it now has. The distributed runtime holds one rank:
it hands DCP a `Pieces` object, the boxes of the logical tensor its local shard covers
(one box, or several where a tensor-parallel split of fused blocks and a ZeRO split meet
on the same dim; padding rows belong to no box), and DCP moves data between the saved
boxes and the current ones. A piece several ranks hold (a replica) is written by the
first of them only and read by all.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from shardfx.errors import CheckpointError
from shardfx.graphs.placement import ShardSpec, local_shard
from shardfx.runtime.state import RankState, unshard


def global_shape(t: Any) -> tuple[int, ...]:
    return tuple(t.size())  # a Pieces' size is the logical tensor's


View = tuple[Any, list[tuple[int, RankState]]]  # a program and the held ranks that run it


def views(runtime: Any) -> list[View]:
    """The programs this runtime's held ranks run, each with those ranks: one, or one per pipeline
    stage (stages hold different parameters)."""
    stages = getattr(runtime, "stages", None)
    held = runtime.held_states()
    if stages is None:
        return [(runtime.program, held)]
    out: list[View] = []
    for s in range(stages.pipe.stages):
        mine = [(r, st) for r, st in held if runtime.mesh.coords(r)["pp"] == stages.pipe.coord(s)]
        if mine:
            out.append((stages.program(s), mine))
    return out


def collect(runtime: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(logical tensors by checkpoint key, JSON part of the optimizer: groups and non-tensor state)."""
    tensors: dict[str, Tensor] = {}
    extra: dict[str, Any] = {"groups": [], "state": {}}
    params: set[str] = set()
    for program, states in views(runtime):
        first = states[0][1]
        for spec in program.signature.params():
            params.update((spec.name, *spec.aliases))
            if f"model/{spec.name}" not in tensors:
                tensors[f"model/{spec.name}"] = _logical(
                    runtime, program, states, spec.name, lambda st, n=spec.name: st.params[n].detach()
                )
        for name, buf in first.buffers.items():
            tensors.setdefault(f"buffer/{name}", buf)
        if first.optimizer is None:
            continue
        extra["groups"] = extra["groups"] or [
            {k: v for k, v in g.items() if k != "params"} for g in first.optimizer.param_groups
        ]
        mine = {spec.name for spec in program.signature.params()}
        for name, st in optimizer_state(first).items():
            if name not in mine:
                continue  # another stage this rank runs (interleaved): saved with that stage's specs
            shape = first.params[name].shape
            for key, value in st.items():
                if f"optim/{name}/{key}" in tensors:
                    continue  # a tied parameter: saved from its first stage
                if not isinstance(value, Tensor):
                    extra["state"].setdefault(name, {})[key] = value
                elif value.shape == shape and program.specs(name):
                    tensors[f"optim/{name}/{key}"] = _logical(
                        runtime, program, states, name, lambda s, n=name, k=key: optimizer_state(s)[n][k]
                    )
                else:
                    tensors[f"optim/{name}/{key}"] = value
    for name, value in runtime.model.state_dict().items():  # buffers the step never reads: the model's value
        if name not in params and f"buffer/{name}" not in tensors:
            tensors[f"buffer/{name}"] = value.detach()
    return tensors, extra


def template(runtime: Any, saved: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, Tensor]:
    """Empty tensors, laid out as this runtime holds them, for every saved key it can take."""
    holder: dict[str, tuple[Any, list[tuple[int, RankState]]]] = {}
    buffers: set[str] = set()
    optimizer = False
    for program, states in views(runtime):
        for spec in program.signature.params():
            holder.setdefault(spec.name, (program, states))
        buffers.update(states[0][1].buffers)
        optimizer = optimizer or states[0][1].optimizer is not None
    full_shapes = {n: _full_shape(p, st[0][1], n) for n, (p, st) in holder.items()}
    # Under pipeline parallelism a process holds some stages; it takes only their parameters.
    whole = getattr(runtime, "stages", None) is None or not runtime.distributed
    saved_params = {k.split("/", 1)[1] for k in saved if k.startswith("model/")}
    missing = sorted(set(full_shapes) - saved_params)
    extra = sorted(saved_params - set(full_shapes)) if whole else []
    if missing or extra:
        raise CheckpointError(
            f"checkpoint parameters do not match the model: missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    out: dict[str, Tensor] = {}
    for key, (shape, dtype) in saved.items():
        kind, _, rest = key.partition("/")
        name = rest.split("/")[0] if kind == "optim" else rest
        if kind == "buffer" and name not in buffers:
            continue  # a buffer the step does not read keeps the model's value, as in state_dict()
        if kind in ("model", "optim") and name not in holder:
            continue  # another stage's (a process of a pipeline)
        if kind == "optim":
            state = holder[name][1][0][1]
            if not optimizer or state.optimizer is None or not state.params[name].requires_grad:
                continue
        if kind == "model" and shape != full_shapes[name]:
            raise CheckpointError(
                f"checkpoint holds {name} with shape {list(shape)}; the model's is {list(full_shapes[name])}"
            )
        if kind in ("model", "optim") and shape == full_shapes[name] and holder[name][0].specs(name):
            program, states = holder[name]
            out[key] = _empty_logical(runtime, program, states, name, dtype)
        else:
            out[key] = torch.empty(shape, dtype=dtype)
    return out


def restore(runtime: Any, loaded: dict[str, Tensor], extra: dict[str, Any]) -> None:
    """Copy loaded logical tensors into every held rank's parameters, buffers and optimizer."""
    held = getattr(runtime, "held_program", None)  # a pipeline rank's stages, as one program
    for _, state in runtime.held_states():  # before any rank is changed: a refused load changes nothing
        if state.optimizer is not None:
            check_groups(state.optimizer, extra.get("groups", []))
    for rank, state in runtime.held_states():
        _restore_rank(held(rank) if held is not None else runtime.program, rank, state, loaded, extra)


def _restore_rank(program: Any, rank: int, state: RankState, loaded: dict[str, Tensor], extra: dict[str, Any]) -> None:
    coords = program.mesh.coords(rank)

    def local(key: str, name: str) -> Tensor:
        value = loaded[key]
        if isinstance(value, Pieces):
            return value.local  # DCP read this rank's boxes into it; padding rows are zero
        specs = program.specs(name)
        if not specs or value.dim() == 0 or tuple(value.shape) != specs[0].full_shape:
            return value.clone()
        return local_shard(value, specs, coords)

    with torch.no_grad():
        for name, param in state.params.items():
            param.copy_(local(f"model/{name}", name))
        for name, buf in state.buffers.items():
            if f"buffer/{name}" in loaded:
                buf.copy_(loaded[f"buffer/{name}"])
    if state.optimizer is None:
        return
    named: dict[str, dict[str, Any]] = {}
    for key in loaded:
        if key.startswith("optim/"):
            name, item = key[len("optim/") :].rsplit("/", 1)
            if name in state.params:
                named.setdefault(name, {})[item] = local(key, name)
    for name, items in extra.get("state", {}).items():
        if name in state.params:
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
    check_groups(opt, groups)
    for current, saved in zip(sd["param_groups"], groups):
        for key, value in saved.items():
            if key in current and key != "params":  # else a setting this optimizer does not have: it reads none
                current[key] = tuple(value) if isinstance(current[key], tuple) else value
    opt.load_state_dict(sd)


def check_groups(opt: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    """The checkpoint's param group settings fit this optimizer: as many groups, each setting it has of its kind."""
    if groups and len(groups) != len(opt.param_groups):
        raise CheckpointError(
            f"checkpoint has {len(groups)} optimizer param groups; this optimizer has {len(opt.param_groups)}"
        )
    for i, (current, saved) in enumerate(zip(opt.param_groups, groups)):
        for key, value in saved.items():
            if key in current and key != "params" and not _same_kind(current[key], value):
                raise CheckpointError(
                    f"checkpoint's optimizer param group {i} has {key}={value!r}; this optimizer's is "
                    f"{current[key]!r} (a {type(current[key]).__name__})"
                )


def _same_kind(current: Any, saved: Any) -> bool:
    """A saved hyperparameter can stand in for the current one: a number for a number (finite), a bool for a
    bool, a list of as many for a tuple; None and a bool or number for each other (fused=None vs False)."""

    def kind(v: Any) -> str:
        if v is None or isinstance(v, bool) or isinstance(v, str):
            return type(v).__name__
        if isinstance(v, (int, float)):
            return "number" if math.isfinite(v) else "not finite"
        return "list" if isinstance(v, (list, tuple)) else type(v).__name__

    a, b = kind(current), kind(saved)
    if a == "list" and b == "list":
        return len(current) == len(saved) and all(_same_kind(x, y) for x, y in zip(current, saved))
    if "NoneType" in (a, b):
        return {a, b} <= {"NoneType", "bool", "number"}
    return a == b and a != "not finite"


def _full_shape(program: Any, state: RankState, name: str) -> tuple[int, ...]:
    specs = program.specs(name)
    return specs[0].full_shape if specs else tuple(state.params[name].shape)


def _logical(runtime: Any, program: Any, states: list[tuple[int, RankState]], name: str, get: Any) -> Any:
    """The logical tensor of a parameter-shaped value: the full tensor (local) or this rank's Pieces (distributed)."""
    if not program.specs(name):
        return get(states[0][1])
    if not runtime.distributed:
        by_rank = dict(runtime.held_states())
        return unshard(program, name, states[0][0], lambda r: get(by_rank[r]))
    local = get(states[0][1]).detach()
    writes = program.first_holder(name, runtime.rank)  # replicas: one rank writes, every rank reads
    return Pieces(
        _full_shape(program, states[0][1], name), local, _boxes(program, name, runtime.rank) if writes else []
    )


def _empty_logical(
    runtime: Any, program: Any, states: list[tuple[int, RankState]], name: str, dtype: torch.dtype
) -> Any:
    state = states[0][1]
    if not runtime.distributed:
        return torch.empty(_full_shape(program, state, name), dtype=dtype)
    local = torch.zeros(state.params[name].shape, dtype=dtype, device=state.params[name].device)
    return Pieces(_full_shape(program, state, name), local, _boxes(program, name, runtime.rank))


Segment = tuple[int, int, int]  # (local start, global start, length) along one dim


def _boxes(program: Any, name: str, rank: int) -> list[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """(global offsets, local slices) of every box of the logical tensor `rank`'s shard of `name` holds.

    Each dim starts as one segment mapping local to global positions; every shard spec
    (tensor parallel, then ZeRO) keeps the positions this rank's coordinate selects, and
    those map back through the segments so far. Padding positions map to nothing.
    """
    specs = program.specs(name)
    coords = program.mesh.coords(rank)
    segments: list[list[Segment]] = [[(0, 0, n)] for n in specs[0].full_shape]
    for spec in specs:
        selected = _selected(spec, coords[spec.axis])
        segments[spec.dim] = _compose(segments[spec.dim], selected)
    boxes: list[tuple[tuple[int, ...], tuple[slice, ...]]] = [((), ())]
    for dim_segments in segments:
        boxes = [
            (offsets + (g,), slices + (slice(lo, lo + n),))
            for offsets, slices in boxes
            for lo, g, n in dim_segments
            if n > 0
        ]
    return boxes


def _selected(spec: ShardSpec, coord: int) -> list[tuple[int, int]]:
    """(start, length) ranges of the unsharded dim that rank `coord`'s shard holds, in its order."""
    size = spec.full_shape[spec.dim]
    if spec.blocks == 1:
        start = coord * spec.shard_size
        return [(start, max(0, min(spec.shard_size, size - start)))]
    out = []
    block = size // spec.blocks
    for b in range(spec.blocks):  # tensor_split: the first (block % world) ranks get one more
        base, extra = divmod(block, spec.world)
        start = b * block + coord * base + min(coord, extra)
        out.append((start, base + (coord < extra)))
    return out


def _compose(segments: list[Segment], ranges: list[tuple[int, int]]) -> list[Segment]:
    """Map ranges of the current local positions (concatenated in order) to new local segments."""
    out: list[Segment] = []
    new_local = 0
    for start, length in ranges:
        stop = start + length
        for lo, g, n in segments:
            a, b = max(start, lo), min(stop, lo + n)
            if a < b:
                out.append((new_local + a - start, g + a - lo, b - a))
        new_local += length
    return out


class Pieces(torch.Tensor):
    """This rank's part of one logical tensor for DCP: boxes of the global tensor, each a view of `local`.

    A tensor only in name (DCP looks its hooks up on tensors; no op runs on it): it implements
    the hooks DCP uses for DTensor (__create_write_items__, __create_chunk_list__,
    __get_tensor_shard__), a box being a chunk; what DCP reads lands in `local`'s storage.
    """

    shape: torch.Size
    local: Tensor
    _views: dict[tuple[int, ...], Tensor]

    @staticmethod
    def __new__(
        cls, shape: tuple[int, ...], local: Tensor, boxes: list[tuple[tuple[int, ...], tuple[slice, ...]]]
    ) -> Pieces:
        out = torch.Tensor._make_wrapper_subclass(cls, torch.Size(shape), dtype=local.dtype, device=local.device)
        out.local = local
        out._views = {offsets: local[slices] for offsets, slices in boxes}
        return out

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten.detach.default:  # DCP detaches what it is given
            return args[0]
        raise NotImplementedError(f"checkpoint Pieces hold boxes for DCP and run no ops; got {func}")

    def __repr__(self) -> str:  # type: ignore[override]
        return f"Pieces(size={list(self.size())}, boxes={list(self._views)})"

    def _chunk(self, offsets: tuple[int, ...]) -> Any:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=self._views[offsets].shape)

    def __create_write_items__(self, fqn: str, obj: Any) -> list[Any]:
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=self._chunk(offsets), properties=TensorProperties.create_from_tensor(view), size=self.shape
                ),
            )
            for offsets, view in self._views.items()
        ]

    def __create_chunk_list__(self) -> list[Any]:
        return [self._chunk(offsets) for offsets in self._views]

    def __get_tensor_shard__(self, index: Any) -> Tensor:
        return self._views[tuple(index.offset)]
