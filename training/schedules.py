"""Learning-rate schedules as multiplicative factors of a group's base learning rate.

The factors are picklable callables with plain attributes, so a
:class:`torch.optim.lr_scheduler.LambdaLR` built from them round-trips through
``state_dict()`` / ``load_state_dict()`` (it stores the callables' ``__dict__``). One LambdaLR
step is one optimiser step: ``scheduler.last_epoch`` is the iteration counter.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["Constant", "Poly", "build_scheduler", "poly_lr"]


def poly_lr(base_lr: float, it: int, max_it: int, power: float = 0.9) -> float:
    """Poly decay: ``base_lr * (1 - it / max_it) ** power``, 0 from ``it >= max_it`` on."""
    return base_lr * Poly(max_it, power)(it)


class Poly:
    """Factor ``(1 - it / max_it) ** power`` (0 once ``it >= max_it``); ``max_it >= 1``."""

    def __init__(self, max_it: int, power: float = 0.9) -> None:
        if max_it < 1:
            raise ValueError(f"max_it must be >= 1, got {max_it}")
        self.max_it = max_it
        self.power = power

    def __call__(self, it: int) -> float:
        return max(0.0, 1.0 - it / self.max_it) ** self.power


class Constant:
    """Factor 1 at every iteration."""

    def __call__(self, it: int) -> float:
        return 1.0


def build_scheduler(optimizer: Optimizer, factors: Sequence[Poly | Constant]) -> LambdaLR:
    """A per-iteration LambdaLR with one factor per parameter group, in group order."""
    if len(factors) != len(optimizer.param_groups):
        raise ValueError(
            f"factors has {len(factors)} entries for {len(optimizer.param_groups)} param groups"
        )
    return LambdaLR(optimizer, list(factors))
