"""Statistics pooled over the processes of a multi-device run.

State that every rank keeps a copy of and that is updated from training data (PPO's KL controller,
the score scale, running-mean baselines) must be updated from every rank's data: from each rank's own
rollout, the copies drift apart (and a checkpoint keeps rank 0's). In a single process these are the
plain statistics.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def all_sum(values: Tensor) -> Tensor:
    """`values` (as float64) summed over every process; unchanged in a single process."""
    out = values.detach().to(torch.float64).clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out)
    return out


def mean_and_count(values: Tensor) -> tuple[float, int]:
    """The mean of every element of `values` on every process, and how many elements there are."""
    total, count = all_sum(torch.stack([values.sum(), values.new_tensor(values.numel())])).tolist()
    return (total / count if count else 0.0), int(count)


def std_from_sums(count: float, total: float, total_sq: float) -> float:
    """The sample standard deviation (n - 1) from the count, sum and sum of squares; 1.0 under two values."""
    if count < 2:
        return 1.0
    return math.sqrt(max(total_sq - total * total / count, 0.0) / (count - 1))


def pooled_std(values: Tensor) -> float:
    """The sample standard deviation of every element of `values` on every process."""
    v = values.to(torch.float64)
    count, total, total_sq = all_sum(torch.stack([v.new_tensor(v.numel()), v.sum(), (v * v).sum()])).tolist()
    return std_from_sums(count, total, total_sq)
