"""KL coefficient controllers for PPO's per-token penalty (components chosen by class_path).

Their state is checkpointed (`state_dict`), so a resumed run continues with the same beta.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from amrlhf.errors import ConfigError


@runtime_checkable
class KLController(Protocol):
    value: float

    def update(self, kl: float, n_steps: int) -> None:
        """After a rollout batch: `kl` is its mean sequence KL, `n_steps` its number of sequences."""
        ...


class FixedKL:
    """beta stays `value`."""

    def __init__(self, value: float = 0.05):
        self.value = float(value)

    def update(self, kl: float, n_steps: int) -> None:
        return None

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKL:
    """Ziegler et al. (2019): e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n_steps / horizon."""

    def __init__(self, value: float = 0.05, target: float = 6.0, horizon: int = 10000):
        if target <= 0 or horizon <= 0:
            raise ConfigError(f"AdaptiveKL needs target > 0 and horizon > 0, got target={target} horizon={horizon}")
        self.value, self.target, self.horizon = float(value), float(target), int(horizon)

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
