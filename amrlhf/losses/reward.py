"""Bradley-Terry reward-model loss.

L = -log sigmoid(r(x, y_w) - r(x, y_l) - margin), per pair.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, *, margin: Tensor | float = 0.0) -> Tensor:
    """Per-pair loss [B] from sequence scores chosen [B], rejected [B]."""
    return -F.logsigmoid(chosen - rejected - margin)


def reward_stats(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    """`rm/accuracy` (ties count 0.5) and `rm/margin`, detached means."""
    diff = (chosen - rejected).detach().float()
    acc = (diff > 0).float() + 0.5 * (diff == 0).float()
    return {"rm/accuracy": acc.mean(), "rm/margin": diff.mean()}
