"""Masked reductions over the token axis, and where each row's response starts and ends."""

from __future__ import annotations

import torch
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


def first_response_index(resp: Tensor) -> Tensor:
    """[B] aligned index of each row's first response token (T-1 for an empty response).
    argmax returns the first maximal index (a reduction over bytes: much faster than a long min)."""
    on = resp.bool()
    first = on.to(torch.uint8).argmax(-1)
    return torch.where(on.any(-1), first, resp.shape[1])


def last_response_index(resp: Tensor, empty: int = -1) -> Tensor:
    """[B] aligned index of each row's last response token; `empty` for a row without one (-1 by default;
    0 where the index is used to read or write a position whose value the caller then zeroes)."""
    on = resp.bool()
    last = resp.shape[1] - 1 - on.flip(-1).to(torch.uint8).argmax(-1)
    return torch.where(on.any(-1), last, empty)
