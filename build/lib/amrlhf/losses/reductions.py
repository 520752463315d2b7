"""Masked reductions over the token axis."""

from __future__ import annotations

from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """sum_t mask_t * values_t. `mask` is 0/1 (any dtype); masked positions may hold anything finite."""
    return (values * mask.to(values.dtype)).sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` where `mask` is 1; an all-zero mask gives 0 (not NaN)."""
    m = mask.to(values.dtype)
    if dim is None:
        return (values * m).sum() / m.sum().clamp(min=1)
    return (values * m).sum(dim) / m.sum(dim).clamp(min=1)
