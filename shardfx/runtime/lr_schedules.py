"""DeepSpeed's learning-rate schedules as torch LR schedulers, with the same curves.

`shardfx.deepspeed` builds these from a DeepSpeed config's "scheduler" section. Each is a
torch.optim.lr_scheduler.LRScheduler, stepped once after every applied optimizer step (a
step skipped for an fp16 overflow does not step it, as in DeepSpeed), and saved and loaded
with the checkpoint like any torch scheduler.

DeepSpeed counts `last_batch_iteration` from -1: the value set when the scheduler is built
is the schedule at -1, and the k-th scheduler step moves to k - 1. torch's LRScheduler
steps once in its constructor (last_epoch -1 -> 0), so here iteration = last_epoch - 1.
The formulas are written from DeepSpeed's documented behaviour (deepspeed.runtime.lr_schedules):

- WarmupLR: min_lr at -1; for 0 <= i < W (W = max(2, warmup_num_steps)) min + (max - min) x
  log(i + 1) / log(W) ("log") or x i / W ("linear"); max_lr from W on.
- WarmupDecayLR: as WarmupLR, then min + (max - min) x max(0, (T - i) / max(1, T - W)).
- WarmupCosineLR: a ratio of the optimizer's own lr: 0 at -1; warmup from warmup_min_ratio to
  1 as above; then max(0, c + (1 - c)(1 + cos(pi (i - W + 1) / (T - W))) / 2), c = cos_min_ratio.
- OneCycle: a triangle from cycle_min_lr up to cycle_max_lr over cycle_first_step_size steps and
  back over cycle_second_step_size, then min_lr / (1 + decay_lr_rate x k / decay_step_size) k
  steps after the cycle; Adam's beta1 cycles inversely between cycle_min_mom and cycle_max_mom.
- LRRangeTest: min_lr x (1 + step_rate x (i + 1) / step_size), the quotient floored when staircase.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

WARMUP_TYPES = ("log", "linear")


def _warmup_fraction(iteration: int, steps: int, kind: str) -> float:
    """How far warmup has come at `iteration` (0 <= iteration < steps): 0 at the start, toward 1."""
    if kind == "log":
        return math.log(iteration + 1) / math.log(steps)
    return iteration / steps


def _check_warmup(warmup_num_steps: Any, warmup_type: Any) -> int:
    if isinstance(warmup_num_steps, bool) or not isinstance(warmup_num_steps, int) or warmup_num_steps < 0:
        raise ValueError(f"warmup_num_steps must be an integer >= 0; got {warmup_num_steps!r}")
    if warmup_type not in WARMUP_TYPES:
        raise ValueError(f"warmup_type={warmup_type!r} is not allowed; choose one of {list(WARMUP_TYPES)}")
    return max(2, warmup_num_steps)  # DeepSpeed's floor: log(1) would divide by zero


class _DeepSpeedSchedule(LRScheduler):
    """An LRScheduler whose lr is a function of DeepSpeed's iteration (last_epoch - 1)."""

    def lr_at(self, iteration: int, base_lr: float) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch - 1, base) for base in self.base_lrs]

    # A checkpoint keeps the schedule's position, not its settings (as DeepSpeed keeps only
    # last_batch_iteration): a run resumed with another total_num_steps follows the new curve.
    def state_dict(self) -> dict[str, Any]:
        return {"last_batch_iteration": self.last_epoch - 1, "step_count": self._step_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        iteration, count = state_dict.get("last_batch_iteration"), state_dict.get("step_count")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (iteration, count)):
            raise ValueError(
                f"{type(self).__name__}: a saved position needs integer last_batch_iteration and step_count; got {state_dict!r}"
            )
        self.last_epoch, self._step_count = iteration + 1, count
        self._apply()

    def _apply(self) -> None:
        """Set the optimizer's lr (and what else the schedule drives) for the current position."""
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class WarmupLR(_DeepSpeedSchedule):
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_min_lr: float = 0.0,
        warmup_max_lr: float = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
    ) -> None:
        self.min_lr, self.max_lr = float(warmup_min_lr), float(warmup_max_lr)
        self.warmup_num_steps = _check_warmup(warmup_num_steps, warmup_type)
        self.warmup_type = warmup_type
        super().__init__(optimizer)

    def gamma(self, iteration: int) -> float:
        """The share of (max - min) above min at `iteration` (>= 0)."""
        if iteration < self.warmup_num_steps:
            return _warmup_fraction(iteration, self.warmup_num_steps, self.warmup_type)
        return 1.0

    def lr_at(self, iteration: int, base_lr: float) -> float:
        if iteration < 0:
            return self.min_lr
        return self.min_lr + (self.max_lr - self.min_lr) * self.gamma(iteration)


class WarmupDecayLR(WarmupLR):
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_num_steps: int,
        warmup_min_lr: float = 0.0,
        warmup_max_lr: float = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
    ) -> None:
        if isinstance(total_num_steps, bool) or not isinstance(total_num_steps, int) or total_num_steps < 1:
            raise ValueError(f"total_num_steps must be an integer >= 1; got {total_num_steps!r}")
        self.total_num_steps = total_num_steps
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type)

    def gamma(self, iteration: int) -> float:
        if iteration < self.warmup_num_steps:
            return _warmup_fraction(iteration, self.warmup_num_steps, self.warmup_type)
        left = self.total_num_steps - iteration
        return max(0.0, left / max(1.0, self.total_num_steps - self.warmup_num_steps))


