"""Reference models and synthetic data that the compiler is developed and tested against; token files of real text."""

from shardfx.models.data import MarkovTokens
from shardfx.models.gpt import GPT, GPTConfig, gpt_loss, num_params
from shardfx.models.mlp import MLP
from shardfx.models.registry import build_model
from shardfx.models.tokens import TokenFile, TokenSplit, global_batches, open_tokens

__all__ = [
    "GPT",
    "MLP",
    "GPTConfig",
    "MarkovTokens",
    "TokenFile",
    "TokenSplit",
    "build_model",
    "global_batches",
    "gpt_loss",
    "num_params",
    "open_tokens",
]
