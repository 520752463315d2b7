"""Where token scores come from: the TokenScorer protocol, what a scorer's set-up may read (ScoringContext)
and what a scorer returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from amrlhf.cache import RunData
from amrlhf.errors import AmrlhfError
from amrlhf.models.forward import DEFAULT_LOGITS_CHUNK


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


@dataclass(frozen=True)
class ScoringContext:
    """What a scorer's set-up may read, instead of the LightningModule: the policy's tokenizer (token scores
    must line up with its tokens), the device the batches live on, how many positions a lean forward turns
    into logits at a time, whether the rows ship their own token scores, and the run's data, built on demand
    (None outside a run: held-out scoring, `amrlhf segments`), which a caching scorer fills its tables from."""

    tokenizer: Any
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    logits_chunk: int | None = DEFAULT_LOGITS_CHUNK
    rows_have_token_scores: bool = False
    run_data: Callable[[], RunData] | None = None


@runtime_checkable
class TokenScorer(Protocol):
    def setup(self, ctx: ScoringContext) -> None:
        """Load what it needs once (frozen models, on ctx.device), check its tokenizer matches ctx.tokenizer."""
        ...

    def score(self, batch: dict, split: str) -> TokenScores:
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
