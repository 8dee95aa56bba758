"""The fp16 loss scale between optimizer steps (Config.mixed_precision="fp16").

The program multiplies the loss by the scale and divides the reduced gradients by it
(passes/scale_loss.py); this object decides the scale, as DeepSpeed's DynamicLossScaler:

- an overflow (the step's gradient norm is inf or NaN) skips the optimizer step; the scale is
  halved (never below min_loss_scale) once `hysteresis` overflows have used up the hysteresis,
  else the hysteresis drops by one;
- after `window` steps in a row without an overflow the scale doubles and the hysteresis is
  refilled;
- an overflow at min_loss_scale stops training (NonFiniteError), as DeepSpeed does: the
  gradients overflow at any scale it may use.

A static scale (Config.loss_scale) never changes; an overflow is then an ordinary
non-finite step for Config.on_nonfinite.
"""

from __future__ import annotations

from typing import Any

from shardfx.config import Config
from shardfx.runtime.nonfinite import NonFiniteError


class LossScaler:
    def __init__(self, config: Config) -> None:
        self.dynamic = config.loss_scale is None
        self.scale = float(config.loss_scale if config.loss_scale is not None else config.initial_loss_scale)
        self.window = config.loss_scale_window
        self.hysteresis = config.loss_scale_hysteresis
        self.min_scale = config.min_loss_scale
        self.iteration = 0  # optimizer steps seen, overflowing ones included
        self.last_overflow = -1
        self.hysteresis_left = self.hysteresis
        self.overflows = 0

    def update(self, overflow: bool, step: int) -> str | None:
        """Account for one optimizer step; returns the line to report when it overflowed."""
        line = None
        if overflow:
            self.overflows += 1
            if self.hysteresis_left == 1 or self.hysteresis == 1:
                if self.scale <= self.min_scale:
                    raise NonFiniteError(
                        f"step {step}: the gradients overflow at the minimum loss scale {self.min_scale:g} "
                        "(Config.min_loss_scale); stopping, as nothing smaller may be tried"
                    )
                new = max(self.scale / 2, self.min_scale)
                line = f"step {step}: fp16 gradient overflow at loss scale {self.scale:g}; step skipped, scale {new:g}"
                self.scale = new
            else:
                self.hysteresis_left -= 1
                line = (
                    f"step {step}: fp16 gradient overflow at loss scale {self.scale:g}; step skipped, scale kept "
                    f"(hysteresis {self.hysteresis_left} left)"
                )
            self.last_overflow = self.iteration
        elif (self.iteration - self.last_overflow) % self.window == 0:
            self.hysteresis_left = self.hysteresis
            self.scale *= 2
        self.iteration += 1
        return line

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "iteration": self.iteration,
            "last_overflow": self.last_overflow,
            "hysteresis_left": self.hysteresis_left,
            "overflows": self.overflows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("scale", "iteration", "last_overflow", "hysteresis_left", "overflows"):
            if not isinstance(state.get(key), (int, float)) or isinstance(state.get(key), bool):
                raise ValueError(f"the checkpoint's loss scaler state has no number {key!r}: {state!r}")
        if self.dynamic:
            self.scale = float(state["scale"])
        self.iteration, self.last_overflow = int(state["iteration"]), int(state["last_overflow"])
        self.hysteresis_left, self.overflows = int(state["hysteresis_left"]), int(state["overflows"])
