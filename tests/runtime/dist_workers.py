"""Worker functions for multi-process tests (importable, as spawned processes need)."""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

import shardfx
from shardfx.models import GPT, GPTConfig, gpt_loss


def tiny_gpt_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, seq_len=16, bias=False))
    g = torch.Generator().manual_seed(2)
    batch = torch.randint(0, 64, (8, 16), generator=g), torch.randint(0, 64, (8, 16), generator=g)
    return model, batch


def train_gpt(zero_stage: int, steps: int, **config: object) -> dict:
    """`steps` optimizer steps on the tiny GPT's batch (cut into grad_accum_steps micro-batches)."""
    model, batch = tiny_gpt_batch()
    k = int(config.get("grad_accum_steps", 1))
    engine = shardfx.compile_distributed(
        model,
        None,
        example_inputs=tuple(x[: x.shape[0] // k] for x in batch),
        loss_fn=gpt_loss,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        config=shardfx.Config(zero_stage=zero_stage, **config),
    )
    losses = [engine.train_step(*batch).item() for _ in range(steps)]
    stats = engine.stats()  # the last step's collectives (state_dict below gathers too)
    return {"losses": losses, "state": engine.state_dict(), "stats": stats, "rank": dist.get_rank()}


def die_on_rank(rank_to_die: int) -> None:
    """Rank `rank_to_die` exits hard in the middle of training; the others wait in a collective."""
    model, batch = tiny_gpt_batch()
    engine = shardfx.compile_distributed(model, None, example_inputs=batch, loss_fn=gpt_loss, optimizer=None)
    engine.train_step(*batch)
    if dist.get_rank() == rank_to_die:
        os._exit(3)
    time.sleep(0.5)
    for _ in range(5):
        engine.train_step(*batch)


def sync_and_overlapped() -> list[tuple[dict, dict]]:
    """ZeRO-3 (gathers and reduce-scatters) and ZeRO-0 (gradient all-reduces in their buckets'
    storage) without, then with, bucketing and overlap, from the same start."""
    return [
        (train_gpt(s, 3, bucket_mb=0.0, overlap=False), train_gpt(s, 3, bucket_mb=1.0, overlap=True)) for s in (3, 0)
    ]


def train_gpt_tp() -> dict:
    """ZeRO-3 over dp=2 on top of tensor parallelism over tp=2."""
    return train_gpt(3, 3, tp_size=2)


ACCUMULATED = {"grad_accum_steps": 2, "bucket_mb": 1.0, "overlap": True}


def train_gpt_accumulated() -> dict:
    """ZeRO-2 over 2 micro-batches a step, bucketed and overlapped."""
    return train_gpt(2, 3, **ACCUMULATED)


def _gpt_engine(**config: object) -> tuple[shardfx.Engine, tuple]:
    model, batch = tiny_gpt_batch()
    engine = shardfx.compile_distributed(
        model,
        None,
        example_inputs=batch,
        loss_fn=gpt_loss,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        config=shardfx.Config(**config),
    )
    return engine, batch


def save_and_reload_tp(path: str) -> dict:
    """dp=2 x tp=2, ZeRO-3: train 2 steps, save; a fresh engine loads it; both take one more step."""
    engine, batch = _gpt_engine(zero_stage=3, tp_size=2)
    for _ in range(2):
        engine.train_step(*batch)
    engine.save_checkpoint(path)
    saved = engine.state_dict()
    fresh, _ = _gpt_engine(zero_stage=3, tp_size=2)
    fresh.load_checkpoint(path)
    loaded = fresh.state_dict()
    return {
        "saved": saved,
        "loaded": loaded,
        "next": [engine.train_step(*batch).item(), fresh.train_step(*batch).item()],
    }


def load_state(path: str, zero_stage: int) -> dict:
    engine, _ = _gpt_engine(zero_stage=zero_stage)
    engine.load_checkpoint(path)
    return engine.state_dict()


def train_gpt_pipeline(path: str) -> dict:
    """dp2 x pp2 (ZeRO-1, the embedding tied to the head), 1F1B over 2 micro-batches, SGD with momentum:
    3 steps, a checkpoint to `path`, one more step."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, seq_len=16, bias=False, tie_weights=True))
    g = torch.Generator().manual_seed(2)
    batch = torch.randint(0, 64, (8, 16), generator=g), torch.randint(0, 64, (8, 16), generator=g)
    engine = shardfx.compile_distributed(
        model,
        None,
        example_inputs=batch,
        loss_fn=gpt_loss,
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        config=shardfx.Config(zero_stage=1, pp_size=2, pp_microbatches=2, grad_clip=1.0),
    )
    losses = [engine.train_step(*batch).item() for _ in range(3)]
    stats = engine.stats()
    out = {"losses": losses, "state": engine.state_dict(), "stats": stats, "norm": engine.last_grad_norm}
    engine.save_checkpoint(path)
    engine.train_step(*batch)
    out["after"] = engine.state_dict()
    return out


def listening_sockets() -> list[str]:
    """Rank 0, while every rank is alive: the local address of each listening TCP socket that the
    launcher or a worker holds (from /proc/net/tcp{,6} and each process's open files)."""
    pids = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    found: list[str] = []
    if dist.get_rank() == 0:
        found = _listeners([os.getppid(), *pids])
    dist.barrier()
    return found


def _listeners(pids: list[int]) -> list[str]:
    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    out.append(_address(cols[1]))
    return out


def _address(hex_address: str) -> str:
    """/proc/net/tcp's 'HEXIP:HEXPORT' as 'ip:port' (IPv4 and IPv6, little-endian words)."""
    import ipaddress

    ip_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(ip_hex)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return f"{ipaddress.ip_address(words)}:{int(port_hex, 16)}"


def stop_rank_mid_training(rank_to_stop: int, stamp: str) -> None:
    """Rank `rank_to_stop` stops itself (SIGSTOP) after one step, writing the time to `stamp` first;
    the others go on into a collective."""
    model, batch = tiny_gpt_batch()
    engine = shardfx.compile_distributed(model, None, example_inputs=batch, loss_fn=gpt_loss, optimizer=None)
    engine.train_step(*batch)
    dist.barrier()
    if dist.get_rank() == rank_to_stop:
        with open(stamp, "w") as f:
            f.write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGSTOP)
    for _ in range(5):
        engine.train_step(*batch)


def wait_alone(seconds: float) -> None:
    """Rank 0 waits in a collective (as the board sees it) that rank 1 never joins: no backend timeout
    fires, so only the launcher's own watchdog can end the job."""
    from shardfx.runtime import launch

    if dist.get_rank() == 0:
        with launch.waiting("all_reduce at node fake_all_reduce (blocks.0)"):
            time.sleep(seconds)
    else:
        time.sleep(seconds)


def raise_on_rank_1() -> None:
    """Rank 1 raises (a message of several lines) while rank 0 waits for it in a barrier."""
    if dist.get_rank() == 1:
        raise ValueError("batch has 3 rows, expected 4\n  hint: pass --batch-size 4")
    dist.barrier()


def rank_1_returns_early() -> None:
    """Rank 0 issues one all-reduce more than rank 1, which returns."""
    from shardfx.graphs.program import Mesh
    from shardfx.runtime.dist_comm import DistComm

    comm = DistComm(Mesh.of(dp=2))
    for i in range(3 if dist.get_rank() == 0 else 2):
        comm.all_reduce(torch.ones(2), "dp", "sum", where=f"node ar_{i} (root)")


def compile_calibrating_twice() -> dict:
    """Compile the tiny GPT twice in a job that may calibrate itself (SHARDFX_CALIBRATE=1): what each
    compile printed, and the profile the second one planned on."""
    from shardfx.graphs import cost_model

    printed: list[list[str]] = []
    draws = []  # the global generator's next numbers after each compile (tiny_gpt_batch seeds it)
    for _ in range(2):
        lines: list[str] = []
        model, batch = tiny_gpt_batch()
        shardfx.compile_distributed(model, None, example_inputs=batch, loss_fn=gpt_loss, log=lines.append)
        printed.append([line for line in lines if line.startswith("shardfx: measur")])
        draws.append(torch.rand(3))
    return {"printed": printed, "profile": cost_model.hardware("auto", ranks=dist.get_world_size()), "draws": draws}
