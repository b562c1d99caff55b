"""Learning-rate schedules of the gate module (``LRSchedulerCallable`` targets for the CLI)."""

from __future__ import annotations

import math

import torch


class LinearWarmup(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up over the first ``warmup_fraction`` of the run's optimiser steps, then constant.

    The run length is known only once the trainer has its data: the module calls
    :meth:`set_total_steps` with ``trainer.estimated_stepping_batches`` when training starts (stepped per batch).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_fraction: float = 0.05, total_steps: int = 1):
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        self.warmup_fraction = warmup_fraction
        self.warmup_steps = 0
        self.set_total_steps(total_steps)
        super().__init__(optimizer, self._factor)

    def set_total_steps(self, total_steps: float) -> None:
        """Warm up over ``warmup_fraction`` of ``total_steps`` (an unbounded run warms up over 200 steps);
        the optimiser's current learning rate follows at once (also after a resume mid-run)."""
        self.warmup_steps = int(self.warmup_fraction * total_steps) if math.isfinite(total_steps) else 200
        if hasattr(self, "base_lrs"):  # set after construction: re-apply the factor of the current step
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * self._factor(self.last_epoch)
            self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _factor(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
