"""Callbacks shared by every module."""

from amrlhf.callbacks.evaluation import LmEval
from amrlhf.callbacks.fault import CrashAtStep
from amrlhf.callbacks.memory import MapLargeAllocations
from amrlhf.callbacks.segments_view import SegmentsView
from amrlhf.callbacks.tracking import TrackRun

__all__ = ["TrackRun", "CrashAtStep", "SegmentsView", "LmEval", "MapLargeAllocations"]
