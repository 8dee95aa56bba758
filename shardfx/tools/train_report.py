"""What `shardfx train` prints: the header, a line per --log-every steps, the summary; the loss floor and peak memory."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

import shardfx
from shardfx.deepspeed import _listing
from shardfx.graphs.analysis import memory_timeline
from shardfx.models import MarkovTokens

LAST_WINDOW = 10  # the summary's last loss is the mean of this many final steps
# The progress bar at any width: the bar itself a fixed 12 characters, then the counts and a short
# postfix (the loss); a narrow terminal cuts the line's end, never the bar.
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar:12}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class PeakMemory:
    """The most bytes a rank held during a step.

    Measured where the ranks hold CUDA tensors: the allocator's peak (torch.cuda.max_memory_allocated,
    reset before every step; ranks that share a device share its peak). Elsewhere planned: the peak of
    the step program's memory timeline (graphs.analysis.memory_timeline: parameters, activations,
    gradients and gathered copies as the program frees them) plus the optimizer state the rank holds
    beside the program, computed once per compiled program. Unlike the state held between steps, it
    tells ZeRO-1, 2 and 3 apart. Under accumulation or a pipeline, the largest of the programs.
    """

    def __init__(self, engine: shardfx.Engine) -> None:
        self._engine = engine
        self._devices = sorted(
            {p.device for _, state in engine.runtime.held_states() for p in state.params.values() if p.is_cuda},
            key=str,
        )
        self._planned: dict[int, tuple[Any, int]] = {}  # id(program) -> (program, its timeline's peak)
        self.kind = "measured" if self._devices else "planned"

    def reset(self) -> None:
        for device in self._devices:
            torch.cuda.reset_peak_memory_stats(device)

    def read(self) -> int:
        if self._devices:
            return max(torch.cuda.max_memory_allocated(device) for device in self._devices)
        peaks = []
        for program in self._engine.programs().values():
            if id(program) not in self._planned:  # the program is kept with its peak, so its id stays its own
                self._planned[id(program)] = (program, memory_timeline(program).peak)
            peaks.append(self._planned[id(program)][1])
        return max(peaks) + self._engine.stats()["memory"]["optimizer"]


def step_line(
    engine: shardfx.Engine,
    step: int,
    loss: float,
    rate: float,
    unit: str,
    peak: tuple[int, str],
    val_loss: float | None = None,
) -> str:
    """One step's line: loss (and validation loss), throughput, peak bytes a rank, communication, lr."""
    stats = engine.stats()
    sent = sum(stats["comm"]["sent"].values())
    norm = stats["grad_norm"]
    lr = engine.get_lr()
    peak_bytes, kind = peak
    parts = [
        f"step {step:>6}",
        f"loss {loss:.4f}",
        f"val {val_loss:.4f}" if val_loss is not None else "",
        f"{rate:,.0f} {unit}",
        f"peak/rank {peak_bytes / 2**20:.2f} MiB ({kind})",
        f"accumulators/rank {stats['grad_accum_bytes'] / 2**20:.2f} MiB" if stats["grad_accum_bytes"] else "",
        f"sent/rank {sent / 2**20:.2f} MiB",
        f"grad norm {norm:.3g}" if norm is not None else "",
        f"lr {lr[0]:.3g}" if lr else "lr none (no optimizer)",
        f"loss scale {stats['loss_scale']:g}" if stats["loss_scale"] is not None else "",
        f"skipped {stats['skipped_steps']}" if stats["skipped_steps"] else "",
    ]
    return "  ".join(p for p in parts if p)


def loss_floor(
    name: str, model: torch.nn.Module, kwargs: dict[str, Any], data: bool = False
) -> tuple[float | None, float | None]:
    """(lowest reachable loss, loss of a uniform guess) for the built-in data, None where unknown."""
    if name == "gpt" and data:
        return None, math.log(model.config.vocab_size)  # real text: no known floor
    if name == "gpt":
        vocab = model.config.vocab_size
        # The registry builds the same chain from (vocab_size, data_seed) but does not hand it out.
        data = MarkovTokens(vocab_size=vocab, seed=kwargs.get("data_seed", 0))
        return data.entropy_rate(), math.log(vocab)
    if name == "mlp":
        return 0.0, None  # a deterministic teacher: MSE can reach zero
    return None, None


def model_config(model: torch.nn.Module) -> dict[str, Any] | None:
    """The model's config dataclass as a dict (GPT has one), for the header and the JSON summary."""
    config = getattr(model, "config", None)
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) and not isinstance(config, type) else None


