"""Kernel tests run generated Triton kernels in Triton's interpreter (no GPU needed).

The interpreter must be on before any kernel is defined, so it is switched on
here, before the test modules import shardfx.kernels. Every test here skips
when triton is not importable.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
if "triton" in sys.modules:  # imported before this conftest (tests/conftest.py normally prevents it)
    sys.modules["triton"].knobs.runtime.interpret = True
