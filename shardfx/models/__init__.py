"""Reference models and synthetic data that the compiler is developed and tested against."""

from shardfx.models.data import MarkovTokens
from shardfx.models.gpt import GPT, GPTConfig, gpt_loss, num_params
from shardfx.models.mlp import MLP
from shardfx.models.registry import build_model

__all__ = [
    "GPT",
    "MLP",
    "GPTConfig",
    "MarkovTokens",
    "build_model",
    "gpt_loss",
    "num_params",
]
