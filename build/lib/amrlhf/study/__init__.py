"""`amrlhf study`: methods x seeds at one budget, held-out metrics per item, paired deltas."""

from amrlhf.study.config import Study, load_study
from amrlhf.study.stats import Delta, mean_se, paired_delta

__all__ = ["Study", "load_study", "Delta", "mean_se", "paired_delta"]
