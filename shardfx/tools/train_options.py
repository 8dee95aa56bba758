"""The options of `shardfx train` (TrainOptions) and the Config and batch size they imply."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import shardfx

DEFAULT_BATCH_SIZE = 32  # sequences a step when neither --batch-size nor --config says


@dataclass
class TrainOptions:
    """What `shardfx train` runs; the defaults are the command's defaults (about a minute on 2 CPU cores)."""

    world_size: int = 4
    model: str = "gpt"
    preset: str | None = None  # None: the model's default preset ("small" for gpt)
    overrides: dict[str, Any] = field(default_factory=dict)
    steps: int = 200
    batch_size: int | None = None  # global, split over the ranks; None: from the --config file, else 32
    lr: float = 3e-3
    zero_stage: int | None = None  # None: the --config file's stage, else 0
    seed: int = 0
    dump_dir: str | None = None
    progress: bool = True
    json_path: str | None = None
    runtime: str = "process"  # "process": one process per rank (torch.distributed); "local": threads
    timeout: float = 60.0  # seconds a rank may wait in a collective before the job fails
    save_every: int = 0  # write a checkpoint every N steps (and at the end); 0: never
    checkpoint_dir: str = "checkpoints"
    resume: bool = False  # continue from checkpoint_dir/latest
    ds_config: str | None = None  # a DeepSpeed JSON config
    log_every: int = 10  # a step line every N steps under the progress bar; 0: none
    pp_size: int | None = None  # pipeline stages (None: the --config file's, else 1)
    pp_microbatches: int | None = None  # None: the --config file's, else 2 x pp_size under a pipeline
    pp_schedule: str | None = None  # "gpipe" | "1f1b" (None: 1f1b)


def train_config(options: TrainOptions) -> shardfx.Config:
    """--config's DeepSpeed file (if any), then the command's own options on top."""
    changes: dict[str, Any] = {"dump_dir": options.dump_dir, "collective_timeout": options.timeout}
    if options.zero_stage is not None:
        changes["zero_stage"] = options.zero_stage
    if options.pp_size is not None:
        changes["pp_size"] = options.pp_size
        if options.pp_microbatches is None and options.pp_size > 1:
            changes["pp_microbatches"] = 2 * options.pp_size  # a bubble of (P-1)/(3P-1): under a third
    if options.pp_microbatches is not None:
        changes["pp_microbatches"] = options.pp_microbatches
    if options.pp_schedule is not None:
        changes["pp_schedule"] = options.pp_schedule
    if options.ds_config is None:
        return shardfx.Config().replace(**changes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # named in the header instead
        base = shardfx.Config.from_deepspeed(
            options.ds_config, world_size=options.world_size, pp_size=options.pp_size or 1
        )
    config = base.replace(**changes)
    object.__setattr__(config, "deepspeed_unsupported", base.deepspeed_unsupported)
    return config


def batch_size_for(options: TrainOptions, config: shardfx.Config) -> int:
    """--batch-size, else what the --config file implies, else DEFAULT_BATCH_SIZE."""
    if options.batch_size is not None:
        return options.batch_size
    if config.train_batch_size is not None:
        return config.train_batch_size
    if config.micro_batch_size is not None:
        dp = options.world_size // (config.pp_size * config.tp_size)
        micro = config.pp_microbatches if config.pp_size > 1 else config.grad_accum_steps
        return config.micro_batch_size * micro * dp
    return DEFAULT_BATCH_SIZE


def is_factory(model: str) -> bool:
    return ":" in model
