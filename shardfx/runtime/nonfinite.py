"""What a non-finite loss or gradient norm does to an optimizer step (Config.on_nonfinite).

"skip": the step's gradients are dropped and the step is counted as skipped, with a
line naming the step, the micro-batch whose loss was not finite and the norm;
"stop": NonFiniteError with the same message; "ignore": the optimizer steps anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm was NaN or infinite and Config.on_nonfinite is "stop"."""


class NonFinitePolicy:
    def __init__(self, mode: str, log: Callable[[str], None]) -> None:
        self.mode = mode
        self._log = log
        self._bad_loss: tuple[int, float] | None = None  # (micro-batch, loss) of the first non-finite loss

    def record_loss(self, micro_batch: int, loss: float) -> None:
        if not math.isfinite(loss) and self._bad_loss is None:
            self._bad_loss = (micro_batch, loss)

    def forget(self) -> None:
        self._bad_loss = None

    def allows_step(self, step: int, norm: float | None) -> bool:
        """Whether optimizer step `step` (its losses recorded, its gradient norm `norm`: None if not
        measured) may run; forgets the step's losses. Raises NonFiniteError under "stop"."""
        bad_loss, self._bad_loss = self._bad_loss, None
        bad_norm = norm is not None and not math.isfinite(norm)
        if (bad_loss is None and not bad_norm) or self.mode == "ignore":
            return True
        where = f"loss {bad_loss[1]} (micro-batch {bad_loss[0]})" if bad_loss else "loss finite"
        message = f"step {step}: non-finite {where}, gradient norm {norm}"
        if self.mode == "stop":
            raise NonFiniteError(message + "; stopping (Config.on_nonfinite='stop')")
        self._log(message + "; optimizer step skipped (Config.on_nonfinite='skip')")
        return False
