"""Models no one here wrote: Hugging Face transformers from tiny configs (random init, nothing downloaded),
compiled through the driver and trained against eager under SGD with momentum, every state_dict element."""

from __future__ import annotations

import pytest

import shardfx
from tests.hf_models import batch, build, lm_loss, sgd
from tests.parity_util import assert_parity

MODELS = ("gpt2", "llama-gqa")


@pytest.mark.parametrize(
    "world_size, config",
    [
        (2, shardfx.Config(zero_stage=3)),
        (2, shardfx.Config(zero_stage=1, grad_clip=0.5)),
        (4, shardfx.Config(zero_stage=3, tp_size=2)),
    ],
    ids=["zero3-dp2", "zero1-clip-dp2", "zero3-dp2xtp2"],
)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_hugging_face_models_train_as_eager(name: str, world_size: int, config: shardfx.Config) -> None:
    model = build(name)
    assert_parity(model, batch(), lm_loss, world_size, config, steps=3, optimizer=sgd)
