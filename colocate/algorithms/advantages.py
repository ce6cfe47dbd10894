"""Advantage estimators (one module): GRPO, Dr. GRPO, RLOO, REINFORCE++ and PPO's GAE."""

from __future__ import annotations

import enum

__all__ = ["Estimator"]


class Estimator(enum.Enum):
    """How a step's rewards become advantages."""

    GRPO = "grpo"
    DR_GRPO = "dr_grpo"
    RLOO = "rloo"
    REINFORCE_PP = "reinforce_pp"
    GAE = "gae"
