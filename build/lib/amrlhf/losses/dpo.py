"""DPO and its variants, over masked per-token log-ratios.

With d_t = log pi_theta(y_t) - log pi_ref(y_t) and the segmenter's mask m_t:
    D_w = sum_t m^w_t d^w_t,   D_l = sum_t m^l_t d^l_t,   h = D_w - D_l.
With m = 1 every variant is exactly its unmasked original. Each variant is a class (pick it by
`class_path` in a recipe); all share one method signature, the `DPOLoss` protocol (`loss`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from amrlhf.errors import ConfigError


@runtime_checkable
class DPOLoss(Protocol):
    beta: float

    def loss(self, d_chosen: Tensor, d_rejected: Tensor, n_chosen: Tensor, n_rejected: Tensor) -> Tensor:
        """Per-pair loss [B] from masked log-ratio sums [B] and kept-token counts [B]."""
        ...


def _check_smoothing(eps: float) -> float:
    if not 0.0 <= eps < 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5), got {eps}")
    return eps


class SigmoidDPO:
    """L = -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h). eps > 0 is cDPO (label smoothing)."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        self.beta, self.label_smoothing = beta, _check_smoothing(label_smoothing)

    def loss(self, d_chosen: Tensor, d_rejected: Tensor, n_chosen: Tensor, n_rejected: Tensor) -> Tensor:
        z = self.beta * (d_chosen - d_rejected)
        eps = self.label_smoothing
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


class RobustDPO:
    """TRL's robust loss (Chowdhury et al. 2024), noise rate eps:
    L = ((1-eps)(-log sigmoid(beta h)) + eps log sigmoid(-beta h)) / (1 - 2 eps)."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1):
        self.beta, self.label_smoothing = beta, _check_smoothing(label_smoothing)

    def loss(self, d_chosen: Tensor, d_rejected: Tensor, n_chosen: Tensor, n_rejected: Tensor) -> Tensor:
        z = self.beta * (d_chosen - d_rejected)
        eps = self.label_smoothing
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


class HingeDPO:
    """SLiC-style hinge: L = max(0, 1 - beta h)."""

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    def loss(self, d_chosen: Tensor, d_rejected: Tensor, n_chosen: Tensor, n_rejected: Tensor) -> Tensor:
        return torch.relu(1 - self.beta * (d_chosen - d_rejected))


class IPO:
    """IPO (Azar et al. 2023): each side normalised by its kept-token count,
    L = (D_w / n_w - D_l / n_l - 1 / (2 beta))^2."""

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    def loss(self, d_chosen: Tensor, d_rejected: Tensor, n_chosen: Tensor, n_rejected: Tensor) -> Tensor:
        h = d_chosen / n_chosen.clamp(min=1) - d_rejected / n_rejected.clamp(min=1)
        return (h - 1 / (2 * self.beta)) ** 2


def dpo_stats(
    beta: float,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
) -> dict[str, Tensor]:
    """TRL's metric keys and definitions, from UNMASKED sequence log-prob sums [B]; detached per-pair values.

    rewards/* = beta * (log pi - log pi_ref); rewards/accuracies = 1[chosen > rejected] (a tie counts 0).
    """
    rc = beta * (policy_chosen - ref_chosen).detach()
    rr = beta * (policy_rejected - ref_rejected).detach()
    return {
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/margins": rc - rr,
        "rewards/accuracies": (rc > rr).float(),
        "logps/chosen": policy_chosen.detach(),
        "logps/rejected": policy_rejected.detach(),
    }
