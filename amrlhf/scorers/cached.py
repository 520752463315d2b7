"""Token scores precomputed once per example and cached per token (keyed by scorer, its models, data, tokenizer)."""

from __future__ import annotations

from pathlib import Path

from amrlhf.cache import PerTokenCache, model_fingerprint
from amrlhf.errors import AmrlhfError
from amrlhf.models import ModelSpec
from amrlhf.paths import cache_dir
from amrlhf.scorers.base import ScoringContext, TokenScorer, TokenScores, release_models


def scorer_identity(scorer) -> dict:
    """What a scorer's scores depend on besides the data: its class, its models (its ModelSpec attributes, by
    `model_fingerprint`) and its public int / float / str settings. Private attributes are run-time state."""
    return {"scorer": type(scorer).__name__,
            "models": {k: model_fingerprint(v) for k, v in vars(scorer).items() if isinstance(v, ModelSpec)},
            "params": {k: v for k, v in vars(scorer).items() if isinstance(v, int | float | str) and not k.startswith("_")}}


class CachedScorer:
    """Wraps a model-backed scorer: scores every training/validation example once at fit start,
    then serves batches from the cache (no scorer forward pass per step); the scorer's models are
    freed after caching."""

    def __init__(self, source: TokenScorer, cache: str | None = None, batch_size: int = 4):
        self.source, self.batch_size = source, batch_size
        self.cache = PerTokenCache(Path(cache) if cache else None)

    def setup(self, ctx: ScoringContext) -> None:
        if ctx.run_data is None:
            raise AmrlhfError("CachedScorer caches a run's data: outside a run, score with its source (Masker.uncached)")
        self.cache.root = self.cache.root or cache_dir("scores")
        meta = scorer_identity(self.source)

        def compute(batch: dict, split: str):
            out = self.source.score(batch, split)
            return {k: v for k, v in vars(out).items() if v is not None}

        self.cache.fill(ctx.run_data(), meta, lambda: self.source.setup(ctx), compute, device=ctx.device,
                        batch_size=self.batch_size, desc="token scores")
        release_models(self.source)  # the source's frozen models: every later batch reads the cache

    def score(self, batch: dict, split: str) -> TokenScores:
        names = self.cache.tables[split][int(batch["index"][0])][0].keys()
        return TokenScores(**{n: self.cache.lookup(batch, split, n) for n in names})
