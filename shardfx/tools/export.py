"""`shardfx export`: consolidate a checkpoint into one safetensors file with the model's own names,
or, for a Hugging Face model, into a folder that `from_pretrained` loads.

    shardfx export checkpoints/step-000300 --to model.safetensors
    shardfx export checkpoints/step-000300 --to hf-model --hf

The file loads into a fresh model with
`model.load_state_dict(safetensors.torch.load_file("model.safetensors"))` (strict):
full, unpadded tensors under every key of model.state_dict(), tied names included.
Needs the `safetensors` package.

With --hf (the checkpoint of a transformers.PreTrainedModel, or of a module whose whole state
lies under one) the folder is what the model's own save_pretrained writes: config.json
(architectures names the class, so Auto classes resolve), generation_config.json where the
model generates, and model.safetensors without tied duplicates (lm_head.weight under
tie_word_embeddings); `AutoModelForCausalLM.from_pretrained("hf-model")` loads it. The
folder must not exist or be empty: it is written beside it and renamed into place.
Needs the `transformers` package.
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Any

NAME = "export"
HELP = "consolidate a checkpoint into one safetensors file, or a Hugging Face folder (--hf)"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint folder written by engine.save_checkpoint")
    parser.add_argument(
        "--to", required=True, metavar="PATH", help="the .safetensors file to write (with --hf: a new folder)"
    )
    parser.add_argument(
        "--hf",
        action="store_true",
        help="write a Hugging Face folder (config.json, model.safetensors) for from_pretrained",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    n, size = export_hf(args.checkpoint, args.to) if args.hf else export(args.checkpoint, args.to)
    print(f"wrote {n} tensors ({size / 2**20:.1f} MiB) to {args.to}")
    return 0


def export(checkpoint_dir: str, to: str) -> tuple[int, int]:
    """Write the checkpoint's model state to `to`; returns (tensors, bytes of tensor data)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise NotImplementedError("shardfx export needs the safetensors package: pip install safetensors") from None
    from shardfx.runtime.checkpoint import consolidate

    if not to.endswith(".safetensors"):
        raise ValueError(f"--to must name a .safetensors file; got {to!r}")
    state = {k: v.contiguous() for k, v in consolidate(checkpoint_dir).items()}
    tmp = to + ".tmp"
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, to)  # a reader never sees half a file
    return len(state), sum(v.numel() * v.element_size() for v in state.values())


def export_hf(checkpoint_dir: str, to: str) -> tuple[int, int]:
    """Write the checkpoint of a Hugging Face model as the folder `to` (save_pretrained's layout);
    returns (tensors written, bytes of tensor data)."""
    from shardfx.runtime.checkpoint import consolidate, read_meta, recover

    if to.endswith(".safetensors"):
        raise ValueError(f"--hf writes a folder (config.json, model.safetensors); --to names a file: {to!r}")
    if os.path.isfile(to) or (os.path.isdir(to) and os.listdir(to)):
        raise ValueError(f"--to {to!r} exists and is not empty; --hf writes a new folder (remove it or name another)")
    checkpoint_dir = recover(checkpoint_dir)
    meta = read_meta(checkpoint_dir)
    hf = meta.get("hf")
    if hf is None:
        raise ValueError(
            f"--hf needs the checkpoint of a transformers model (a PreTrainedModel); {checkpoint_dir!r} records "
            "none (another model's, or saved by a shardfx from before --hf)"
        )
    cls = _model_class(hf["class"])
    state = _hf_state(consolidate(checkpoint_dir), meta, hf["prefix"])
    model = _empty_model(cls, hf["config"], state)
    to = os.path.normpath(to)
    tmp = to + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # an export that was killed before
    _save_pretrained(model, tmp, state)
    if os.path.isdir(to):
        os.rmdir(to)  # empty (checked above)
    os.rename(tmp, to)  # a reader never sees half a folder
    return _written(to)


def _model_class(name: str) -> Any:
    """The transformers class called `name`: only a PreTrainedModel subclass that transformers itself exports
    is looked up (no module named by the checkpoint is imported: a crafted file cannot run code)."""
    try:
        import transformers
    except ImportError:
        raise NotImplementedError(
            "shardfx export --hf needs the transformers package: pip install transformers"
        ) from None
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(
            f"the checkpoint's model class {name!r} is not a model class of the installed transformers "
            f"{transformers.__version__} (a model with its own code cannot be exported with --hf)"
        )
    return cls


def _hf_state(state: dict[str, Any], meta: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The HF model's keys (the wrapper's prefix removed), a tied name sharing its tensor with the parameter
    it aliases, as in the model's own state_dict: that is how save_pretrained finds the duplicates to drop."""
    for name, aliases in meta["aliases"].items():
        for alias in aliases:
            state[alias] = state[name]
    return {k.removeprefix(prefix): v for k, v in state.items()}


def _empty_model(cls: Any, config_dict: dict[str, Any], state: dict[str, Any]) -> Any:
    """The model built from its config on the meta device (no memory, no init): save_pretrained needs the
    model (its tied keys, conversions, generation config), not its values."""
    import torch

    config = cls.config_class.from_dict(config_dict)
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    with torch.device("meta"):
        model = cls(config)
    return model.to(floats[0] if floats else torch.float32)  # config.json's dtype is the weights' dtype


def _save_pretrained(model: Any, folder: str, state: dict[str, Any]) -> None:
    """model.save_pretrained with `state` as its weights: drops tied duplicates, reverts the weight conversions
    transformers 5 applies on load, writes config.json with `architectures`; its progress bar kept off."""
    from transformers.utils import logging

    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, state_dict=dict(state))
    finally:
        if bar:
            logging.enable_progress_bar()


def _written(folder: str) -> tuple[int, int]:
    """(tensors, bytes) of the safetensors files in `folder` (bytes on disk: the headers are a few KiB)."""
    from safetensors import safe_open

    n = size = 0
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            file = os.path.join(folder, name)
            with safe_open(file, framework="pt") as f:
                n += len(list(f.keys()))
            size += os.path.getsize(file)
    return n, size
