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
                "zero_optimization": {"stage": 2, "contiguous_gradients": True, "offload_optimizer": {"device": "cpu"}},
            }
        )
    )
    argv = ["train", "--runtime", "local", "--world-size", "2", "--preset", "tiny", "--steps", "2"]
    argv += ["--config", str(ds), "--log-every", "1", "--no-progress"]  # the batch size comes from the file
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ZeRO stage 2" in out and "global batch 16 (2 micro-batches a step)" in out
    # contiguous_gradients=true is what the compiler does anyway; offload is named with its reason
    assert "ds config   ignored: zero_optimization.offload_optimizer.device (no CPU/NVMe offload in shardfx)" in out
    assert "step      2  loss" in out and "peak/rank" in out and "(planned)" in out and "sent/rank" in out
    # the gradients wait in full-size accumulators for the last micro-batch
    assert "accumulators/rank" in out and "passes: sync_batch_norm, accumulate_gradients, shard_gradients" in out
    assert main(argv + ["--batch-size", "12"]) == 2
    assert (
        "--batch-size 12 disagrees with --config: train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 2 "
        "x 2 data-parallel ranks is 16" in capsys.readouterr().err
    )


def test_a_pipelines_batch_from_the_file(tmp_path, capsys) -> None:
    """Under --pp-size the file's gradient_accumulation_steps are the pipeline's micro-batches and the
    batch counts the data-parallel ranks only (DeepSpeed's PipelineEngine)."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}))
    argv = ["train", "--runtime", "local", "--world-size", "4", "--pp-size", "2", "--preset", "tiny", "--steps", "1"]
    assert main([*argv, "--config", str(ds), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "pipeline 1f1b, 3 micro-batches" in out and "global batch 12" in out  # 2 x 3 x 2 dp ranks


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


def test_deepspeed_optimizer_scheduler_and_fp16_from_the_command_line(tmp_path, capsys) -> None:
    ds = {
        "train_batch_size": 8,
        "steps_per_print": 2,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": 4, "warmup_type": "linear"}},
        "fp16": {"enabled": True, "initial_scale_power": 8},
        "zero_optimization": {"stage": 2},
    }  # fmt: skip
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    argv = ["train", "--runtime", "local", "--world-size", "2", "--preset", "tiny", "--steps", "4", "--no-progress"]
    argv += ["--config", str(path), "--strict-config", "--lr", "0.002", "--json", str(tmp_path / "run.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "AdamW(lr=0.002, weight_decay=0.01), schedule WarmupLR(warmup_max_lr=0.002" in out
    assert "precision   fp16 compute, fp32 master parameters, loss scale 256 (dynamic)" in out
    # steps_per_print=2 gives the step lines; the LR the line shows is the next step's: WarmupLR's linear ramp
    assert "step      2" in out and "step      4" in out and "step      1 " not in out
    # after 2 scheduler steps DeepSpeed's iteration is 1: 0.002 x 1/4; after 4, 0.002 x 3/4
    assert "lr 0.0005  loss scale 256" in out and "lr 0.0015  loss scale 256" in out
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["optimizer"].startswith("AdamW") and summary["scheduler"].startswith("WarmupLR")
    # strict: a key shardfx cannot honour stops the run before it starts, in one line
    ds["zero_optimization"]["offload_param"] = {"device": "nvme"}
    path.write_text(json.dumps(ds))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zero_optimization.offload_param.device (no CPU/NVMe offload in shardfx)" in err[0]
    # --lr against a file that sets its own
    ds["optimizer"]["params"]["lr"] = 1e-3
    del ds["zero_optimization"]["offload_param"]
    path.write_text(json.dumps(ds))
    assert main(argv) == 2
    assert "--lr 0.002 and --config's optimizer.params.lr 0.001 disagree" in capsys.readouterr().err
