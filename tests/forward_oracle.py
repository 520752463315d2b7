"""The unchunked forward written plainly, as the tests' oracle for `amrlhf.models.forward.lean_forward`: the
model's own forward with `logits_to_keep` reaching back to the earliest response token, its logits kept."""

from __future__ import annotations

import torch
from torch import Tensor

from amrlhf.losses.logprobs import token_logprobs
from amrlhf.models.forward import first_predicted, token_layout


def policy_forward(model, batch: dict, *, hidden: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """-> (log-probs [N, T-1] aligned with input_ids[:, 1:], zero before the earliest response token of the
    batch; the kept logits [N, K, V] (position t is position T-K+t of the sequence); the last hidden state
    [N, T, H] at every position when `hidden`)."""
    ids = batch["input_ids"]
    T = ids.shape[1]
    keep = T - first_predicted(batch["response_mask"])
    out = model(input_ids=ids, attention_mask=batch["attention_mask"], logits_to_keep=keep, use_cache=False,
                output_hidden_states=hidden)
    logps = token_layout(token_logprobs(out.logits, ids[:, T - keep:]), T)
    return logps, out.logits, (out.hidden_states[-1] if hidden else None)


def response_logps(model, batch: dict, *, with_logits: bool = False) -> tuple[Tensor, Tensor | None]:
    """-> (the log-probs of `policy_forward`, its kept logits when `with_logits`, else None)."""
    logps, logits, _ = policy_forward(model, batch)
    return logps, (logits if with_logits else None)


def mean_response_logits(logits: Tensor, response_mask: Tensor) -> Tensor:
    """TRL's `logits/*` from the kept logits of `policy_forward` (the last K positions): the mean raw logit over
    every response token of the rows given and the vocabulary, token-weighted."""
    keep = logits.shape[1]
    per_pos = logits[:, :-1].detach().mean(-1, dtype=torch.float32)
    m = response_mask[:, response_mask.shape[1] - keep + 1:].to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp(min=1)