class WarmupCosineLR(_DeepSpeedSchedule):
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_num_steps: int,
        warmup_min_ratio: float = 0.0,
        warmup_num_steps: int = 1000,
        cos_min_ratio: float = 0.0001,
        warmup_type: str = "log",
    ) -> None:
        self.warmup_num_steps = _check_warmup(warmup_num_steps, warmup_type)
        if isinstance(total_num_steps, bool) or not isinstance(total_num_steps, int):
            raise ValueError(f"total_num_steps must be an integer; got {total_num_steps!r}")
        if total_num_steps <= self.warmup_num_steps:
            raise ValueError(
                f"WarmupCosineLR: total_num_steps={total_num_steps} leaves no cosine phase after "
                f"warmup_num_steps={self.warmup_num_steps} (at least 2); it must be larger"
            )
        self.total_num_steps = total_num_steps
        self.warmup_min_ratio, self.cos_min_ratio = float(warmup_min_ratio), float(cos_min_ratio)
        self.warmup_type = warmup_type
        super().__init__(optimizer)

    def ratio(self, iteration: int) -> float:
        if iteration < 0:
            return 0.0
        if iteration < self.warmup_num_steps:
            frac = _warmup_fraction(iteration, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + frac * (1.0 - self.warmup_min_ratio)
        done = iteration - self.warmup_num_steps + 1
        span = self.total_num_steps - self.warmup_num_steps
        cosine = (1 + math.cos(math.pi * done / span)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def lr_at(self, iteration: int, base_lr: float) -> float:
        return base_lr * self.ratio(iteration)


class OneCycle(_DeepSpeedSchedule):
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cycle_min_lr: float,
        cycle_max_lr: float,
        decay_lr_rate: float = 0.0,
        cycle_first_step_size: int = 2000,
        cycle_second_step_size: int | None = None,
        cycle_first_stair_count: int = 0,
        cycle_second_stair_count: int | None = None,
        decay_step_size: int = 0,
        cycle_momentum: bool = True,
        cycle_min_mom: float = 0.8,
        cycle_max_mom: float = 0.9,
        decay_mom_rate: float = 0.0,
    ) -> None:
        # The stair counts are accepted as DeepSpeed accepts them; its curve does not use them either.
        first = float(cycle_first_step_size)
        second = float(cycle_second_step_size) if cycle_second_step_size is not None else first
        if first <= 0 or second <= 0:
            raise ValueError(f"OneCycle: the cycle's step sizes must be > 0; got {first:g} and {second:g}")
        self.total_size = first + second
        self.step_ratio = first / self.total_size
        self.min_lr, self.max_lr, self.decay_lr_rate = float(cycle_min_lr), float(cycle_max_lr), float(decay_lr_rate)
        self.decay_step_size = decay_step_size
        if (decay_lr_rate or decay_mom_rate) and not decay_step_size:
            raise ValueError("OneCycle: decay_lr_rate or decay_mom_rate needs decay_step_size > 0")
        # DeepSpeed cycles Adam's beta1 (beta2 set to 0.99), and only where the optimizer has betas.
        self.cycle_momentum = bool(cycle_momentum) and "betas" in optimizer.defaults
        self.min_mom, self.max_mom, self.decay_mom_rate = (
            float(cycle_min_mom),
            float(cycle_max_mom),
            float(decay_mom_rate),
        )
        super().__init__(optimizer)

    def _scale(self, iteration: int) -> float:
        batch = iteration + 1
        x = 1.0 + batch / self.total_size - math.floor(1 + batch / self.total_size)
        return x / self.step_ratio if x <= self.step_ratio else (x - 1) / (self.step_ratio - 1)

    def lr_at(self, iteration: int, base_lr: float) -> float:
        if iteration < self.total_size:
            return self.min_lr + (self.max_lr - self.min_lr) * self._scale(iteration)
        if self.decay_lr_rate == 0:
            return self.min_lr
        k = iteration - self.total_size + 1
        return self.min_lr / (1 + self.decay_lr_rate * k / self.decay_step_size)

    def momentum_at(self, iteration: int) -> float:
        if iteration < 0:
            return self.min_mom  # what DeepSpeed sets when the scheduler is built
        if iteration < self.total_size:
            return self.max_mom - (self.max_mom - self.min_mom) * self._scale(iteration)
        if self.decay_mom_rate == 0:
            return self.max_mom
        k = iteration - self.total_size + 1
        return self.max_mom * (1 + self.decay_mom_rate * k / self.decay_step_size)

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        self._apply_momentum()

    def _apply(self) -> None:
        super()._apply()
        self._apply_momentum()

    def _apply_momentum(self) -> None:
        if self.cycle_momentum:
            beta1 = self.momentum_at(self.last_epoch - 1)
            for group in self.optimizer.param_groups:
                group["betas"] = (beta1, 0.99)


class LRRangeTest(_DeepSpeedSchedule):
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr_range_test_min_lr: float = 1e-3,
        lr_range_test_step_size: int = 2000,
        lr_range_test_step_rate: float = 1.0,
        lr_range_test_staircase: bool = False,
    ) -> None:
        if not lr_range_test_step_size or lr_range_test_step_size <= 0:
            raise ValueError(f"lr_range_test_step_size must be > 0; got {lr_range_test_step_size!r}")
        self.min_lr, self.step_size = float(lr_range_test_min_lr), lr_range_test_step_size
        self.step_rate, self.staircase = float(lr_range_test_step_rate), bool(lr_range_test_staircase)
        super().__init__(optimizer)

    def lr_at(self, iteration: int, base_lr: float) -> float:
        interval = (iteration + 1) / self.step_size
        if self.staircase:
            interval = math.floor(interval)
        return self.min_lr * (1 + self.step_rate * interval)


SCHEDULES: dict[str, type[LRScheduler]] = {
    cls.__name__: cls for cls in (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest)
}
