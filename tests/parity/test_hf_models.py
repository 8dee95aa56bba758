"""Models no one here wrote: Hugging Face transformers from tiny configs (random init, nothing downloaded),
compiled through the driver and trained against eager under SGD with momentum, every state_dict element."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import shardfx
from tests.parity_util import assert_parity

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH = 96, 12, 4


def sgd(params):  # type: ignore[no-untyped-def]
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def lm_loss(out, targets: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())


def gpt2():  # type: ignore[no-untyped-def]
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def llama_gqa():  # type: ignore[no-untyped-def]
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


MODELS = {"gpt2": gpt2, "llama-gqa": llama_gqa}


def batch():  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


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
    torch.manual_seed(0)
    model = MODELS[name]()
    assert_parity(model, batch(), lm_loss, world_size, config, steps=3, optimizer=sgd)
