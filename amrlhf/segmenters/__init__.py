"""Pivot segmenters: turn a sequence-level label (and token scores) into token masks."""

from amrlhf.segmenters.adaptive import AdaptivePivotSegmenter, TokenWiseSegmenter
from amrlhf.segmenters.base import PivotSegmenter, Segmentation, SegmentInputs
from amrlhf.segmenters.baselines import (
           Baseline,
           BatchMeanBaseline,
           ConstantBaseline,
           PromptScoreBaseline,
           RunningMeanBaseline,
)
from amrlhf.segmenters.onesided import SIDES, Side, check_side, on_one_side
from amrlhf.segmenters.random import RandomTokenSegmenter
from amrlhf.segmenters.sample import SampleWiseSegmenter
from amrlhf.segmenters.segmentwise import EntropySegmenter, StepWiseSegmenter
from amrlhf.segmenters.stats import segment_stats
from amrlhf.segmenters.weights import LinearWeightSegmenter, RankWeightSegmenter

__all__ = ["PivotSegmenter", "SegmentInputs", "Segmentation", "SampleWiseSegmenter", "AdaptivePivotSegmenter", "TokenWiseSegmenter",
           "StepWiseSegmenter", "EntropySegmenter", "Baseline", "BatchMeanBaseline", "PromptScoreBaseline", "ConstantBaseline",
           "RunningMeanBaseline", "Side", "SIDES", "check_side", "on_one_side", "RandomTokenSegmenter", "segment_stats", "RankWeightSegmenter", "LinearWeightSegmenter"]
