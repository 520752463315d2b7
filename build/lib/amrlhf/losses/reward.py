"""Bradley-Terry reward-model loss.

L = -log sigmoid(r(x, y_w) - r(x, y_l) - margin), per pair; the optional centring term (TRL's
`center_rewards_coefficient`, Eisenstein et al. 2023) adds coef * mean_pairs (r(x, y_w) + r(x, y_l))^2.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, *, margin: Tensor | float = 0.0) -> Tensor:
    """Per-pair loss [B] from sequence scores chosen [B], rejected [B]."""
    return -F.logsigmoid(chosen - rejected - margin)


def centring_term(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Per-pair (r_w + r_l)^2 [B]: zero when a pair's scores are centred on 0, whatever their margin."""
    return (chosen + rejected) ** 2


def reward_stats(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    """`rm/accuracy` (ties count 0.5) and `rm/margin`, detached means."""
    diff = (chosen - rejected).detach().float()
    acc = (diff > 0).float() + 0.5 * (diff == 0).float()
    return {"rm/accuracy": acc.mean(), "rm/margin": diff.mean()}
