"""Gradient accumulation: parity with eager training on the whole batch, one reduction per optimizer step.

Config(grad_accum_steps=k) with grad_accum_sync="boundary" (the default) compiles a "keep"
variant (micro-batches 1..k-1: gradients added to per-rank accumulators, nothing reduced)
and a "reduce" variant (micro-batch k: the sum reduced once). "micro_batch" reduces every
micro-batch. Both must train exactly as eager training on the stacked batch does.
"""

from __future__ import annotations

import copy

import pytest
import torch

import shardfx
from shardfx import Config
from shardfx.graphs import collectives, meta
from shardfx.models import gpt_loss
from tests.fixtures import BF16_LOSS_RTOL as LOSS_RTOL
from tests.fixtures import gpt_batch, tiny_gpt
from tests.parity_util import ATOL, RTOL, adamw, eager_train

K = 3  # micro-batches per optimizer step
BATCH = gpt_batch(12)  # one optimizer step's batch: K micro-batches of 4 rows


def micro(batch: tuple) -> tuple:
    return tuple(x[: x.shape[0] // K] for x in batch)


def accumulating_engine(world_size: int, **config) -> shardfx.Engine:
    return shardfx.compile_distributed(
        tiny_gpt(),
        world_size,
        example_inputs=micro(BATCH),
        loss_fn=gpt_loss,
        optimizer=adamw,
        config=Config(grad_accum_steps=K, **config),
    )


def train(engine: shardfx.Engine, steps: int = 4) -> tuple[torch.Tensor, dict]:
    losses = torch.stack([engine.train_step(*BATCH) for _ in range(steps)])
    return losses, engine.state_dict()


def assert_matches_eager(engine: shardfx.Engine, rtol: float = RTOL, atol: float = ATOL) -> None:
    ref_losses, ref_state = eager_train(tiny_gpt(), BATCH, gpt_loss, 4)
    losses, state = train(engine)
    torch.testing.assert_close(losses, ref_losses, rtol=rtol, atol=atol)
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("sync", ["boundary", "micro_batch"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_accumulation_trains_as_eager_on_the_whole_batch(stage: int, sync: str) -> None:
    assert_matches_eager(accumulating_engine(2, zero_stage=stage, grad_accum_sync=sync))


@pytest.mark.parametrize("stage", [1, 3])  # ZeRO-1: tp slices gathered once, kept as replicas
def test_accumulation_with_tensor_parallel_bucketing_and_overlap(stage: int) -> None:
    assert_matches_eager(accumulating_engine(4, zero_stage=stage, tp_size=2, bucket_mb=0.01, overlap=True))


def grad_syncs(program) -> int:
    return sum(1 for n in program.graph.nodes if n.meta.get(meta.ROLE) == "grad_sync")


def count(program, role: str) -> int:
    return sum(1 for n in program.graph.nodes if n.meta.get(meta.ROLE) == role)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gradients_are_reduced_once_per_optimizer_step(stage: int) -> None:
    """Only "last" reduces gradients, with a plain step's collectives; ZeRO-1/2 gather only in "first"."""
    plain = shardfx.compile_distributed(
        tiny_gpt(), 2, example_inputs=BATCH, loss_fn=gpt_loss, optimizer=adamw, config=Config(zero_stage=stage)
    )
    engines = {
        sync: accumulating_engine(2, zero_stage=stage, grad_accum_sync=sync) for sync in ("boundary", "micro_batch")
    }
    variants = engines["boundary"].programs()
    if stage in (1, 2):
        assert set(variants) == {"first", "middle", "last"}
        assert count(variants["first"], "param_gather") == count(plain.program, "param_gather") > 0
        assert count(variants["middle"], "param_gather") == count(variants["last"], "param_gather") == 0
    else:
        assert set(variants) == {"middle", "last"}
    assert count(variants["middle"], "grad_sync") == count(variants.get("first", variants["middle"]), "grad_sync") == 0
    assert count(variants["last"], "grad_sync") == count(plain.program, "grad_sync") > 0
    plain.train_step(*BATCH)
    volume = {"plain": plain.stats()["comm"]["volume"]}
    for sync, engine in engines.items():
        engine.train_step(*BATCH)
        volume[sync] = engine.stats()["comm"]["volume"]  # summed over the K micro-batches
    # Under ZeRO-0 the all-reduces also carry the scalar loss: once per micro-batch.
    loss_volume = collectives.volume_bytes("all_reduce", 4, 4)
    if stage == 0:
        grads = volume["plain"]["all_reduce"] - loss_volume
        assert volume["boundary"]["all_reduce"] == grads + K * loss_volume
        assert volume["micro_batch"]["all_reduce"] == K * (grads + loss_volume)
        return
    assert volume["boundary"]["reduce_scatter"] == volume["plain"]["reduce_scatter"]
    assert volume["micro_batch"]["reduce_scatter"] == K * volume["plain"]["reduce_scatter"]
    # ZeRO-1/2 gather once per optimizer step; ZeRO-3 gathers around every use, every micro-batch.
    gathers = volume["plain"]["all_gather"] * (K if stage == 3 else 1)
    assert volume["boundary"]["all_gather"] == volume["micro_batch"]["all_gather"] == gathers


def after_each_micro_batch(engine: shardfx.Engine):
    """One optimizer step in DeepSpeed's loop: (micro-batch index, every rank's state) after each micro-batch."""
    for i in range(K):
        loss = engine(*micro(BATCH))
        engine.backward(loss)
        engine.step()
        yield i, engine.runtime.states


def full_shapes(state) -> dict[str, tuple[int, ...]]:
    """The unsharded shape of every parameter the rank holds a piece of."""
    return {name: tuple(p.shape) for name, p in tiny_gpt().named_parameters() if name in state.params}


@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_keeps_the_gathered_replicas_until_the_optimizer_steps(stage: int) -> None:
    for i, states in after_each_micro_batch(accumulating_engine(2, zero_stage=stage)):
        for state in states:
            kept = {n: tuple(t.shape) for n, t in state.replicas.items()}
            assert kept == (full_shapes(state) if i < K - 1 else {})


def test_accumulators_hold_full_local_gradients_until_the_boundary() -> None:
    engine = accumulating_engine(2, zero_stage=3)
    for i, states in after_each_micro_batch(engine):
        for state in states:
            if i < K - 1:  # unreduced, unsharded: the whole parameter's shape on every rank
                assert {n: tuple(t.shape) for n, t in state.grad_acc.items()} == full_shapes(state)
                assert all(p.grad is None for p in state.params.values())
            else:  # reduced at the boundary, consumed by the optimizer step
                assert state.grad_acc == {}
    assert engine.steps == 1 and engine.micro_steps == K
    params = sum(p.numel() * 4 for p in tiny_gpt().parameters())  # tied: counted once
    assert engine.stats()["grad_accum_bytes"] == params
    assert accumulating_engine(2, zero_stage=3, grad_accum_sync="micro_batch").stats()["grad_accum_bytes"] == 0


def test_deepspeed_loop_equals_train_step_under_accumulation() -> None:
    a, b = accumulating_engine(2, zero_stage=2), accumulating_engine(2, zero_stage=2)
    for _ in range(2):
        losses = []
        for part in zip(*(torch.chunk(x, K) for x in BATCH)):
            loss = a(*part)
            a.backward(loss)
            a.step()
            losses.append(loss)
        assert torch.equal(torch.stack(losses).mean(), b.train_step(*BATCH))
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value)


@pytest.mark.parametrize(("stage", "reduce_dtype"), [(3, "fp32"), (3, "bf16"), (2, "fp32")])
def test_bf16_accumulates_in_fp32_and_reduces_in_reduce_dtype(stage: int, reduce_dtype: str) -> None:
    engine = accumulating_engine(2, zero_stage=stage, mixed_precision="bf16", reduce_dtype=reduce_dtype)
    keep, reduce = engine.programs()["middle"], engine.programs()["last"]
    for program in (keep, reduce):
        accs = [n for n in program.placeholders() if n.meta.get(meta.ROLE) == "grad_acc"]
        assert accs and all(n.meta["val"].dtype == torch.float32 for n in accs)
    syncs = [n for n in reduce.graph.nodes if n.meta.get(meta.ROLE) == "grad_sync"]
    want = torch.float32 if reduce_dtype == "fp32" else torch.bfloat16
    assert syncs and all(n.meta["val"].dtype == want for n in syncs)
    if stage == 2:  # the replicas are kept as gathered: in bf16
        replicas = [n for n in keep.placeholders() if n.meta.get(meta.ROLE) == "replica"]
        assert replicas and all(n.meta["val"].dtype == torch.bfloat16 for n in replicas)
    ref_losses, _ = eager_train(tiny_gpt(), BATCH, gpt_loss, 4)
    losses, state = train(engine)
    assert ((losses - ref_losses).abs() / ref_losses).max() < LOSS_RTOL


def test_clipping_at_the_boundary_uses_the_whole_steps_gradient() -> None:
    """With accumulation the clip runs on the averaged sum of the K micro-batches, as eager clipping does."""
    ref_losses, ref_state = eager_train(tiny_gpt(), BATCH, gpt_loss, 4, grad_clip=0.05)
    losses, state = train(accumulating_engine(2, zero_stage=1, grad_clip=0.05))
    torch.testing.assert_close(losses, ref_losses, rtol=RTOL, atol=ATOL)
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=RTOL, atol=ATOL)


def test_a_nan_in_an_early_micro_batch_skips_the_step_and_does_not_leak_into_the_next() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g))

    def mlp_engine() -> shardfx.Engine:
        return shardfx.compile_distributed(
            copy.deepcopy(model),
            2,
            example_inputs=tuple(x[:4] for x in batch),
            loss_fn=torch.nn.functional.mse_loss,
            optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
            config=Config(zero_stage=2, grad_accum_steps=2),
        )

    engine, messages = mlp_engine(), []
    engine._log = messages.append
    before = engine.state_dict()
    bad = (batch[0].clone(), batch[1])
    bad[0][1, 2] = float("nan")  # micro-batch 0, rank 0's rows
    engine.train_step(*bad)
    assert engine.skipped_steps == 1 and len(messages) == 1
    assert messages[0].startswith("step 1: non-finite loss nan (micro-batch 0)")
    for key, value in engine.state_dict().items():
        assert torch.equal(before[key], value)
    # The next, clean step starts from empty accumulators: it equals a fresh engine's first step.
    fresh = mlp_engine()
    assert torch.equal(engine.train_step(*batch), fresh.train_step(*batch))
    for key, value in fresh.state_dict().items():
        assert torch.equal(engine.state_dict()[key], value)


