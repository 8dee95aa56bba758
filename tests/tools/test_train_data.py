"""`shardfx train --data`: token files, held-out validation, a factory on the user's data; `shardfx prepare-data`;
the step line (planned peak memory, lr) and no progress-bar frames off a terminal."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from tqdm import tqdm

import shardfx
from shardfx.graphs.analysis import memory_timeline
from shardfx.models import build_model
from shardfx.models.tokens import meta_path, open_tokens
from shardfx.tools.cli import main
from shardfx.tools.prepare_data import prepare_pydoc, pydoc_text
from shardfx.tools.train import TrainOptions, train
from shardfx.tools.train_report import BAR_FORMAT, PeakMemory, step_line

TINY = TrainOptions(world_size=2, preset="tiny", steps=6, batch_size=8, progress=False, runtime="local")


@pytest.fixture(scope="module")
def pydoc(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "pydoc.bin"
    prepare_pydoc(path)
    return str(path)


def _raw(tmp_path, ids, dtype="<u2", name="tokens.bin") -> str:
    path = tmp_path / name
    np.asarray(ids, dtype=dtype).tofile(path)
    return str(path)


def test_prepare_data_writes_pydoc_bytes_and_its_meta(tmp_path, capsys) -> None:
    out = tmp_path / "sub" / "pydoc.bin"
    assert main(["prepare-data", str(out)]) == 0
    assert f"wrote {out}: " in capsys.readouterr().out
    text = pydoc_text().encode()
    ids = np.fromfile(out, dtype="<u2")
    assert out.stat().st_size == 2 * len(text) and bytes(ids.astype(np.uint8)) == text
    meta = json.loads(meta_path(out).read_text())
    assert meta["vocab_size"] == 256 and meta["dtype"] == "uint16" and meta["tokens"] == len(text) > 400_000
    assert meta["source"].startswith("pydoc_data.topics")
    assert main(["prepare-data", "--help"]) == 0
    assert "pydoc_data.topics" in capsys.readouterr().out
    assert main(["prepare-data", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_data_with_eval_reports_validation_loss(pydoc, tmp_path, capsys) -> None:
    path = tmp_path / "run.json"
    argv = ["train", "--runtime", "local", "--world-size", "2", "--preset", "tiny", "--steps", "10"]
    argv += ["--batch-size", "8", "--data", pydoc, "--eval-every", "4", "--eval-batches", "2", "--no-progress"]
    assert main([*argv, "--log-every", "0", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    summary = json.loads(path.read_text())
    assert [step for step, _ in summary["val_losses"]] == [4, 8, 10]  # every 4 steps and at the end
    assert summary["val_loss"] == summary["val_losses"][-1][1]
    assert summary["val_losses"][-1][1] < summary["val_losses"][0][1] < math.log(256)
    assert summary["model_config"]["vocab_size"] == 256 and summary["uniform_loss"] == pytest.approx(math.log(256))
    assert summary["floor"] is None and summary["data"]["vocab_from"] == "the meta JSON"
    assert summary["data"]["val_tokens"] == round(0.1 * summary["data"]["tokens"])
    assert f"validation  {summary['val_loss']:.4f} at step 10 (mean of 2 held-out batches)" in out
    assert re.search(r"^step      8  loss \d\.\d{4}  val \d\.\d{4}  ", out, re.M)  # an eval step prints its line


def test_vocab_comes_from_the_largest_id_and_must_fit(tmp_path, capsys) -> None:
    data = _raw(tmp_path, np.arange(2000) % 100)  # no meta JSON: vocab 100
    summary = train(dataclasses.replace(TINY, steps=2, data=data))
    assert summary["model_config"]["vocab_size"] == 100 and summary["data"]["vocab_from"] == "the largest id + 1"
    argv = ["train", "--preset", "tiny", "--world-size", "2", "--batch-size", "8", "--data", data]
    assert main([*argv, "--set", "vocab_size=64"]) == 2  # default runtime: refused before the workers start
    captured = capsys.readouterr()
    assert "worker processes" not in captured.out
    assert captured.err.strip() == (
        f"shardfx train: error: --data {data}: token id 99 does not fit the model's vocab_size 64 "
        "(from --set vocab_size); it needs at least 100"
    )


@pytest.mark.parametrize(
    "content, extra, message",
    [
        (None, [], r"token file '.*tokens\.bin' does not exist"),
        (b"", [], r"token file '.*tokens\.bin' is empty"),
        (b"\x01\x00\x02", [], r"has 3 bytes, not a whole number of uint16 ids"),
        (b"\x01\x00" * 100, ["--data-dtype", "uint32"], r"the validation split \(5 of 50 tokens"),
        (b"\x01\x00" * 16, ["--val-fraction", "0"], r"the train split \(16 of 16 tokens.*block_size \+ 1 = 17"),
        (b"\x01\x00" * 17, ["--val-fraction", "0", "--eval-every", "2"], r"--eval-every needs a validation split"),
    ],
)
def test_bad_data_is_a_one_line_error_before_workers_start(tmp_path, capsys, content, extra, message) -> None:
    path = tmp_path / "tokens.bin"
    if content is not None:
        path.write_bytes(content)
    argv = ["train", "--preset", "tiny", "--world-size", "2", "--batch-size", "8", "--data", str(path), *extra]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "worker processes" not in captured.out and len(captured.err.strip().splitlines()) == 1
    assert re.search(message, captured.err), captured.err


def test_eval_every_needs_data_and_data_needs_a_token_model(tmp_path, capsys) -> None:
    assert main(["train", "--preset", "tiny", "--eval-every", "5"]) == 2
    assert "--eval-every needs --data" in capsys.readouterr().err
    assert main(["train", "--model", "mlp", "--data", _raw(tmp_path, range(100))]) == 2
    assert "--data trains a next-token model: --model gpt or a file.py:factory; got 'mlp'" in capsys.readouterr().err


def test_resume_on_data_continues_the_same_windows(pydoc, tmp_path) -> None:
    options = dataclasses.replace(TINY, steps=4, data=pydoc, zero_stage=1)
    straight = train(options)
    ckpt = str(tmp_path / "ckpt")
    train(dataclasses.replace(options, steps=2, save_every=2, checkpoint_dir=ckpt))
    rest = train(dataclasses.replace(options, resume=True, checkpoint_dir=ckpt))
    assert rest["losses"] == pytest.approx(straight["losses"][2:], rel=1e-5)
    reseeded = train(dataclasses.replace(options, seed=1))
    assert reseeded["losses"][1:] != pytest.approx(straight["losses"][1:], rel=1e-3)


FACTORY = """
import torch
from dataclasses import dataclass

