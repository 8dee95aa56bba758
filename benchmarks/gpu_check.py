"""One run on one CUDA GPU that checks and measures what a CPU cannot (issue: validate on a GPU).

    python3 benchmarks/gpu_check.py --out gpu_check_out        # on the GPU machine, < 8 minutes
    python3 benchmarks/gpu_check.py --dry-run --out /tmp/gc    # on CPU: every step at tiny sizes

Steps, each with its own time limit, each writing under --out (a failing step is
reported in summary.md and the next one still runs):

  1. env.json       torch / Triton / device / backend.
  2. tests.txt      the tests marked `gpu` (tests/gpu: generated kernels compiled by real
                    Triton on awkward shapes in fp32 and bf16, the fused GPT against the
                    unfused one, CUDA attention kernels in the op facts, NCCL by default).
                    --dry-run: collected only (they need CUDA).
  3. regions.txt    benchmarks/triton_regions.py: each fused region's GB/s, ours against
                    torch.compile (Inductor) and the device's bandwidth.
                    --dry-run: its static mode on a 1-layer GPT.
  4. steps.json     one training step of a GPT of about 110M parameters (12 x 768, vocab
                    32768, seq 1024, batch 4, AdamW) on one GPU: eager, shardfx unfused,
                    shardfx fused, torch.compile; medians of --steps steps.
                    --dry-run: a 1-layer GPT on CPU, torch.compile left out.
  5. ops.json       every op of shardfx's unfused step timed alone against the cost model's
                    profile for this device, summed per op class (matmul, attention,
                    memory-bound): measured / predicted per class; a calibrated profile
                    (calibrated_profile.json: op overhead and bandwidth fitted to the
                    memory-bound ops, FLOP/s to the matmuls), and the step time it
                    predicts against the measured one.
  6. summary.md     the tables above.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# --dry-run: generated kernels run in Triton's interpreter, which must be on before triton loads
if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Sizes:
    layers: int
    d_model: int
    heads: int
    vocab: int
    seq: int
    batch: int


FULL = Sizes(layers=12, d_model=768, heads=12, vocab=32768, seq=1024, batch=4)
TINY = Sizes(layers=1, d_model=64, heads=2, vocab=128, seq=32, batch=2)


def step_env(out: Path, device: str) -> str:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    from shardfx.graphs.cost_model import hardware, resolve

    info["profile"] = resolve("auto")
    info["profile_figures"] = dataclasses.asdict(hardware("auto"))
    info["default_backend"] = "nccl" if torch.cuda.is_available() else "gloo"
    (out / "env.json").write_text(json.dumps(info, indent=2))
    return f"{info['device']}, torch {info['torch']}, triton {info['triton']}, profile {info['profile']}"


def _run(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    log.write_text(
        f"$ {' '.join(cmd)}\n(rc {proc.returncode}, {time.perf_counter() - start:.0f} s)\n\n{proc.stdout}\n{proc.stderr}"
    )
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0:
        raise RuntimeError(f"rc {proc.returncode}: {last}")
    return last


def step_tests(out: Path, dry: bool, timeout: float) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-m", "gpu", "tests/gpu"]
    return _run([*cmd, "--collect-only"] if dry else cmd, out / "tests.txt", timeout)


def step_regions(out: Path, dry: bool, timeout: float) -> str:
    cmd = [sys.executable, "benchmarks/triton_regions.py"]
    if dry:
        cmd += ["--static", "--no-inductor", "--layers", "1", "--d-model", "64", "--seq", "32", "--vocab", "128"]
        cmd += ["--batch", "2", "--heads", "2"]
    _run(cmd, out / "regions.txt", timeout, env={"TRITON_INTERPRET": "1"} if dry else None)
    return "see regions.txt"


def _gpt(sizes: Sizes, device: str):  # noqa: ANN202
    from shardfx.models import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=sizes.vocab, n_layer=sizes.layers, d_model=sizes.d_model, n_head=sizes.heads, seq_len=sizes.seq
    )
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, sizes.vocab, (sizes.batch, sizes.seq), generator=gen).to(device)
    targets = torch.randint(0, sizes.vocab, (sizes.batch, sizes.seq), generator=gen).to(device)
    return GPT(cfg).to(device), (tokens, targets)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn: Callable[[], Any], steps: int, device: str, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _shardfx_engine(model: torch.nn.Module, batch: tuple, fuse: bool, cache: Path):  # noqa: ANN202
    import shardfx
    from shardfx.models import gpt_loss

    config = shardfx.Config(fuse=fuse, kernel_cache_dir=str(cache))
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-4)  # noqa: E731
    return shardfx.compile_distributed(
        model, 1, example_inputs=batch, loss_fn=gpt_loss, optimizer=optimizer, config=config
    )


def step_steps(out: Path, dry: bool, device: str, steps: int) -> str:
    import copy

    from shardfx.models import gpt_loss, num_params

    sizes = TINY if dry else FULL
    model, batch = _gpt(sizes, device)
    rows: dict[str, Any] = {"params": num_params(model), "sizes": dataclasses.asdict(sizes)}

    def eager_step(m: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            gpt_loss(m(batch[0]), batch[1]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    eager = copy.deepcopy(model)
    rows["eager_ms"] = 1e3 * _median_seconds(
        eager_step(eager, torch.optim.AdamW(eager.parameters(), lr=1e-4)), steps, device
    )
    del eager
    for name, fuse in (("shardfx_unfused", False), ("shardfx_fused", True)):
        start = time.perf_counter()
        engine = _shardfx_engine(copy.deepcopy(model), batch, fuse, out / "kernels")
        rows[f"{name}_compile_s"] = time.perf_counter() - start
        rows[f"{name}_ms"] = 1e3 * _median_seconds(lambda e=engine: e.train_step(*batch), steps, device)
        del engine
    if not dry:
        compiled = copy.deepcopy(model)
        opt = torch.optim.AdamW(compiled.parameters(), lr=1e-4)
        fn = torch.compile(compiled)
        start = time.perf_counter()
        eager_step(fn, opt)()
        rows["torch_compile_first_step_s"] = time.perf_counter() - start
        rows["torch_compile_ms"] = 1e3 * _median_seconds(eager_step(fn, opt), steps, device)
    (out / "steps.json").write_text(json.dumps(rows, indent=2))
    return ", ".join(f"{k} {v:.1f}" for k, v in rows.items() if k.endswith("_ms"))


def op_class(node: torch.fx.Node) -> str:
    from shardfx.graphs import ops
    from shardfx.graphs.cost_model import node_flops

    if isinstance(node.target, torch._ops.OpOverload) and ops.attention(node.target) is not None:
        return "attention"
    return "matmul" if node_flops(node) > 0 else "memory-bound"


def fit_profile(hw: Any, samples: list[tuple[str, int, int, float]]) -> Any:
    """The profile's op overhead and memory bandwidth fitted to the memory-bound ops (seconds =
    overhead + bytes / bandwidth, least squares), its FLOP/s to the matmuls given that overhead."""
    memory = [(b, t) for c, b, _, t in samples if c == "memory-bound"]
    overhead, mem_bw = hw.op_overhead, hw.mem_bw
    if len(memory) >= 2:
        mean_b = statistics.fmean(b for b, _ in memory)
        mean_t = statistics.fmean(t for _, t in memory)
        var = sum((b - mean_b) ** 2 for b, _ in memory)
        slope = sum((b - mean_b) * (t - mean_t) for b, t in memory) / var if var else 0.0
        if slope > 0:
            mem_bw, overhead = 1.0 / slope, max(mean_t - slope * mean_b, 0.0)
    matmuls = [(f, t) for c, _, f, t in samples if c == "matmul"]
    scale = 1.0
    if matmuls:
        flops = sum(f for f, _ in matmuls)
        busy = sum(max(t - overhead, 1e-9) for _, t in matmuls)
        scale = (flops / busy) / hw.fp32_flops
    return dataclasses.replace(
        hw,
        name=f"{hw.name}-calibrated",
        fp32_flops=hw.fp32_flops * scale,
        bf16_flops=hw.bf16_flops * scale,
        mem_bw=mem_bw,
        op_overhead=overhead,
        source=f"{hw.source}; fitted by benchmarks/gpu_check.py to this device's per-op times",
    )


def step_ops(out: Path, dry: bool, device: str) -> str:
    """Each compute op of the unfused step timed alone (inputs from a real run), against the profile."""
    import copy

    from shardfx.graphs import collectives
    from shardfx.graphs.cost_model import compute_seconds, hardware, node_bytes, node_flops, simulate
    from shardfx.runtime.executor import Executor

    sizes = TINY if dry else FULL
    model, batch = _gpt(sizes, device)
    engine = _shardfx_engine(copy.deepcopy(model), batch, False, out / "kernels")
    engine.train_step(*batch)
    program = engine.program
    state = engine.runtime.states[0] if hasattr(engine.runtime, "states") else engine.runtime.state
    args = Executor(program).arguments(state.params, state.buffers, batch)
    hw = hardware("auto")
    env: dict[torch.fx.Node, Any] = {}
    per_class: dict[str, dict[str, float]] = {}
    samples: list[tuple[str, int, int, float]] = []  # (class, bytes, FLOPs, seconds) per op
    placeholders = iter(args)
    comm = engine.runtime.comms[0] if hasattr(engine.runtime, "comms") else engine.runtime.comm
    with torch.no_grad(), collectives.bind(comm):
        for node in program.graph.nodes:
            if node.op == "placeholder":
                env[node] = next(placeholders)
                continue
            if node.op != "call_function":
                continue
            fargs = torch.fx.node.map_arg(node.args, lambda n: env[n])
            fkwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
            result = node.target(*fargs, **fkwargs)
            env[node] = result
            predicted = compute_seconds(node, hw)
            if collectives.is_collective(node) or collectives.is_wait(node) or predicted == 0.0:
                continue
            seconds = _median_seconds(
                lambda n=node, a=fargs, k=fkwargs: n.target(*a, **k), 3 if dry else 5, device, warmup=1
            )
            row = per_class.setdefault(op_class(node), {"ops": 0, "measured_s": 0.0, "predicted_s": 0.0})
            row["ops"] += 1
            row["measured_s"] += seconds
            row["predicted_s"] += predicted
            samples.append((op_class(node), node_bytes(node), node_flops(node), seconds))
    ratios = {k: v["measured_s"] / v["predicted_s"] for k, v in per_class.items()}
    calibrated = fit_profile(hw, samples)
    measured_step = _median_seconds(lambda: engine.train_step(*batch), 3 if dry else 10, device)
    rows = {
        "profile": hw.name,
        "per_class": per_class,
        "measured_over_predicted": ratios,
        "step_measured_ms": measured_step * 1e3,
        "step_predicted_ms": simulate(program, hw).step_seconds * 1e3,
        "step_predicted_calibrated_ms": simulate(program, calibrated).step_seconds * 1e3,
    }
    (out / "ops.json").write_text(json.dumps(rows, indent=2))
    (out / "calibrated_profile.json").write_text(json.dumps(dataclasses.asdict(calibrated), indent=2))
    return ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items()) + (
        f"; step measured {rows['step_measured_ms']:.1f} ms, predicted {rows['step_predicted_ms']:.1f}, "
        f"calibrated {rows['step_predicted_calibrated_ms']:.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check_out", help="folder for every result (default %(default)s)")
    parser.add_argument(
        "--dry-run", action="store_true", help="on CPU: every step at tiny sizes, no timing that needs CUDA"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per strategy (default %(default)s)")
    parser.add_argument("--only", default=None, help="comma-separated steps to run: env,tests,regions,steps,ops")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        parser.error("no CUDA device here: run with --dry-run to check the script on CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps: dict[str, Callable[[], str]] = {
        "env": lambda: step_env(out, device),
        "tests": lambda: step_tests(out, args.dry_run, timeout=240),
        "regions": lambda: step_regions(out, args.dry_run, timeout=150),
        "steps": lambda: step_steps(out, args.dry_run, device, 3 if args.dry_run else args.steps),
        "ops": lambda: step_ops(out, args.dry_run, device),
    }
    chosen = args.only.split(",") if args.only else list(steps)
    unknown = sorted(set(chosen) - set(steps))
    if unknown:
        parser.error(f"--only names unknown steps {unknown}; choose from {list(steps)}")
    lines = [
        f"# gpu_check{' (dry run on CPU)' if args.dry_run else ''}",
        "",
        "| step | seconds | result |",
        "|---|---:|---|",
    ]
    failed = 0
    for name in chosen:
        start = time.perf_counter()
        try:
            result = steps[name]()
        except Exception as exc:  # noqa: BLE001 - reported, and the next step still runs
            failed += 1
            (out / f"{name}.error.txt").write_text(traceback.format_exc())
            result = f"FAILED: {type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - start
        lines.append(f"| {name} | {seconds:.0f} | {result} |")
        print(lines[-1], flush=True)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/summary.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
