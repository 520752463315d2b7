"""The adaptive pivot segmenter (this method) and the token-wise baseline (docs/method.md)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from amrlhf.errors import ConfigError
from amrlhf.losses.reductions import first_response_index
from amrlhf.segmenters.base import PivotSegmenter, Segmentation, SegmentInputs
from amrlhf.segmenters.baselines import Baseline, PromptScoreBaseline, RunningMeanBaseline
from amrlhf.segmenters.rules import Fallback, finish, hold_last, sign_agreeing, signal


class _ScoredSegmenter(PivotSegmenter):
    """Common state: signal kind, baseline, score scale (measured on training data), fallback."""

    calibrated_by_scale = True

    def __init__(self, signal: Literal["level", "increment"], baseline: Baseline | None, scale: float,
                 fallback: Fallback, min_kept_frac: float):
        self.signal, self.baseline = signal, baseline or PromptScoreBaseline()
        self.scale, self.fallback, self.min_kept_frac = scale, fallback, min_kept_frac
        if scale <= 0:
            raise ConfigError(f"{type(self).__name__}: scale must be > 0, got {scale}")

    def _u(self, x: SegmentInputs, resp: Tensor) -> Tensor:
        scores, prompt_scores = x.scores, x.prompt_scores
        if scores is None:
            raise ValueError(f"{type(self).__name__} needs token scores: give the module a `scorer`")
        scores = scores.float()
        b = self.baseline.value(scores, resp, prompt_scores) if self.signal == "level" else None
        u = signal(scores, resp, self.signal, b, None if prompt_scores is None else prompt_scores.float())
        return u / self.scale

    def calibrate(self, scale: float) -> None:
        """Set the score scale (std of scores on training data), so delta is in standard deviations."""
        self.scale = max(float(scale), 1e-8)

    def observe(self, scores: Tensor, response_mask: Tensor) -> None:
        """Called by the module after a training batch: updates a running-mean baseline."""
        if isinstance(self.baseline, RunningMeanBaseline):
            self.baseline.update(scores.float(), response_mask.float())

    def state_dict(self) -> dict:
        state = {"scale": self.scale}
        if hasattr(self.baseline, "state_dict"):  # a stateful baseline (RunningMeanBaseline, or a user's own)
            state["baseline"] = self.baseline.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.scale = state["scale"]
        if "baseline" in state:
            self.baseline.load_state_dict(state["baseline"])


class AdaptivePivotSegmenter(_ScoredSegmenter):
    """Hysteresis segments between pivot tokens (docs/method.md 2-8).

    u_t = signal / scale; sigma_t = +1 if u_t > delta, -1 if u_t < -delta, else sigma_{t-1}.
    The first response token, in band, takes the label (`first_token: label`) or sign(u_1) with 0
    counting as +1 (`first_token: sign`). Pivots: sigma_t != sigma_{t-1}. mask = 1[sigma == label].
    A response kept below `min_kept_frac` (or not at all) falls back: `ones` keeps every token
    (default for DPO/PPO), `drop` keeps none (default for AM-SFT: the example contributes nothing).

    Args:
        delta: half-width of the band, in units of `scale` (standard deviations once calibrated).
        signal: `level` (u = s - b) or `increment` (u = s_t - s_{t-1}, s_0 = prompt score).
        baseline: PromptScoreBaseline (default), ConstantBaseline, RunningMeanBaseline.
        scale: score standard deviation; set from training data by the module (`calibrate`).
    """

    def __init__(self, delta: float = 0.3, signal: Literal["level", "increment"] = "level",
                 baseline: Baseline | None = None, scale: float = 1.0,
                 first_token: Literal["label", "sign"] = "label", fallback: Fallback = "ones",
                 min_kept_frac: float = 0.0):
        super().__init__(signal, baseline, scale, fallback, min_kept_frac)
        if delta < 0:
            raise ConfigError(f"{type(self).__name__}: delta must be >= 0, got {delta}")
        if first_token not in ("label", "sign"):
            raise ConfigError(f"{type(self).__name__}: first_token must be 'label' or 'sign', got {first_token!r}")
        self.delta, self.first_token = delta, first_token

    def segment(self, x: SegmentInputs) -> Segmentation:
        resp, labels = x.response_mask.bool(), x.labels.long()
        u = self._u(x, resp)
        decided = (u > self.delta).long() - (u < -self.delta).long()
        if self.first_token == "label":
            init = labels
        else:  # sign of the first response token's u, 0 counting as +1
            first = first_response_index(resp)
            u1 = u.gather(1, first.clamp(max=resp.shape[1] - 1)[:, None]).squeeze(1)
            init = torch.where(u1 < 0, -1, 1).long()
        sigma = hold_last(decided, resp, init)
        return finish(sigma, resp, labels, fallback=self.fallback, min_kept_frac=self.min_kept_frac)


class TokenWiseSegmenter(_ScoredSegmenter):
    """delta = 0, no hysteresis: m_t = 1[sign(u_t) == label], u_t = 0 counting as agreeing."""

    def __init__(self, signal: Literal["level", "increment"] = "level", baseline: Baseline | None = None,
                 scale: float = 1.0, fallback: Fallback = "ones", min_kept_frac: float = 0.0):
        super().__init__(signal, baseline, scale, fallback, min_kept_frac)

    def segment(self, x: SegmentInputs) -> Segmentation:
        resp, labels = x.response_mask.bool(), x.labels.long()
        u = self._u(x, resp)
        sigma = torch.where(resp, sign_agreeing(u, labels), 0)
        return finish(sigma, resp, labels, fallback=self.fallback, min_kept_frac=self.min_kept_frac)
