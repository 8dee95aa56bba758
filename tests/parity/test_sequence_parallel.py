"""Sequence parallelism (Megatron-SP) on Hugging Face models: exact against eager, each block's
all-reduce a reduce-scatter plus an all-gather (the same bytes), the activations between the blocks
split along the sequence."""

from __future__ import annotations

import copy

import pytest

import shardfx
from shardfx.graphs import collectives, meta
from tests.hf_models import BATCH, SEQ, batch, build, lm_loss, sgd
from tests.parity_util import assert_parity

HIDDEN = 32


def compiled(name: str, sequence_parallel: bool):  # type: ignore[no-untyped-def]
    engine = shardfx.compile_distributed(
        build(name), 2, example_inputs=batch(), loss_fn=lm_loss, optimizer=sgd,
        config=shardfx.Config(tp_size=2, sequence_parallel=sequence_parallel),
    )  # fmt: skip
    engine.runtime.close()
    return engine.program


def stream_collectives(program, nodes=None) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """tp collectives of the residual stream's (B, L, E) values: kind -> bytes (the ZeRO paper's unit)."""
    out: dict[str, int] = {}
    for node in program.graph.nodes if nodes is None else nodes:
        if not (collectives.is_collective(node) and node.meta.get(meta.ROLE) == meta.TP_REDISTRIBUTE):
            continue
        src, val = node.args[0].meta["val"], node.meta["val"]
        full = max(src.numel(), val.numel())
        if full != BATCH * SEQ * HIDDEN:
            continue
        kind = collectives.kind(node)
        nbytes = collectives.volume_bytes(kind, src.numel() * src.element_size(), val.numel() * val.element_size())
        out[kind] = out.get(kind, 0) + nbytes
    return out


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "t5", "bert"])
def test_sequence_parallel_trains_as_eager(name: str) -> None:
    config = shardfx.Config(tp_size=2, sequence_parallel=True)
    engine = assert_parity(build(name), batch(), lm_loss, 2, config, steps=3, optimizer=sgd, rtol=1e-4)
    stats = next(r.stats for r in engine.pass_records if r.name == "tensor_parallel")
    assert stats["sequence_parallel"] == SEQ
    # forward: no all-reduce of the stream is left (GPT-2's and BERT's rowwise biases included):
    # each is a reduce-scatter and, before the next Linears, an all-gather
    forward = [n for n in engine.program.graph.nodes if n.op == "call_function" and meta.phase(n) == meta.FORWARD]
    assert set(stream_collectives(engine.program, forward)) == {"reduce_scatter", "all_gather"}


def test_each_all_reduce_becomes_a_reduce_scatter_and_an_all_gather_of_the_same_bytes() -> None:
    plain, split = compiled("llama-gqa", False), compiled("llama-gqa", True)
    counts: dict[tuple[str, str], int] = {}
    for node in split.graph.nodes:
        if collectives.is_collective(node) and node.meta.get(meta.ROLE) == meta.TP_REDISTRIBUTE:
            key = (meta.phase(node), collectives.kind(node))
            counts[key] = counts.get(key, 0) + 1
    # forward, per block (2): 2 reduce-scatters and 2 all-gathers; the embedding's sum and the head's
    # input one more each. Backward: the same reduce-scatters; all-gathers of the incoming gradient
    # (2 per block) and, as Megatron-SP, again of the inputs the weight gradients read (2 per block,
    # the head's), so that only the split activations are kept; and the embedding's gradient.
    assert counts[("forward", "reduce_scatter")] == counts[("forward", "all_gather")] == 2 * 2 + 1
    assert counts[("backward", "reduce_scatter")] == 2 * 2 + 1
    assert counts[("backward", "all_gather")] == 2 * 2 + 2 * 2 + 1 + 1

    def phase(program, name):  # type: ignore[no-untyped-def]
        nodes = [n for n in program.graph.nodes if n.op == "call_function" and meta.phase(n) == name]
        return stream_collectives(program, nodes)

    # all-reduce = reduce-scatter + all-gather: 2(N-1)/N of the tensor either way
    forward = phase(split, "forward")
    assert forward["reduce_scatter"] + forward["all_gather"] == phase(plain, "forward")["all_reduce"]
    backward, regathers = phase(split, "backward"), (2 * 2 + 1) * BATCH * SEQ * HIDDEN * 4
    assert backward["reduce_scatter"] + backward["all_gather"] == phase(plain, "backward")["all_reduce"] + regathers


def test_activations_between_the_blocks_are_split_along_the_sequence() -> None:
    """The norms' forward values (the stream between blocks): half the bytes per rank at tp=2."""

    def norm_bytes(program) -> int:  # type: ignore[no-untyped-def]
        total = 0
        for node in program.graph.nodes:
            val = node.meta.get("val")
            if (
                node.op == "call_function"
                and meta.phase(node) == meta.FORWARD
                and "norm" in node.meta.get(meta.MODULE, "")
                and hasattr(val, "numel")
            ):
                total += val.numel() * val.element_size()
        return total

    plain, split = norm_bytes(compiled("llama-gqa", False)), norm_bytes(compiled("llama-gqa", True))
    assert split * 2 == plain


def test_sequence_parallel_needs_tensor_parallel_ranks() -> None:
    with pytest.raises(ValueError, match="needs tp_size > 1"):
        shardfx.Config(sequence_parallel=True)
    with pytest.raises(TypeError, match="must be a bool"):
        shardfx.Config(tp_size=2, sequence_parallel="yes")


def test_a_sequence_that_does_not_divide_runs_without_and_says_why() -> None:
    ids, targets = (x[:, :11] for x in batch())
    logs: list[str] = []
    engine = shardfx.compile_distributed(
        copy.deepcopy(build("llama-gqa")), 2, example_inputs=(ids, targets), loss_fn=lm_loss, optimizer=sgd,
        config=shardfx.Config(tp_size=2, sequence_parallel=True), log=logs.append,
    )  # fmt: skip
    engine.runtime.close()
    assert any("sequence parallelism off: the sequence length 11 does not divide by tp=2" in line for line in logs)
