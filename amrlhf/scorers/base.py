"""Where token scores come from: the TokenScorer protocol and what a scorer returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from amrlhf.errors import AmrlhfError


@dataclass
class TokenScores:
    """scores [N, T-1] aligned with input_ids[:, 1:] (s_t after reading y_t); prompt_scores [N] (s_0);
    ref_entropy [N, T-1] (entropy of the reference's prediction of each token), when available;
    components: a composite reward's per-component sequence values {name: [N]} (for logging)."""

    scores: Tensor
    prompt_scores: Tensor | None = None
    ref_entropy: Tensor | None = None
    components: dict[str, Tensor] | None = None

    def as_kwargs(self) -> dict:
        return {"scores": self.scores, "prompt_scores": self.prompt_scores, "ref_entropy": self.ref_entropy}


@runtime_checkable
class TokenScorer(Protocol):
    def setup(self, module) -> None:
        """Load what it needs once (frozen models), check the tokenizer matches the policy's."""
        ...

    def score(self, module, batch: dict, split: str) -> TokenScores:
        """Scores for every row of `batch` (no gradient)."""
        ...


def release_models(scorer) -> None:
    """Free a model-backed scorer's frozen models (kept in its `_models`); a scorer without any: nothing."""
    if hasattr(scorer, "_models"):
        scorer._models.clear()


def check_same_tokenizer(scorer_name: str, scorer_tok, policy_tok) -> None:
    """Token scores are per token: a scorer must tokenize exactly as the policy does."""
    a, b = scorer_tok.get_vocab(), policy_tok.get_vocab()
    if a != b:
        diff = len(set(a.items()) ^ set(b.items()))
        raise AmrlhfError(
            f"scorer '{scorer_name}' uses a different tokenizer than the policy ({len(a)} vs {len(b)} tokens, "
            f"{diff} entries differ): token scores would not line up with the policy's tokens"
        )