def items_per_batch(inputs: torch.Tensor) -> tuple[int, str]:
    """Tokens in a batch of token ids (B, T); otherwise samples (dim 0)."""
    if inputs.dtype in (torch.int32, torch.int64):
        return inputs.numel(), "tok/s"
    return inputs.shape[0], "samples/s"


def header(s: dict[str, Any]) -> str:
    name = s["model"] if s["preset"] is None else f"{s['model']} {s['preset']}"
    sizes = " ".join(f"{k}={v}" for k, v in (s["model_config"] or s["model_args"]).items() if k != "preset")
    name = f"{name} ({sizes})" if sizes else name
    return "\n".join(
        [
            f"model       {name}: {s['params']:,} parameters",
            f"ranks       world size {s['world_size']} ({s.get('mesh') or 'dp=' + str(s['world_size'])}, {s['runtime']} runtime), "
            f"ZeRO stage {s['zero_stage']}"
            + (f", pipeline {s['pipeline']}" if s.get("pipeline") else "")
            + f", passes: {', '.join(s['passes'])}",
            f"compiled    in {s['compile_seconds']:.1f} s, {s['graph_nodes']} graph nodes",
            f"training    {s['steps']} steps, global batch {s['batch_size']}"
            + (f" ({s['grad_accum_steps']} micro-batches a step)" if s["grad_accum_steps"] > 1 else "")
            + f", {s['optimizer']}"
            + (f", schedule {s['scheduler']}" if s.get("scheduler") else "")
            + f", seed {s['seed']}",
        ]
        + ([_precision_line(s)] if s.get("mixed_precision") else [])
        + ([_data_line(s["data"])] if s.get("data") else [])
        + ([f"resumed     from {s['resumed_from']} at step {s['start_step']}"] if s["resumed_from"] else [])
        + ([f"ds config   ignored: {_listing(s['deepspeed_ignored'])}"] if s.get("deepspeed_ignored") else [])
    )


def _precision_line(s: dict[str, Any]) -> str:
    line = f"precision   {s['mixed_precision']} compute, fp32 master parameters"
    if s.get("loss_scale") is not None:
        line += f", loss scale {s['loss_scale']:g}" + (" (dynamic)" if s.get("dynamic_loss_scale") else " (static)")
    return line


def _data_line(d: dict[str, Any]) -> str:
    held = f", validation the last {d['val_tokens']:,}" if d["val_tokens"] else ", no validation split"
    return (
        f"data        {d['path']}: {d['tokens']:,} tokens ({d['dtype']}), train {d['train_tokens']:,}{held}; "
        f"windows of {d['block_size']} + 1; "
        + (
            f"vocab_size {d['vocab_size']} (from {d['vocab_from']})"
            if d["vocab_size"] is not None
            else "ids not checked against the model (it has no config.vocab_size)"
        )
    )


def footer(s: dict[str, Any]) -> str:
    floor = "n/a" if s["floor"] is None else f"{s['floor']:.4f}"
    val = s.get("val_loss")
    loss = (
        "no step ran"
        if s["first_loss"] is None
        else f"first {s['first_loss']:.4f}, last {s['last_loss']:.4f} (mean of last {s['last_window']} steps)"
    )
    lines = [
        f"loss        {loss}, floor {floor}"
        + ("" if s["uniform_loss"] is None else f", uniform guess {s['uniform_loss']:.4f}"),
        *(
            [f"validation  {val:.4f} at step {s['val_losses'][-1][0]} (mean of {s['eval_batches']} held-out batches)"]
            if val is not None
            else []
        ),
        f"time        {s['total_seconds']:.1f} s total ({s['compile_seconds']:.1f} s compile), "
        f"{s['throughput']:,.0f} {s['throughput_unit']} in train_step",
        f"state       {sum(s['memory_per_rank'].values()) / 2**20:.2f} MiB a rank "
        f"({', '.join(f'{k} {v / 2**20:.2f}' for k, v in s['memory_per_rank'].items())}), "
        f"{s['skipped_steps']} non-finite steps skipped; peak {s['peak_bytes'] / 2**20:.2f} MiB a rank ({s['peak_kind']})",
    ]
    if s["checkpoints"]:
        lines.append(f"checkpoints {len(s['checkpoints'])} written, latest {s['checkpoints'][-1]}")
    return "\n".join(lines)
