"""Session-wide test setup.

Generated Triton kernels run in Triton's interpreter on machines without CUDA.
The interpreter must be on before triton is first imported (torch's export can
import it early, during collection of other test folders), so it is switched on
here, at the very start of the session.

The "cpu" hardware profile is the built-in one in every test, worker processes
included: a calibration `shardfx calibrate` saved on the developer's machine
would change what the cost model plans and predicts.
"""

from __future__ import annotations

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ["SHARDFX_HARDWARE_FILE"] = os.path.join(tempfile.mkdtemp(prefix="shardfx-tests-"), "hardware.json")
# launched jobs plan on the built-in "cpu" profile rather than measuring this machine first
# (tests/runtime/test_calibrate_once.py turns it on)
os.environ["SHARDFX_CALIBRATE"] = "0"
