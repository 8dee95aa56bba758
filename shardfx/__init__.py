"""shardfx: a compiler for distributed PyTorch training.

engine = shardfx.compile_distributed(model, world_size=4, example_inputs=batch,
                                     loss_fn=..., optimizer=lambda ps: torch.optim.AdamW(ps),
                                     config=shardfx.Config(zero_stage=3))
loss = engine.train_step(*batch)
"""

from shardfx.api import compile_distributed
from shardfx.config import Config
from shardfx.errors import CollectiveError, PassError, ShardfxError, TraceError, VerificationError
from shardfx.runtime.engine import Engine, NonFiniteError

__all__ = [
    "CollectiveError",
    "Config",
    "Engine",
    "NonFiniteError",
    "PassError",
    "ShardfxError",
    "TraceError",
    "VerificationError",
    "compile_distributed",
]
__version__ = "0.1.0"
