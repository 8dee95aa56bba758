"""What `shardfx train` prints: the header, a line per --log-every steps, the summary; the loss floor."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

import shardfx
from shardfx.models import MarkovTokens

LAST_WINDOW = 10  # the summary's last loss is the mean of this many final steps


def step_line(engine: shardfx.Engine, step: int, loss: float, rate: float, unit: str) -> str:
    stats = engine.stats()
    memory = sum(stats["memory"].values())
    sent = sum(stats["comm"]["sent"].values())
    norm = stats["grad_norm"]
    parts = [
        f"step {step:>6}",
        f"loss {loss:.4f}",
        f"{rate:,.0f} {unit}",
        f"mem/rank {memory / 2**20:.2f} MiB",
        f"accumulators/rank {stats['grad_accum_bytes'] / 2**20:.2f} MiB" if stats["grad_accum_bytes"] else "",
        f"sent/rank {sent / 2**20:.2f} MiB",
        f"grad norm {norm:.3g}" if norm is not None else "",
        f"lr {stats['lr'][0]:.3g}" if stats["lr"] else "",
    ]
    return "  ".join(p for p in parts if p)


def loss_floor(name: str, model: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[float | None, float | None]:
    """(lowest reachable loss, loss of a uniform guess) for the built-in data, None where unknown."""
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
            + f", AdamW lr {s['lr']}, seed {s['seed']}",
        ]
        + ([f"resumed     from {s['resumed_from']} at step {s['start_step']}"] if s["resumed_from"] else [])
        + ([f"ds config   ignored keys: {', '.join(s['deepspeed_unsupported'])}"] if s["deepspeed_unsupported"] else [])
    )


def footer(s: dict[str, Any]) -> str:
    floor = "n/a" if s["floor"] is None else f"{s['floor']:.4f}"
    lines = [
        f"loss        first {s['first_loss']:.4f}, last {s['last_loss']:.4f} (mean of last {s['last_window']} steps), "
        f"floor {floor}" + ("" if s["uniform_loss"] is None else f", uniform guess {s['uniform_loss']:.4f}"),
        f"time        {s['total_seconds']:.1f} s total ({s['compile_seconds']:.1f} s compile), "
        f"{s['throughput']:,.0f} {s['throughput_unit']} in train_step",
        f"state       {sum(s['memory_per_rank'].values()) / 2**20:.2f} MiB a rank "
        f"({', '.join(f'{k} {v / 2**20:.2f}' for k, v in s['memory_per_rank'].items())}), "
        f"{s['skipped_steps']} non-finite steps skipped",
    ]
    if s["checkpoints"]:
        lines.append(f"checkpoints {len(s['checkpoints'])} written, latest {s['checkpoints'][-1]}")
    return "\n".join(lines)
