"""What only a CUDA GPU exercises (marked `gpu`: not in the default run; benchmarks/gpu_check.py runs them).

- generated kernels compiled by real Triton (not the interpreter) on awkward shapes, fp32 and bf16,
  against the unfused ops;
- the fused GPT against the unfused one, trained a few steps;
- every CUDA scaled-dot-product attention kernel torch picks (flash, memory-efficient, cuDNN):
  known to the op facts (FLOPs), split by heads under tensor parallelism, recomputed by the
  selective policy, all with parity;
- NCCL as the default backend on CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

ROWS, COLS = 1823, 781  # neither a power of two nor a multiple of a block


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out.float() - target.float()) ** 2).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["layer_norm", "gelu_tanh", "softmax"])
def test_kernels_compiled_by_triton_match_the_unfused_ops(op: str, dtype: torch.dtype, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("triton")
    import os

    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "these tests are for compiled kernels"
    from shardfx.kernels.launch import TRITON_REGION
    from tests.kernels.util import Head, captured, lowered, run

    torch.manual_seed(0)
    model = Head(op, COLS).cuda().to(dtype)  # a Linear, the op (the region), then the loss
    x = torch.randn(ROWS, COLS, device="cuda", dtype=dtype)
    batch = (x, torch.randn(ROWS, COLS, device="cuda", dtype=dtype))
    program = captured(model, batch, _mse, dtype if dtype == torch.bfloat16 else None)
    fused, _ = lowered(program, tmp_path)
    assert sum(n.target is TRITON_REGION for n in fused.graph.nodes) >= 2
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for expected, got in zip(run(program, model, batch, dtype), run(fused, model, batch, dtype)):
        torch.testing.assert_close(got, expected, **tol)


def _gpt(device: str = "cuda"):  # noqa: ANN202
    from shardfx.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1000, n_layer=2, d_model=128, n_head=4, seq_len=96)).to(device)
    gen = torch.Generator().manual_seed(1)
    batch = tuple(torch.randint(0, 1000, (4, 96), generator=gen).to(device) for _ in range(2))
    return model, batch


def _train(model, batch, steps: int = 3, world: int = 1, **config):  # type: ignore[no-untyped-def]
    import shardfx
    from shardfx.models import gpt_loss

    engine = shardfx.compile_distributed(
        copy.deepcopy(model), world, example_inputs=batch, loss_fn=gpt_loss, config=shardfx.Config(**config)
    )
    losses = torch.stack([engine.train_step(*batch) for _ in range(steps)])
    return losses, engine.state_dict(), engine


def test_fused_gpt_matches_unfused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("triton")
    from shardfx.graphs.program import TRITON_REGIONS

    model, batch = _gpt()
    ref_losses, ref_state, _ = _train(model, batch, fuse=False)
    losses, state, engine = _train(model, batch, fuse=True, kernel_cache_dir=str(tmp_path))
    assert len(engine.program.notes[TRITON_REGIONS]) >= 8
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-4)
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-4, atol=1e-4)


def _backends():  # noqa: ANN202
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }


@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn"])
def test_cuda_attention_kernels_are_known_split_and_recomputed(backend: str) -> None:
    """bf16 so every backend applies; under sdpa_kernel the capture records that kernel."""
    from torch.nn.attention import sdpa_kernel

    from shardfx.graphs import ops
    from shardfx.graphs.cost_model import node_flops

    model, batch = _gpt()
    with sdpa_kernel([_backends()[backend]]):
        try:
            ref_losses, _, engine = _train(model, batch, mixed_precision="bf16", fuse=False)
        except RuntimeError as exc:  # a kernel this GPU or build lacks (cuDNN attention needs cuDNN 9)
            pytest.skip(f"{backend} attention unavailable: {exc}")
        kernels = [n for n in engine.program.graph.nodes if n.op == "call_function" and ops.attention(n.target)]
        names = {str(n.target) for n in kernels}
        assert any(backend in name for name in names), names
        assert len(kernels) >= 4 and all(node_flops(n) > 0 for n in kernels)  # 2 layers, forward and backward
        tp_losses, _, tp = _train(model, batch, world=2, tp_size=2, mixed_precision="bf16", fuse=False)
        head_split = [n for n in tp.program.graph.nodes if n.op == "call_function" and ops.attention(n.target)]
        assert head_split and all(n.args[0].meta["val"].shape[1] == 2 for n in head_split)  # 4 heads, 2 a rank
        torch.testing.assert_close(tp_losses, ref_losses, rtol=2e-2, atol=2e-2)
        rc_losses, _, rc = _train(model, batch, mixed_precision="bf16", fuse=False, recompute="selective")
        forward = [n for n in rc.program.graph.nodes if n.op == "call_function" and ops.attention(n.target)]
        assert len(forward) > len(kernels)  # the attention core runs again in the backward
        torch.testing.assert_close(rc_losses, ref_losses, rtol=1e-3, atol=1e-3)  # atomics in some backwards


def _backend_name() -> str:
    import torch.distributed as dist

    return dist.get_backend()


def test_nccl_is_the_default_backend_on_cuda() -> None:
    from shardfx.runtime.launch import launch

    assert launch(_backend_name, (), 1, timeout=120)[0] == "nccl"
