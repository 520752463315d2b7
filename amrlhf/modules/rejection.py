"""Adaptive rejection sampling (ARJ / AM-SFT): best-of-N by the reward model, then masked SFT."""

from __future__ import annotations

import torch

from amrlhf.data.collate import pad_rows
from amrlhf.errors import AmrlhfError, ConfigError
from amrlhf.losses.reductions import last_response_index
from amrlhf.sampling import Sampling, generate, prompts_of


class BestOfN:
    """Replaces each SFT batch by the policy's own best-of-N responses to the same prompts.

    N responses are sampled per prompt, scored by the module's scorer (a reward model: the
    sequence score is its prefix score at the last response token), the best is kept with label
    +1; a prompt whose best score is below `min_score` is skipped (counted in `arj/skipped_frac`);
    a batch of which every prompt is skipped trains on nothing (`arj/skipped_batch` = 1 at that step).
    """

    def __init__(self, n: int = 4, sampling: Sampling | None = None, min_score: float | None = None):
        if n < 1:
            raise ConfigError(f"BestOfN: n must be >= 1, got {n}")
        self.n, self.sampling, self.min_score = n, sampling or Sampling(), min_score

    def make_batch(self, module, batch: dict) -> tuple[dict | None, dict]:
        if module.scorer is None:
            raise AmrlhfError("BestOfN needs a scorer (a RewardModelScorer) on the module to rank samples")
        tok = module.trainer.datamodule.tokenizer
        prompts = prompts_of(batch)
        samples = generate(module.policy, prompts, self.n, self.sampling, eos_id=tok.eos_token_id,
                           pad_id=tok.pad_token_id, max_length=module.trainer.datamodule.max_length)
        rows = [(p, s) for p, group in zip(prompts, samples, strict=True) for s in group]
        cand = {k: v.to(module.device) for k, v in pad_rows(rows, tok.pad_token_id).items()}
        cand["labels"] = torch.ones(len(rows), dtype=torch.long, device=module.device)
        scores = module.scorer.score(cand, "train").scores
        last = last_response_index(cand["response_mask"])
        seq = scores[torch.arange(len(rows), device=scores.device), last].view(len(prompts), self.n)
        best_score, best = seq.max(-1)
        keep = torch.ones_like(best_score, dtype=torch.bool) if self.min_score is None else best_score >= self.min_score
        chosen = [i * self.n + int(b) for i, b in enumerate(best) if keep[i]]
        stats = {"arj/best_score": best_score.mean().detach(), "arj/mean_score": seq.mean().detach(),
                 "arj/skipped_frac": 1 - keep.float().mean(),
                 "arj/skipped_batch": torch.tensor(float(not chosen))}
        if not chosen:
            return None, stats
        out = {k: v.to(module.device) for k, v in pad_rows([rows[i] for i in chosen], tok.pad_token_id).items()}
        out["labels"] = torch.ones(len(chosen), dtype=torch.long, device=module.device)
        out["index"] = batch["index"][keep.cpu()] if "index" in batch else torch.arange(len(chosen))
        out["response_lengths"] = out["response_mask"].sum(-1).long()
        return out, stats
