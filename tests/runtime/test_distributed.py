"""One rank per process over gloo: same results as the local runtime; a dead worker fails the job."""

from __future__ import annotations

import time

import pytest
import torch

import shardfx
from shardfx.models import gpt_loss
from shardfx.runtime.launch import WorkerFailed, launch
from tests.parity_util import shardfx_train
from tests.runtime import dist_workers

pytestmark = pytest.mark.multiproc


# 4 processes cost ~17 s on 2 cores: in the slow run; 2 ranks cover the default one.
@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_zero3_on_gloo_matches_local_runtime(world_size: int) -> None:
    results = launch(dist_workers.train_gpt, (3, 3), world_size, timeout=60)
    model, batch = dist_workers.tiny_gpt_batch()
    from shardfx import Config

    local_losses, local_state, _ = shardfx_train(model, batch, gpt_loss, 3, world_size, Config(zero_stage=3))
    for rank in range(world_size):
        torch.testing.assert_close(torch.tensor(results[rank]["losses"]), local_losses, rtol=1e-5, atol=1e-6)
    for key, value in local_state.items():
        torch.testing.assert_close(results[0]["state"][key], value, rtol=1e-5, atol=1e-5)
    calls = results[0]["stats"]["comm"]["calls"]
    assert calls["reduce_scatter"] > 0 and calls["all_gather"] > calls["reduce_scatter"]


def test_bucketing_and_overlap_on_gloo_are_exact() -> None:
    """Async collectives with real work handles: the same bits as synchronous ones."""
    results = launch(dist_workers.sync_and_overlapped, (), 2, timeout=90)
    for rank in range(2):
        for sync, overlapped in results[rank]:
            assert sync["losses"] == overlapped["losses"]
            for key, value in sync["state"].items():
                assert torch.equal(overlapped["state"][key], value), key


def test_dp_x_tp_on_gloo_matches_local_runtime() -> None:
    """A 2 x 2 mesh: every rank binds "dp" and "tp" to its own process groups."""
    results = launch(dist_workers.train_gpt_tp, (), 4, timeout=90)
    model, batch = dist_workers.tiny_gpt_batch()
    from shardfx import Config

    local_losses, local_state, _ = shardfx_train(model, batch, gpt_loss, 3, 4, Config(zero_stage=3, tp_size=2))
    for rank in range(4):
        torch.testing.assert_close(torch.tensor(results[rank]["losses"]), local_losses, rtol=1e-5, atol=1e-6)
    for key, value in local_state.items():
        torch.testing.assert_close(results[0]["state"][key], value, rtol=1e-5, atol=1e-5)


def test_accumulation_on_gloo_matches_local_runtime() -> None:
    """ZeRO-2, 2 micro-batches a step, bucketed and overlapped: the accumulators live in each process."""
    results = launch(dist_workers.train_gpt_accumulated, (), 2, timeout=60)
    model, batch = dist_workers.tiny_gpt_batch()
    from shardfx import Config

    engine = shardfx.compile_distributed(
        model,
        2,
        example_inputs=tuple(x[:4] for x in batch),
        loss_fn=gpt_loss,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        config=Config(zero_stage=2, **dist_workers.ACCUMULATED),
    )
    local_losses = torch.stack([engine.train_step(*batch) for _ in range(3)])
    for rank in range(2):
        torch.testing.assert_close(torch.tensor(results[rank]["losses"]), local_losses, rtol=1e-5, atol=1e-6)
    for key, value in engine.state_dict().items():
        torch.testing.assert_close(results[0]["state"][key], value, rtol=1e-5, atol=1e-5)
    # one optimizer step's collectives, both micro-batches: the gradients reduce-scattered once
    assert results[0]["stats"]["comm"]["volume"] == engine.stats()["comm"]["volume"]


def test_a_killed_worker_fails_the_job_naming_it() -> None:
    start = time.monotonic()
    with pytest.raises(WorkerFailed, match="rank 1 failed"):
        launch(dist_workers.die_on_rank, (1,), 2, timeout=20)
    assert time.monotonic() - start < 60


@pytest.mark.slow  # ~27 s; tests/runtime/test_checkpoint.py reshards tp checkpoints to any mesh on the local runtime
def test_tensor_parallel_checkpoint_on_gloo_reshards(tmp_path) -> None:
    """Each of 4 processes (dp=2 x tp=2, ZeRO-3) writes its boxes; 2 processes and one process read them back."""
    path = str(tmp_path / "ckpt")
    results = launch(dist_workers.save_and_reload_tp, (path,), 4, timeout=90)
    saved = results[0]["saved"]
    for rank in range(4):
        for key, value in saved.items():
            assert torch.equal(results[rank]["loaded"][key], value), (rank, key)
        assert results[rank]["next"][0] == results[rank]["next"][1]
    for key, value in launch(dist_workers.load_state, (path, 3), 2, timeout=60)[1].items():
        assert torch.equal(value, saved[key]), key
    model, batch = dist_workers.tiny_gpt_batch()
    local = shardfx.compile_distributed(model, 1, example_inputs=batch, loss_fn=gpt_loss, optimizer=None)
    local.load_checkpoint(path)
    for key, value in local.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_dp2_x_pp2_on_gloo_matches_eager(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Sends and receives over gloo, the tied embedding's parts summed across stages, the norm over
    both; each stage's processes write their part of a checkpoint, which one process without a
    pipeline loads and continues from (momentum included) as the pipeline did."""
    from tests.parity_util import eager_train

    path = str(tmp_path / "ckpt")
    results = launch(dist_workers.train_gpt_pipeline, (path,), 4, timeout=120)
    torch.manual_seed(0)
    model = shardfx.models.GPT(
        shardfx.models.GPTConfig(
            vocab_size=64, n_layer=2, d_model=32, n_head=2, seq_len=16, bias=False, tie_weights=True
        )
    )
    _, batch = dist_workers.tiny_gpt_batch()
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731
    ref_losses, ref_state = eager_train(model, batch, gpt_loss, 3, sgd, grad_clip=1.0)
    from tests.parity_util import eager_norms

    norm = eager_norms(model, batch, gpt_loss, 3, 1.0, sgd)[-1]
    for rank in range(4):
        torch.testing.assert_close(torch.tensor(results[rank]["losses"]), ref_losses, rtol=1e-5, atol=1e-6)
        assert results[rank]["norm"] == pytest.approx(norm, rel=1e-5)  # over both stages, the tied part once
    for key, value in ref_state.items():
        torch.testing.assert_close(results[3]["state"][key], value, rtol=1e-4, atol=1e-6)
    calls = [results[r]["stats"]["comm"]["calls"] for r in range(4)]
    assert calls[0]["send"] == calls[2]["recv"] == 2  # one activation per micro-batch forward
    assert calls[2]["send"] == calls[0]["recv"] == 2  # its gradient back
    local = shardfx.compile_distributed(
        model, 1, example_inputs=batch, loss_fn=gpt_loss, optimizer=sgd, config=shardfx.Config(grad_clip=1.0)
    )
    local.load_checkpoint(path)
    for key, value in local.state_dict().items():
        assert torch.equal(value, results[0]["state"][key]), key
    local.train_step(*batch)
    for key, value in local.state_dict().items():
        torch.testing.assert_close(
            value, results[0]["after"][key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}"
        )
