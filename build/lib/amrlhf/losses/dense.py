"""Dense token advantages, the pure part: a token scorer's per-token signal and its per-group normalisation
(the component that reads the scorer is `amrlhf.modules.DenseAdvantage`). The alternative to masking
(docs/rl.md compares the two).

Masking keeps the uniform advantage and chooses which tokens carry it; a dense advantage changes the
value each token carries. Per-token signals: `increment` d_t = s_t - s_{t-1} (s_{-1} = the prompt's
score; "RED"-style redistribution of a reward model's prefix scores: the increments of a response sum to
its final score minus the prompt's), or `level` d_t = s_t (a process verifier's per-step verdicts).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from amrlhf.losses.advantages import grouped


def token_signal(scores: Tensor, prompt_scores: Tensor | None, resp: Tensor,
                 signal: Literal["increment", "level"]) -> Tensor:
    """[N, T-1] per-token signal on response tokens (zero elsewhere)."""
    m = resp.to(torch.float32)
    s = scores.float() * m
    if signal == "level":
        return s
    if signal != "increment":
        raise ValueError(f"unknown signal '{signal}': use increment or level")
    prev = torch.cat([s.new_zeros(s.shape[0], 1), s[:, :-1]], dim=1)
    first = (m.cumsum(-1) == 1) & m.bool()  # each row's first response token: its previous score is s_0
    s0 = prompt_scores.float() if prompt_scores is not None else s.new_zeros(s.shape[0])
    prev = torch.where(first, s0[:, None].expand_as(prev), prev)
    return (s - prev) * m


def group_normalise(values: Tensor, resp: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """(x - mean) / (std + eps) over every response token of each group of `group_size` rows (unbiased
    std); zero outside the response."""
    m = resp.to(torch.float32)
    v = values.float() * m
    n = grouped(m.sum(-1), group_size).sum(-1)
    mean = grouped(v.sum(-1), group_size).sum(-1) / n.clamp(min=1)
    mean_r = mean.repeat_interleave(group_size)
    dev = (v - mean_r[:, None]) * m  # two passes: no cancellation when |mean| >> std
    var = grouped((dev * dev).sum(-1), group_size).sum(-1) / (n - 1).clamp(min=1)
    std_r = var.sqrt().repeat_interleave(group_size)
    return dev / (std_r[:, None] + eps)
