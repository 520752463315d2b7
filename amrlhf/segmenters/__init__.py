"""Pivot segmenters: turn a sequence-level label (and token scores) into token masks."""

from amrlhf.segmenters.base import PivotSegmenter, Segmentation
from amrlhf.segmenters.sample import SampleWiseSegmenter
from amrlhf.segmenters.stats import segment_stats

__all__ = ["PivotSegmenter", "Segmentation", "SampleWiseSegmenter", "segment_stats"]
