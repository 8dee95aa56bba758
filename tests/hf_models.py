"""Hugging Face models no one here wrote, from tiny configs built in code (random init, nothing
downloaded), shared by the parity and tensor-parallel tests (import from here, never from a test file).

Dropout is off: a split tensor would draw a different mask than eager does."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
T = transformers

VOCAB, SEQ, BATCH = 96, 12, 4
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=SEQ)


def sgd(params):  # type: ignore[no-untyped-def]
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def lm_loss(out, targets: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


class T5(nn.Module):
    """T5 as a language model over one sequence: the encoder reads it, the decoder predicts it."""

    def __init__(self) -> None:
        super().__init__()
        config = T.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
            decoder_start_token_id=0,
        )  # fmt: skip
        self.t5 = T.T5ForConditionalGeneration(config)

    def forward(self, ids: torch.Tensor):  # type: ignore[no-untyped-def]
        return self.t5(input_ids=ids, decoder_input_ids=ids)


MODELS = {
    "gpt2": lambda: T.GPT2LMHeadModel(
        T.GPT2Config(
            vocab_size=VOCAB,
            n_positions=SEQ,
            n_embd=32,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    ),  # fmt: skip
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**LLAMA, num_attention_heads=4, num_key_value_heads=4)),
    # 8 query heads sharing 4 kv heads: both divide tp=2 and tp=4
    "llama-gqa": lambda: T.LlamaForCausalLM(T.LlamaConfig(**LLAMA, num_attention_heads=8, num_key_value_heads=4)),
    "mistral": lambda: T.MistralForCausalLM(
        T.MistralConfig(**LLAMA, num_attention_heads=8, num_key_value_heads=4, sliding_window=None)
    ),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**LLAMA, num_attention_heads=8, num_key_value_heads=4)),
    "phi": lambda: T.PhiForCausalLM(
        T.PhiConfig(**LLAMA, num_attention_heads=4, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    ),
    # multi_query=False: Falcon's per-head interleaved fused q|k|v (multi-query's one kv head cannot split)
    "falcon": lambda: T.FalconForCausalLM(
        T.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
    ),  # fmt: skip
    "gpt-neox": lambda: T.GPTNeoXForCausalLM(
        T.GPTNeoXConfig(**LLAMA, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0)
    ),
    "opt": lambda: T.OPTForCausalLM(
        T.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=SEQ,
            dropout=0.0,
            attention_dropout=0.0,
            word_embed_proj_dim=32,
        )
    ),  # fmt: skip
    "bert": lambda: T.BertForMaskedLM(
        T.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=SEQ,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    ),  # fmt: skip
    "t5": T5,
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]()
