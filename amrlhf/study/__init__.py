"""`amrlhf study`: methods x seeds at one budget, held-out metrics per item, paired deltas."""

from amrlhf.stats import Delta, mean_se, paired_delta
from amrlhf.study.config import Study, load_study

__all__ = ["Study", "load_study", "Delta", "mean_se", "paired_delta"]