def test_resume_with_another_accumulation_count_starts_a_whole_step(tmp_path) -> None:
    """Saved after one step of 3 micro-batches (ZeRO-1); loaded to take 2 micro-batches of 6: the next
    train_step is one whole optimizer step, as eager's second step on the same batch."""
    saved = accumulating_engine(2, zero_stage=1)
    saved.train_step(*BATCH)
    saved.save_checkpoint(str(tmp_path / "ckpt"))
    loaded = shardfx.compile_distributed(
        tiny_gpt(),
        2,
        example_inputs=tuple(x[:6] for x in BATCH),
        loss_fn=gpt_loss,
        optimizer=adamw,
        config=Config(zero_stage=1, grad_accum_steps=2),
    )
    loaded.load_checkpoint(str(tmp_path / "ckpt"))
    assert (loaded.steps, loaded.micro_steps) == (1, 2)
    ref_losses, ref_state = eager_train(tiny_gpt(), BATCH, gpt_loss, 2)
    torch.testing.assert_close(loaded.train_step(*BATCH), ref_losses[1], rtol=RTOL, atol=ATOL)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], rtol=RTOL, atol=ATOL)


def test_without_the_accumulate_pass_the_engine_measures_the_summed_gradient() -> None:
    """Disabling accumulate_gradients makes every micro-batch a plain step; the norm (and the clip) must then
    come from the kept sum, not from the last program's own gradients."""
    engine = accumulating_engine(2, zero_stage=0, grad_clip=0.05, disable_passes=("accumulate_gradients",))
    ref_losses, ref_state = eager_train(tiny_gpt(), BATCH, gpt_loss, 4, grad_clip=0.05)
    losses, state = train(engine)
    torch.testing.assert_close(losses, ref_losses, rtol=RTOL, atol=ATOL)
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=RTOL, atol=ATOL)


