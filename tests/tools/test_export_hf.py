"""`shardfx export --hf`: the checkpoint of a Hugging Face model becomes a folder `from_pretrained` loads,
giving the trained model's logits."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import shardfx
from shardfx.models import GPT, GPTConfig, gpt_loss
from shardfx.runtime.checkpoint import hf_model_meta, read_meta
from shardfx.tools.cli import main

pytest.importorskip("safetensors")
hf = pytest.importorskip("tests.hf_models")
T = hf.T


def _train_and_save(model: nn.Module, path: str, loss_fn=hf.lm_loss) -> shardfx.Engine:  # type: ignore[no-untyped-def]
    batch = hf.batch()
    engine = shardfx.compile_distributed(
        model, 2, example_inputs=batch, loss_fn=loss_fn, optimizer=hf.sgd, config=shardfx.Config(zero_stage=3)
    )
    for _ in range(2):
        engine.train_step(*batch)
    engine.save_checkpoint(path)
    return engine


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(hf.batch()[0]).logits


@pytest.mark.parametrize(
    ("name", "cls", "tied"),
    [("llama", T.LlamaForCausalLM, False), ("gpt2", T.GPT2LMHeadModel, True)],
)
def test_export_hf_loads_with_from_pretrained_and_gives_the_trained_logits(tmp_path, name, cls, tied) -> None:
    engine = _train_and_save(hf.build(name), str(tmp_path / "ckpt"))
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "ckpt"), "--to", str(out), "--hf"]) == 0

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [cls.__name__]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) is not tied  # save_pretrained's layout: the tied head is not stored

    loaded = T.AutoModelForCausalLM.from_pretrained(str(out))
    assert type(loaded) is cls
    trained = hf.build(name)
    trained.load_state_dict(engine.state_dict())
    torch.testing.assert_close(_logits(loaded), _logits(trained), rtol=0, atol=0)
    assert not torch.equal(_logits(loaded), _logits(hf.build(name)))  # the steps changed the weights


class _Wrapped(nn.Module):
    """A user's module around the HF model: its whole state lies under `hf.`."""

    def __init__(self) -> None:
        super().__init__()
        self.hf = hf.build("llama")

    def forward(self, ids: torch.Tensor):  # type: ignore[no-untyped-def]
        return self.hf(input_ids=ids)


def test_export_hf_of_a_wrapped_model_drops_the_wrapper_prefix(tmp_path) -> None:
    engine = _train_and_save(_Wrapped(), str(tmp_path / "ckpt"))
    assert read_meta(str(tmp_path / "ckpt"))["hf"]["prefix"] == "hf."
    assert main(["export", str(tmp_path / "ckpt"), "--to", str(tmp_path / "hf"), "--hf"]) == 0
    trained = _Wrapped()
    trained.load_state_dict(engine.state_dict())
    loaded = T.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"))
    torch.testing.assert_close(_logits(loaded), _logits(trained.hf), rtol=0, atol=0)


def test_a_wrapper_with_state_of_its_own_is_not_recorded_as_an_hf_model() -> None:
    wrapped = _Wrapped()
    assert hf_model_meta(wrapped)["class"] == "LlamaForCausalLM"
    wrapped.scale = nn.Parameter(torch.ones(()))  # outside the HF model: an export would lose it
    assert hf_model_meta(wrapped) is None
    assert hf_model_meta(nn.Linear(2, 2)) is None


def test_export_hf_refuses_a_checkpoint_of_another_model(tmp_path, capsys) -> None:
    config = GPTConfig(vocab_size=32, n_layer=1, d_model=16, n_head=2, seq_len=8)
    batch = torch.randint(0, 32, (4, 8)), torch.randint(0, 32, (4, 8))
    engine = shardfx.compile_distributed(GPT(config), 2, example_inputs=batch, loss_fn=gpt_loss, optimizer=hf.sgd)
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    assert "hf" not in read_meta(str(tmp_path / "ckpt"))
    assert main(["export", str(tmp_path / "ckpt"), "--to", str(tmp_path / "hf"), "--hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--hf needs the checkpoint of a transformers model" in err
    assert not (tmp_path / "hf").exists()


def test_export_hf_refuses_a_folder_that_is_not_empty(tmp_path, capsys) -> None:
    _train_and_save(hf.build("llama"), str(tmp_path / "ckpt"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    assert main(["export", str(tmp_path / "ckpt"), "--to", str(tmp_path / "hf"), "--hf"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["notes.txt"]
    (tmp_path / "hf" / "notes.txt").unlink()  # an empty folder is written into
    assert main(["export", str(tmp_path / "ckpt"), "--to", str(tmp_path / "hf"), "--hf"]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()


def test_a_checkpoint_with_a_malformed_hf_field_is_refused_by_name(tmp_path) -> None:
    _train_and_save(hf.build("llama"), str(tmp_path / "ckpt"))
    file = tmp_path / "ckpt" / "shardfx.json"
    meta = json.loads(file.read_text())
    meta["hf"]["class"] = 3
    file.write_text(json.dumps(meta))
    with pytest.raises(shardfx.errors.CheckpointError, match="'hf.class' is 3"):
        read_meta(str(tmp_path / "ckpt"))
