"""Evaluation: held-out preference accuracy (here), lm-eval suites (evaluation issue)."""

from amrlhf.evaluation.preference import PairLogps, heldout_summary, pair_logps

__all__ = ["PairLogps", "pair_logps", "heldout_summary"]
