"""`shardfx train`: --save-every / --resume continue the same run, --config and --model file.py:factory."""

from __future__ import annotations

import dataclasses
import json

import pytest

from shardfx.tools.cli import main
from shardfx.tools.train import TrainOptions, train

TINY = TrainOptions(world_size=2, preset="tiny", steps=6, batch_size=8, progress=False, runtime="local", zero_stage=3)


def test_resume_continues_the_same_run(tmp_path) -> None:
    straight = train(TINY)
    ckpt = str(tmp_path / "ckpt")
    first = train(dataclasses.replace(TINY, steps=3, save_every=3, checkpoint_dir=ckpt))
    assert first["checkpoints"] == ["step-000003"] and (tmp_path / "ckpt" / "latest").read_text() == "step-000003\n"
    rest = train(dataclasses.replace(TINY, resume=True, checkpoint_dir=ckpt, zero_stage=1))  # reshard on resume
    assert rest["start_step"] == 3 and rest["resumed_from"].endswith("step-000003")
    assert first["losses"] == straight["losses"][:3]
    assert rest["losses"] == pytest.approx(straight["losses"][3:], rel=1e-5)


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys) -> None:
    argv = ["train", "--runtime", "local", "--resume", "--checkpoint-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_deepspeed_config_and_step_lines(tmp_path, capsys) -> None:
    ds = tmp_path / "ds_config.json"
    ds.write_text(
        json.dumps(
            {
                "train_batch_size": 16,
                "train_micro_batch_size_per_gpu": 4,
                "gradient_accumulation_steps": 2,
                "zero_optimization": {"stage": 2, "contiguous_gradients": True},
            }
        )
    )
    argv = ["train", "--runtime", "local", "--world-size", "2", "--preset", "tiny", "--steps", "2"]
    argv += ["--config", str(ds), "--log-every", "1", "--no-progress"]  # the batch size comes from the file
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ZeRO stage 2" in out and "global batch 16 (2 micro-batches a step)" in out
    assert "ignored keys: zero_optimization.contiguous_gradients" in out
    assert "step      2  loss" in out and "mem/rank" in out and "sent/rank" in out
    # the gradients wait in full-size accumulators for the last micro-batch
    assert "accumulators/rank" in out and "passes: sync_batch_norm, accumulate_gradients, shard_gradients" in out
    assert main(argv + ["--batch-size", "12"]) == 2
    assert (
        "--batch-size 12 disagrees with --config: train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 2 "
        "x world size 2 is 16" in capsys.readouterr().err
    )


def test_model_from_a_factory_file(tmp_path) -> None:
    source = tmp_path / "my_model.py"
    source.write_text(
        "import torch\n"
        "def make(width=8):\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))\n"
        "    x = torch.randn(8, 4); y = x.sum(1, keepdim=True)\n"
        "    return model, (x, y), torch.nn.functional.mse_loss\n"
    )
    summary = train(dataclasses.replace(TINY, model=f"{source}:make", preset=None, overrides={"width": 6}, steps=3))
    assert summary["params"] == 4 * 6 + 6 + 6 + 1 and summary["losses"][-1] < summary["losses"][0]


@pytest.mark.multiproc
def test_checkpoints_of_worker_processes_reshard(tmp_path) -> None:
    """Each process writes its own shard (its boxes through DCP); threads and processes read each other's."""
    straight = train(dataclasses.replace(TINY, steps=5))
    ckpt = str(tmp_path / "ckpt")
    first = train(dataclasses.replace(TINY, steps=2, save_every=2, checkpoint_dir=ckpt, runtime="process"))
    middle = train(dataclasses.replace(TINY, steps=4, save_every=4, checkpoint_dir=ckpt, resume=True, world_size=1))
    last = train(dataclasses.replace(TINY, steps=5, checkpoint_dir=ckpt, resume=True, runtime="process", zero_stage=1))
    losses = first["losses"] + middle["losses"] + last["losses"]
    assert losses == pytest.approx(straight["losses"], rel=1e-5)
