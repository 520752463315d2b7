"""Per-token log-probabilities, aligned as docs/method.md says.

Position t of every per-token tensor ([B, T-1]) describes token t+1 of `input_ids`:
log pi(y_t) comes from the logits at the position before y_t.
"""

from __future__ import annotations

import torch
from torch import Tensor

from amrlhf.losses.reductions import masked_sum


def token_logprobs(logits: Tensor, input_ids: Tensor, *, rows_per_chunk: int = 1) -> Tensor:
    """log softmax(logits[:, t])[input_ids[:, t+1]] for t in 0..T-2.

    Args:
        logits: [B, T, V] (any float dtype; computed in float32).
        input_ids: [B, T].
    Returns:
        [B, T-1] float32.

    Memory-lean: never materialises a full [B, T, V] log-softmax; works `rows_per_chunk`
    sequences at a time (gather the target logit, subtract the row's logsumexp).
    """
    labels = input_ids[:, 1:]
    out = []
    for start in range(0, logits.shape[0], rows_per_chunk):
        chunk = logits[start:start + rows_per_chunk, :-1].float()
        target = chunk.gather(-1, labels[start:start + rows_per_chunk, :, None]).squeeze(-1)
        out.append(target - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out, dim=0)


def sequence_logps(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Sequence log-prob = SUM over the masked (response) tokens. [B, T-1] -> [B]."""
    return masked_sum(token_logps, mask)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last axis, in float32, one row at a time (no [N, K, V]
    float32 copy of a low-precision batch)."""
    out = []
    for row in logits:
        logp = row.float().log_softmax(-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.stack(out)
