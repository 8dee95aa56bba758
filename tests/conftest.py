"""Session-wide test setup.

Generated Triton kernels run in Triton's interpreter on machines without CUDA.
The interpreter must be on before triton is first imported (torch's export can
import it early, during collection of other test folders), so it is switched on
here, at the very start of the session.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
