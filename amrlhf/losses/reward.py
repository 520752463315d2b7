"""Reward-model losses.

Bradley-Terry: L = -log sigmoid(r(x, y_w) - r(x, y_l) - margin), per pair; the optional centring term (TRL's
`center_rewards_coefficient`, Eisenstein et al. 2023) adds coef * mean_pairs (r(x, y_w) + r(x, y_l))^2.

Token-level (a per-token "risk" model, trained on annotated spans): each response token t carries a label
f_t = 1 where it lies in a flawed span, 0 elsewhere; the head's output s_t is the logit of "good so far", so
L = mean over response tokens of BCE(sigmoid(s_t), 1 - f_t) = softplus(-s_t) on good tokens, softplus(s_t)
on flawed ones. A trained head scores good tokens above 0 and flawed ones below, the sign convention of every
token scorer (higher is better).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from amrlhf.losses.reductions import masked_mean


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


def token_label_loss(scores: Tensor, flawed: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level reward-model loss over response tokens -> (scalar loss, detached stats).

    scores [N, T-1] (logit of "good"), flawed [N, T-1] (1 inside an annotated flawed span, 0 elsewhere),
    mask [N, T-1] (response tokens). Stats: `rm/token_accuracy` (sign of s_t agrees with the label; 0 counts
    as flawed), `rm/flaw_recall` (flawed tokens scored below 0; 0 when a batch has none), `rm/flawed_frac`."""
    good = 1.0 - flawed.float()
    per_token = F.binary_cross_entropy_with_logits(scores.float(), good, reduction="none")
    loss = masked_mean(per_token, mask)
    with_flaw = flawed.float() * mask
    right = ((scores.detach() > 0).float() == good).float()
    stats = {
        "rm/token_accuracy": masked_mean(right, mask).detach(),
        "rm/flaw_recall": ((scores.detach() <= 0).float() * with_flaw).sum() / with_flaw.sum().clamp(min=1),
        "rm/flawed_frac": masked_mean(flawed.float(), mask).detach(),
    }
    return loss, stats
