"""Sequence-reward shaping for the critic-free family, applied to what the advantage estimator sees:
pure functions of response lengths and group rewards."""

from __future__ import annotations

import torch
from torch import Tensor

from amrlhf.errors import ConfigError
from amrlhf.losses.advantages import group_std


class SoftOverlongPunishment:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; TRL's `get_soft_overlong_punishment`): with
    L_max the sampling budget (max_new_tokens) and L_cache = `cache`, a response of |y| tokens gets

        0                                  if |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
        -1                                 if |y| > L_max

    times `factor`, added to its reward. Lengths count response tokens, EOS included."""

    def __init__(self, cache: int, factor: float = 1.0):
        if cache < 1:
            raise ConfigError(f"SoftOverlongPunishment: cache must be >= 1, got {cache}")
        self.cache, self.factor = cache, factor

    def penalty(self, lengths: Tensor, max_len: int) -> Tensor:
        if self.cache > max_len:
            raise ConfigError(f"SoftOverlongPunishment: cache {self.cache} is longer than the sampling budget "
                              f"max_new_tokens={max_len}")
        lengths = lengths.float()
        free = max_len - self.cache
        soft = (free - lengths) / self.cache
        out = torch.where(lengths <= free, torch.zeros_like(lengths), soft)
        return self.factor * torch.where(lengths > max_len, torch.full_like(lengths, -1.0), out)


def zero_std_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[N] bool: rows whose group's rewards are all equal (no group-relative signal; DAPO's dynamic sampling
    leaves such groups out of the batch)."""
    return torch.isclose(group_std(rewards.float(), group_size), rewards.new_zeros((), dtype=torch.float32))