def test_a_new_batch_shape_in_the_middle_of_a_step_keeps_accumulating() -> None:
    """Micro-batches of 4, then 8 rows (a recompile between them): one optimizer step over both, as
    eager accumulation of loss / k over the same two micro-batches."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    g = torch.Generator().manual_seed(1)
    parts = [(torch.randn(rows, 4, generator=g), torch.randn(rows, 2, generator=g)) for rows in (4, 8)]
    for stage in (1, 3):
        engine = shardfx.compile_distributed(
            copy.deepcopy(model),
            2,
            example_inputs=parts[0],
            loss_fn=torch.nn.functional.mse_loss,
            optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
            config=Config(zero_stage=stage, grad_accum_steps=2, max_batch_shapes=2),
        )
        engine._log = lambda line: None
        for x, y in parts:
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
        reference = copy.deepcopy(model)
        for x, y in parts:
            (torch.nn.functional.mse_loss(reference(x), y) / 2).backward()
        torch.optim.SGD(reference.parameters(), lr=0.1).step()
        assert engine.steps == 1 and engine.stats()["compiled_shapes"] == 2
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(engine.state_dict()[key], value, rtol=RTOL, atol=ATOL)


def sgd(params):  # type: ignore[no-untyped-def]
    # SGD, not Adam: Adam is nearly scale-invariant and would hide a wrong clipping coefficient
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


@pytest.mark.parametrize("sync", ["boundary", "micro_batch"])
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_the_step_program_computes_the_norm_and_clips_the_whole_steps_gradient(stage: int, sync: str) -> None:
    """The last program of the step holds the whole step's gradient (the accumulated sum reduced once, or
    the kept reduced sum added in by sum_gradients): it measures the norm and clips, as eager
    clip_grad_norm_ does on the mean gradient; the engine computes no norm of its own."""
    clip = 0.05
    engine = shardfx.compile_distributed(
        tiny_gpt(),
        2,
        example_inputs=micro(BATCH),
        loss_fn=gpt_loss,
        optimizer=sgd,
        config=Config(grad_accum_steps=K, zero_stage=stage, grad_accum_sync=sync, grad_clip=clip),
    )
    last = engine.programs()["last"]
    origins = {n.meta.get(meta.ORIGIN) for n in last.graph.nodes}
    assert "clip_gradients" in origins
    assert ("sum_gradients" in origins) == (sync == "micro_batch")
    assert all("clip_gradients" not in {n.meta.get(meta.ORIGIN) for n in p.graph.nodes}
               for name, p in engine.programs().items() if name != "last")  # fmt: skip
    ref_losses, ref_state = eager_train(tiny_gpt(), BATCH, gpt_loss, 3, optimizer=sgd, grad_clip=clip)
    unclipped, _ = eager_train(tiny_gpt(), BATCH, gpt_loss, 3, optimizer=sgd)
    assert not torch.allclose(ref_losses[1:], unclipped[1:], rtol=1e-3)  # the clip changes training
    model = tiny_gpt()
    gpt_loss(model(BATCH[0]), BATCH[1]).backward()
    first_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    losses = []
    for step in range(3):
        losses.append(engine.train_step(*BATCH))
        if step == 0:
            assert engine.stats()["grad_norm"] == pytest.approx(float(first_norm), rel=1e-5)
    torch.testing.assert_close(torch.stack(losses), ref_losses, rtol=RTOL, atol=ATOL)
    state = engine.state_dict()
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")
