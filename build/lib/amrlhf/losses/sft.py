"""Supervised fine-tuning loss: masked token-mean negative log-likelihood.

L = sum_{b,t} m_bt * (-log pi(y_bt)) / N, where N is the number of kept tokens in the whole
(global) batch: every device and every micro-batch of one optimizer step. The function returns
sums; the caller divides by the global count, so gradient accumulation and multi-device
training give the same loss as one big batch.
"""

from __future__ import annotations

from torch import Tensor

from amrlhf.losses.reductions import masked_sum


def nll_sums(token_logps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example NLL sums and kept-token counts.

    Args:
        token_logps: [B, T-1] log pi(y_t).
        mask: [B, T-1] 1 where the token counts (response tokens kept by the segmenter).
    Returns:
        (nll_sum [B], n_tokens [B]); loss = nll_sum.sum() / global n_tokens.sum().
    """
    return -masked_sum(token_logps, mask), mask.sum(-1).to(token_logps.dtype)
