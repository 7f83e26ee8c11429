"""The NaN/inf guard: skip a step whose losses are not finite, stop after too many in a row.

Use it before the optimizer step (under DDP every rank must take the same decision, hence the all-reduce)::

    losses = {"loss/dm": loss_dm, "loss/gan": loss_gan}
    if guard.check(losses):
        accelerator.backward(loss_dm + loss_gan)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from crossdistill.errors import CrossDistillError

logger = logging.getLogger(__name__)


class TrainingDivergedError(CrossDistillError):
    """Losses were NaN/inf for too many steps in a row."""


class NonFiniteGuard:
    """Count non-finite losses; raise :class:`TrainingDivergedError` after ``max_consecutive`` in a row."""

    def __init__(self, max_consecutive: int = 5, *, accelerator: Any = None):
        self.max_consecutive = max_consecutive  # non-finite steps in a row before the run is stopped
        self.accelerator = accelerator  # with several processes, a step is skipped if any rank saw a non-finite loss
        self.consecutive = 0  # current run of skipped steps
        self.num_skipped = 0  # skipped steps since this process started

    def check(self, losses: Mapping[str, Any], step: int | None = None) -> bool:
        """True if every loss is finite (take the step); False to skip it. Raises after too many skips in a row."""
        bad = [k for k, v in losses.items() if not _finite(v)]
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            flag = torch.tensor(float(len(bad) > 0), device=self.accelerator.device)
            if self.accelerator.reduce(flag, reduction="sum").item() > 0 and not bad:
                bad = ["<another process>"]
        if not bad:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.num_skipped += 1
        where = f"step {step}: " if step is not None else ""
        logger.warning(
            "%snon-finite loss in %s; step skipped (%d in a row, stop at %d)",
            where,
            ", ".join(bad),
            self.consecutive,
            self.max_consecutive,
        )
        if self.consecutive >= self.max_consecutive:
            raise TrainingDivergedError(
                f"{where}losses were NaN/inf for {self.consecutive} steps in a row (last: {', '.join(bad)}); "
                "lower the learning rate (--set optim.lr=...), or check the data and the model weights"
            )
        return False


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(float(value))
