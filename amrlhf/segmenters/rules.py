"""Vectorised building blocks shared by the segmenters ([B, T-1] tensors, no loop over tokens)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from amrlhf.losses.reductions import first_response_index
from amrlhf.segmenters.base import Segmentation

Fallback = Literal["ones", "drop"]


def signal(scores: Tensor, resp: Tensor, kind: str, baseline: Tensor, prompt_scores: Tensor | None) -> Tensor:
    """u_t: `level` = s_t - b (b [B]); `increment` = s_t - s_{t-1}, s_{t-1} of the first response
    token being the prompt score s_0 (required). Zero outside the response."""
    if kind == "level":
        u = scores - baseline[:, None]
    elif kind == "increment":
        if prompt_scores is None:
            raise ValueError("the increment signal needs prompt_scores (s_0)")
        prev = torch.cat([scores[:, :1], scores[:, :-1]], dim=1)
        first = first_response_index(resp)
        is_first = torch.zeros_like(resp)
        is_first[torch.arange(resp.shape[0]), first.clamp(max=resp.shape[1] - 1)] = True
        prev = torch.where(is_first & resp, prompt_scores[:, None].to(scores.dtype), prev)
        u = scores - prev
    else:
        raise ValueError(f"signal must be 'level' or 'increment', got {kind!r}")
    return torch.where(resp, u, torch.zeros_like(u))


def hold_last(decided: Tensor, resp: Tensor, init: Tensor) -> Tensor:
    """sigma_t = the last non-zero `decided` value at or before t within the response, else `init` [B].

    decided: [B, T-1] long in {-1, 0, +1}. Vectorised with a cumulative max over positions.
    """
    n = decided.shape[1]
    pos = torch.arange(n, device=decided.device).expand_as(decided)
    last = torch.where((decided != 0) & resp, pos, -1).cummax(dim=1).values
    held = decided.gather(1, last.clamp(min=0))
    sigma = torch.where(last >= 0, held, init[:, None].expand_as(decided))
    return torch.where(resp, sigma, torch.zeros_like(sigma))


def pivots_and_segments(sigma: Tensor, resp: Tensor) -> tuple[Tensor, Tensor]:
    """pivot_t = sigma_t != sigma_{t-1} (both response tokens); segment_id = 1 + #pivots so far."""
    prev = torch.cat([torch.zeros_like(sigma[:, :1]), sigma[:, :-1]], dim=1)
    prev_resp = torch.cat([torch.zeros_like(resp[:, :1]), resp[:, :-1]], dim=1)
    pivot = resp & prev_resp & (sigma != prev)
    segment_id = torch.where(resp, 1 + pivot.long().cumsum(1), torch.zeros_like(sigma))
    return pivot, segment_id


def finish(sigma: Tensor, resp: Tensor, labels: Tensor, *, fallback: Fallback, min_kept_frac: float,
           pivot: Tensor | None = None, segment_id: Tensor | None = None) -> Segmentation:
    """mask = 1[sigma == label] on the response, then the fully-masked fallback (docs/method.md 7-8)."""
    if fallback not in ("ones", "drop"):
        raise ValueError(f"fallback must be 'ones' or 'drop', got {fallback!r}")
    keep = (sigma == labels[:, None]) & resp
    n_resp = resp.sum(-1)
    kept = keep.sum(-1)
    low = (kept == 0) | (kept.float() < min_kept_frac * n_resp.float())
    fell_back = low & (n_resp > 0)
    if fallback == "ones":
        keep = torch.where(fell_back[:, None], resp, keep)
    else:
        keep = keep & ~fell_back[:, None]
    if pivot is None or segment_id is None:
        pivot, segment_id = pivots_and_segments(sigma, resp)
    return Segmentation(mask=keep.to(torch.float32), sigma=sigma, pivot=pivot, segment_id=segment_id,
                        fell_back=fell_back)


def sign_agreeing(x: Tensor, labels: Tensor) -> Tensor:
    """sign(x) with 0 taking the label (an uncertain value agrees with the sequence's label)."""
    s = torch.sign(x).long()
    return torch.where(s == 0, labels[:, None].expand_as(s), s)


def segment_values(segment_id: Tensor, u: Tensor, resp: Tensor, reduce: str) -> Tensor:
    """Per-token value of its segment: `last` = u at the segment's last token, `sum` = sum of u."""
    B, n = u.shape
    on = resp.bool()
    n_seg = int(segment_id.max().item()) + 1 if segment_id.numel() else 1
    if reduce == "sum":
        table = torch.zeros(B, n_seg, dtype=u.dtype, device=u.device).scatter_add_(1, segment_id, u * on.to(u.dtype))
    elif reduce == "last":
        pos = torch.arange(n, device=u.device).expand_as(u)
        last = torch.full((B, n_seg), -1, dtype=torch.long, device=u.device)
        last = last.scatter_reduce(1, segment_id, torch.where(on, pos, -1), reduce="amax")
        table = u.gather(1, last.clamp(min=0))
    else:
        raise ValueError(f"reduce must be 'last' or 'sum', got {reduce!r}")
    return table.gather(1, segment_id)
