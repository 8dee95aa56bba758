"""The options of `shardfx train` (TrainOptions) and the Config, batch size and data they imply."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

import shardfx
from shardfx.deepspeed import DeepSpeedSetup, from_config, read_json
from shardfx.models import GPTConfig, registry
from shardfx.models.tokens import TokenFile, open_tokens
from shardfx.tools.options import model_kwargs

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
    strict_config: bool = False  # a --config key shardfx cannot honour is an error (else listed in the header)
    lr_given: bool = False  # --lr was on the command line (it then fills "auto" and must not fight the file's)
    log_every: int = 10  # a step line every N steps under the progress bar; 0: none
    pp_size: int | None = None  # pipeline stages (None: the --config file's, else 1)
    pp_microbatches: int | None = None  # None: the --config file's, else 2 x pp_size under a pipeline
    pp_schedule: str | None = None  # "gpipe" | "1f1b" (None: 1f1b)
    data: str | None = None  # a token file (shardfx.models.tokens); None: the model's synthetic data
    data_dtype: str | None = None  # "uint16" | "uint32" of a raw file (None: its meta JSON's, else uint16)
    val_fraction: float = 0.1  # the last part of --data held out for validation
    eval_every: int = 0  # validation loss every N steps (and at the end); 0: never
    eval_batches: int = 8  # fixed validation batches the validation loss is the mean over
    data_vocab_size: int | None = None  # filled by check_data: the gpt's vocab_size from --data (unless --set)
    trace_path: str | None = None  # the measured step (and the simulated one) as a Chrome / Perfetto trace
    trace_step: int | None = None  # the optimizer step trace_path measures, counted as the step lines (None: trace_at)
    trace_hardware: str = "auto"  # the cost model's profile for the simulated step beside the measured one


def trace_at(options: TrainOptions, start_step: int) -> int:
    """The step --trace measures: --trace-step, else the second step this run trains (the first also
    allocates the optimizer's state and warms the caches), or its only one."""
    if options.trace_step is not None:
        if not start_step < options.trace_step <= options.steps:
            raise ValueError(
                f"--trace-step {options.trace_step}: this run trains steps {start_step + 1} to {options.steps}; "
                "choose one of them"
            )
        return options.trace_step
    return min(start_step + 2, options.steps)


def train_config(options: TrainOptions) -> shardfx.Config:
    """--config's DeepSpeed file (if any), then the command's own options on top."""
    changes: dict[str, Any] = {"dump_dir": options.dump_dir, "collective_timeout": options.timeout}
    if options.zero_stage is not None:
        changes["zero_stage"] = options.zero_stage
    if options.pp_size is not None:
        changes["pp_size"] = options.pp_size
        file_says = options.ds_config is not None and "gradient_accumulation_steps" in read_json(options.ds_config)[0]
        if options.pp_microbatches is None and options.pp_size > 1 and not file_says:
            changes["pp_microbatches"] = 2 * options.pp_size  # a bubble of (P-1)/(3P-1): under a third
    if options.pp_microbatches is not None:
        changes["pp_microbatches"] = options.pp_microbatches
    if options.pp_schedule is not None:
        changes["pp_schedule"] = options.pp_schedule
    setup = deepspeed_setup(options)
    if setup is None:
        return shardfx.Config().replace(**changes)
    config = setup.config.replace(**changes)
    object.__setattr__(config, "deepspeed_ignored", setup.ignored)
    return config


def deepspeed_setup(options: TrainOptions) -> DeepSpeedSetup | None:
    """--config's DeepSpeed file mapped (shardfx.deepspeed.from_config): Config, optimizer, scheduler.

    "auto" values (as the Hugging Face Trainer writes them) take --lr (lr, warmup_max_lr) and
    --steps (total_num_steps). --lr beside an optimizer section that gives its own lr is an error.
    """
    if options.ds_config is None:
        return None
    auto = {"lr": options.lr, "warmup_max_lr": options.lr, "total_num_steps": options.steps}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # listed in the header instead
        setup = from_config(
            options.ds_config,
            world_size=options.world_size,
            pp_size=options.pp_size or 1,
            strict=options.strict_config,
            auto=auto,
        )
    if options.lr_given and setup.optimizer is not None:
        ds, _ = read_json(options.ds_config)
        given = (ds.get("optimizer", {}).get("params") or {}).get("lr")
        if given is not None and given != "auto":
            raise ValueError(
                f"--lr {options.lr} and --config's optimizer.params.lr {given} disagree; drop one "
                '(or write "lr": "auto" in the file to take --lr)'
            )
    return setup


def batch_size_for(options: TrainOptions, config: shardfx.Config) -> int:
    """--batch-size, else what the --config file implies, else DEFAULT_BATCH_SIZE."""
    if options.batch_size is not None:
        return options.batch_size
    if config.train_batch_size is not None:
        return config.train_batch_size
    if config.micro_batch_size is not None:
        return implied_batch_size(config, options.world_size)[0]
    return DEFAULT_BATCH_SIZE


def implied_batch_size(config: shardfx.Config, world_size: int) -> tuple[int, str]:
    """The global batch a Config with micro_batch_size implies, and how (for errors): micro-batch size x
    micro-batches a step (accumulation, or a pipeline's) x data-parallel ranks."""
    assert config.micro_batch_size is not None
    dp = world_size // (config.pp_size * config.tp_size)
    if config.pp_size > 1:
        micro, what = config.pp_microbatches, "pipeline micro-batches"
    else:
        micro, what = config.grad_accum_steps, "gradient_accumulation_steps"
    return (
        config.micro_batch_size * micro * dp,
        f"train_micro_batch_size_per_gpu {config.micro_batch_size} x {what} {micro} x {dp} data-parallel ranks",
    )


def is_factory(model: str) -> bool:
    return ":" in model


def gpt_config(kwargs: dict[str, Any]) -> GPTConfig:
    """The GPTConfig that build_model("gpt", **kwargs) builds, without its Markov data (see registry.gpt_config)."""
    return registry.gpt_config(**kwargs)


def check_data(options: TrainOptions) -> TrainOptions:
    """Open --data and check it against the model, before any worker starts.

    The built-in gpt takes its vocab_size from the data (the meta JSON's, else the largest
    id + 1) unless --set vocab_size gives it; a factory's model says its own
    (model.config.vocab_size, as GPT, nanoGPT and Hugging Face models do). Returns the options
    with data_vocab_size filled in, so every worker builds the same model without scanning the file.
    """
    if not 0 <= options.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1); got {options.val_fraction}")
    if options.eval_every and not options.val_fraction:
        raise ValueError("--eval-every needs a validation split; --val-fraction 0 holds out nothing")
    if not is_factory(options.model) and options.model != "gpt":
        raise ValueError(f"--data trains a next-token model: --model gpt or a file.py:factory; got {options.model!r}")
    tokens = open_tokens(options.data, options.data_dtype)
    overrides = dict(options.overrides)
    data_vocab = None
    if is_factory(options.model):
        from shardfx.tools.model_spec import load_model_spec

        spec = load_model_spec(options.model, options.preset, overrides, seed=options.seed)
        block_size = factory_block_size(options.model, spec.batch)
        vocab = getattr(getattr(spec.model, "config", None), "vocab_size", None)
        vocab_from = f"{options.model}'s model.config.vocab_size"
    else:
        block_size = gpt_config(model_kwargs(options.model, options.preset, overrides)).seq_len
        vocab = overrides.get("vocab_size")
        vocab_from = "--set vocab_size"
        if vocab is None:
            vocab = data_vocab = tokens.vocab_size()
            vocab_from = data_vocab_from(tokens)
    tokens.split(options.val_fraction, block_size)  # both parts hold a window
    highest = tokens.max_token()
    if "vocab_size" in tokens.meta and highest >= int(tokens.meta["vocab_size"]):
        raise ValueError(
            f"--data {options.data}: token id {highest} does not fit the vocab_size {tokens.meta['vocab_size']} "
            "its meta JSON gives"
        )
    if vocab is not None and highest >= vocab:
        raise ValueError(
            f"--data {options.data}: token id {highest} does not fit the model's vocab_size {vocab} (from {vocab_from}); "
            f"it needs at least {highest + 1}"
        )
    return dataclasses.replace(options, data_vocab_size=data_vocab)


def data_vocab_from(tokens: TokenFile) -> str:
    """Where a token file's vocab_size comes from, for the header and errors."""
    return "the meta JSON" if "vocab_size" in tokens.meta else "the largest id + 1"


def factory_block_size(text: str, batch: tuple[torch.Tensor, ...]) -> int:
    """A factory's example batch must be (tokens, targets), integer (B, T) each, to train on --data; T is the block."""
    if len(batch) != 2 or any(x.dim() != 2 or x.dtype.is_floating_point or x.dtype == torch.bool for x in batch):
        got = ", ".join(f"{str(x.dtype).removeprefix('torch.')} {list(x.shape)}" for x in batch)
        raise ValueError(
            f"--data makes batches of (tokens, targets), integer (B, T) each; the factory {text} returns ({got})"
        )
    if batch[0].shape != batch[1].shape:
        raise ValueError(
            f"--data: the factory {text}'s tokens {list(batch[0].shape)} and targets {list(batch[1].shape)} differ in shape"
        )
    return batch[0].shape[1]
