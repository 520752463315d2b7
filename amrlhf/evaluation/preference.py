"""Held-out preference accuracy of a policy against its base (the DPO reference).

Per pair i, with sequence log-prob sums (UNMASKED, over response tokens) of the policy (p) and
the base (b), and response token counts n:
  implicit reward margin  m_i = beta * ((p_w - b_w) - (p_l - b_l));  accuracy = 1[m_i > 0] (+0.5 on ties)
  length-normalised preference = 1[p_w / n_w > p_l / n_l] (+0.5 on ties)
  length-only rule = 1[n_w < n_l] (+0.5 on ties): "the shorter response is chosen"
Each is reported as a mean with its standard error (sample std / sqrt(N)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from amrlhf.data.collate import Collator
from amrlhf.data.tokenize import Encoded
from amrlhf.losses import sequence_logps
from amrlhf.models.forward import DEFAULT_LOGITS_CHUNK, lean_forward
from amrlhf.stats import mean_se


@dataclass
class PairLogps:
    chosen: Tensor
    rejected: Tensor
    chosen_len: Tensor
    rejected_len: Tensor


@torch.no_grad()
def pair_logps(model, data: list[Encoded], pad_id: int, batch_size: int = 4, desc: str = "held-out",
               logits_chunk: int | None = DEFAULT_LOGITS_CHUNK) -> PairLogps:
    """Sequence log-prob sums of chosen and rejected responses for every pair (the logits computed
    `logits_chunk` tokens at a time: amrlhf.models.forward.lean_forward)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    collate = Collator(pad_id)
    parts: list[tuple[Tensor, Tensor]] = []
    for start in tqdm(range(0, len(data), batch_size), desc=desc):
        batch = {k: v.to(device) for k, v in collate(data[start:start + batch_size]).items()}
        lp = sequence_logps(lean_forward(model, batch, chunk_size=logits_chunk).logps, batch["response_mask"]).cpu()
        parts.append((lp, batch["response_lengths"].cpu()))
    model.train(was_training)
    lp = torch.cat([torch.stack(p[0].chunk(2)) for p in parts], dim=1)
    ln = torch.cat([torch.stack(p[1].chunk(2)) for p in parts], dim=1)
    return PairLogps(lp[0], lp[1], ln[0].float(), ln[1].float())


def _acc(x: Tensor) -> Tensor:
    return (x > 0).float() + 0.5 * (x == 0).float()


def per_pair(base: PairLogps, policy: PairLogps, beta: float) -> dict[str, Tensor]:
    """The module docstring's per-pair values [N], before averaging (paired comparisons need them)."""
    margin = beta * ((policy.chosen - base.chosen) - (policy.rejected - base.rejected))
    return {
        "implicit_acc": _acc(margin),
        "implicit_margin": margin,
        "lognorm_acc": _acc(policy.chosen / policy.chosen_len - policy.rejected / policy.rejected_len),
        "length_rule_acc": _acc(policy.rejected_len - policy.chosen_len),
    }


def heldout_summary(base: PairLogps, policy: PairLogps, beta: float) -> dict[str, float]:
    pairs = per_pair(base, policy, beta)
    out: dict[str, float] = {"pairs": float(pairs["implicit_acc"].numel())}
    for key, vals in pairs.items():
        out[key], out[f"{key}_se"] = mean_se(vals.float().tolist())
    return out
