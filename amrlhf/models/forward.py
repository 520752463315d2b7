"""One forward pass to per-token log-probs, computing logits only where they are needed.

The vocabulary projection dominates a small model's cost (SmolLM2: 49k x 576); prompt positions
need none of it. `logits_to_keep` asks the model for the last K positions only, K reaching back to
the earliest response token of the batch, so prompt-side logits are never materialised.
"""

from __future__ import annotations

import torch
from torch import Tensor

from amrlhf.losses import token_logprobs


def response_logps(model, batch: dict, *, with_logits: bool = False) -> tuple[Tensor, Tensor | None]:
    """-> (log-probs [N, T-1] aligned with input_ids[:, 1:], zero before the earliest response
    token of the batch; the kept logits [N, K, V] or None). Position t of the kept logits is
    position T-K+t of the sequence."""
    logps, logits, _ = policy_forward(model, batch)
    return logps, (logits if with_logits else None)


def policy_forward(model, batch: dict, *, hidden: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """-> (log-probs [N, T-1] as in `response_logps`, kept logits [N, K, V], and the last hidden
    state [N, T, H] at every position when `hidden` (for a value head sharing the backbone))."""
    ids, resp = batch["input_ids"], batch["response_mask"]
    T = ids.shape[1]
    has = resp.bool().any(0)
    first = int(has.float().argmax()) if bool(has.any()) else T - 2
    keep = T - first
    out = model(input_ids=ids, attention_mask=batch["attention_mask"], logits_to_keep=keep, use_cache=False,
                output_hidden_states=hidden)
    logps = token_layout(token_logprobs(out.logits, ids[:, T - keep:]), T)
    return logps, out.logits, (out.hidden_states[-1] if hidden else None)


def token_layout(part: Tensor, T: int) -> Tensor:
    """Per-token values of the last k predicted tokens [N, k] -> the per-token layout [N, T-1]
    (aligned with input_ids[:, 1:]), zero for the earlier positions. From K kept logits, the values
    of their first K-1 positions (the last one predicts nothing) are the last K-1 tokens."""
    return torch.cat([part.new_zeros(part.shape[0], T - 1 - part.shape[1]), part], dim=1)


def mean_response_logits(logits: Tensor, response_mask: Tensor) -> Tensor:
    """Mean raw logit over every response token of the rows given and the vocabulary, one scalar
    (TRL's `logits/*`: token-weighted, a long response counts for its length). `logits` are the
    kept logits of `response_logps` (the last K positions)."""
    keep = logits.shape[1]
    per_pos = logits[:, :-1].detach().mean(-1, dtype=torch.float32)  # no float32 copy of the logits
    m = response_mask[:, response_mask.shape[1] - keep + 1:].to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp(min=1)