@dataclass
class Config:
    vocab_size: int = 300

class Bigram(torch.nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.config = Config(vocab_size)
        self.table = torch.nn.Embedding(vocab_size, vocab_size)
        torch.nn.init.zeros_(self.table.weight)  # uniform logits: the first loss is log(vocab_size)

    def forward(self, tokens):
        return self.table(tokens)

def loss(logits, targets):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

def make(vocab_size=300):
    tokens = torch.zeros(4, 12, dtype=torch.long)
    return Bigram(vocab_size), (tokens, tokens), loss

def make_float():
    return torch.nn.Linear(3, 1), (torch.randn(4, 3), torch.randn(4, 1)), torch.nn.functional.mse_loss
"""


def test_a_factory_trains_on_data_with_its_own_shapes(pydoc, tmp_path, capsys) -> None:
    source = tmp_path / "user.py"
    source.write_text(FACTORY)
    options = dataclasses.replace(TINY, model=f"{source}:make", preset=None, data=pydoc, steps=8, eval_every=8, lr=0.1)
    summary = train(options)
    assert summary["batch_size"] == 4 and summary["data"]["block_size"] == 12
    assert summary["data"]["vocab_size"] == 300
    losses = summary["losses"]
    # The factory's one batch of zeros would be learnt alone; real windows differ every step and the loss falls.
    assert losses[0] == pytest.approx(math.log(300)) and len(set(losses)) == len(losses)
    assert losses[-1] < losses[0] and summary["val_loss"] < math.log(300) - 0.1
    argv = ["train", "--world-size", "2", "--data", pydoc]
    assert main([*argv, "--model", f"{source}:make", "--set", "vocab_size=200"]) == 2
    assert "token id 226 does not fit the model's vocab_size 200" in capsys.readouterr().err
    assert main([*argv, "--model", f"{source}:make_float"]) == 2
    err = capsys.readouterr().err
    assert "integer (B, T) each; the factory" in err and "(float32 [4, 3], float32 [4, 1])" in err


def test_step_line_shows_the_planned_peak_and_the_lr() -> None:
    model, loss_fn, make_batch = build_model("gpt", preset="tiny")
    batch = make_batch(8, torch.Generator().manual_seed(0))
    peaks = {}
    for stage in (0, 3):
        engine = shardfx.compile_distributed(
            model,
            2,
            example_inputs=batch,
            loss_fn=loss_fn,
            optimizer=lambda params: torch.optim.AdamW(params, lr=2e-3),
            config=shardfx.Config(zero_stage=stage),
        )
        engine.train_step(*batch)
        peak = PeakMemory(engine)
        expected = memory_timeline(engine.programs()["step"]).peak + engine.stats()["memory"]["optimizer"]
        assert peak.kind == "planned" and peak.read() == expected
        peaks[stage] = expected
        line = step_line(engine, 1, 4.0, 1000.0, "tok/s", (peak.read(), peak.kind), val_loss=3.5)
        assert f"peak/rank {expected / 2**20:.2f} MiB (planned)" in line
        assert "lr 0.002" in line and "val 3.5000" in line and "mem/rank" not in line
    assert peaks[3] < peaks[0]  # ZeRO-3 gathers parameters only while they are used


def test_no_bar_frames_off_a_terminal_and_the_bar_fits_80_columns(capsys) -> None:
    argv = ["train", "--runtime", "local", "--world-size", "2", "--preset", "tiny", "--steps", "3"]
    assert main([*argv, "--batch-size", "4", "--log-every", "1"]) == 0  # progress on, but stdout is captured
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("step ")]
    assert len(lines) == 3 and all("peak/rank" in line and "(planned)" in line and "lr 0.003" in line for line in lines)
    assert "\r" not in captured.out + captured.err and "%|" not in captured.out + captured.err
    for total in (200, 1_000_000):
        text = tqdm.format_meter(total // 2, total, 75.0, ncols=80, prefix="train", unit="step", postfix="loss 3.142",
                                 bar_format=BAR_FORMAT)  # fmt: skip
        assert len(text) <= 80 and len(text.split("|")[1]) == 12, text
    text = tqdm.format_meter(100, 200, 75.0, ncols=80, prefix="train", unit="step", postfix="loss 3.142",
                             bar_format=BAR_FORMAT)  # fmt: skip
    assert text.endswith("loss 3.142]"), text


@pytest.mark.multiproc
def test_validation_on_worker_processes_matches_threads(pydoc) -> None:
    """engine.eval_step on the process runtime: each rank evaluates its slice and the loss is the global mean."""
    options = dataclasses.replace(TINY, steps=4, data=pydoc, eval_every=2, eval_batches=2, zero_stage=3)
    on_threads = train(options)
    on_processes = train(dataclasses.replace(options, runtime="process"))
    assert [s for s, _ in on_processes["val_losses"]] == [2, 4]
    val = [loss for _, loss in on_processes["val_losses"]]
    assert val == pytest.approx([loss for _, loss in on_threads["val_losses"]], rel=1e-5)
    assert on_processes["losses"] == pytest.approx(on_threads["losses"], rel=1e-5)


def test_open_tokens_of_the_prepared_file_reads_the_text(pydoc) -> None:
    tokens = open_tokens(pydoc)
    assert tokens.vocab_size() == 256 and bytes(tokens.tokens[:50].astype(np.uint8)) == pydoc_text().encode()[:50]
