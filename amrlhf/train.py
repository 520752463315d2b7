"""Training as a library call, for every orchestrator: `amrlhf fit` (cli.py) and `amrlhf study` (study/runner.py,
which also runs the quickstart, a study of one seed) train through `run_lightning`, and check recipes and read training
statistics through the helpers here. Nothing here imports an orchestrator."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

from amrlhf.errors import AmrlhfError
from amrlhf.lightning_cli import AmrlhfCLI


def run_lightning(argv: list[str]) -> AmrlhfCLI:
    """One Lightning command (`fit`, `validate`, `test`) from an argument list -> the CLI object (its
    `.model`, `.trainer`). Studies call it with their own `sys.argv` (`amrlhf study X.yaml`)
    still set: the argument list is deliberate, so Lightning's warning about having both is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return AmrlhfCLI(args=argv)


def check_recipes(path: Path, fits: list[dict]) -> None:
    """Parse every fit's recipe (with its args) before anything runs, so a typo in the last stage
    does not cost the earlier ones."""
    for i, entry in enumerate(fits):
        configs = [entry["config"]] if isinstance(entry["config"], str) else entry["config"]
        args = ["fit", *(arg for c in configs for arg in ("--config", c)), *map(str, entry.get("args", [])), "--print_config"]
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                run_lightning(args)
        except AmrlhfError as exc:
            raise AmrlhfError(f"{path}: fit[{i}] ({entry['config']}) does not parse: {exc}") from None
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise AmrlhfError(f"{path}: fit[{i}] ({entry['config']}) does not parse: see the message above") from None


def training_means(logger, keys) -> dict[str, float]:
    """Mean over training steps of the logged `segments/*` values (absent for the sample-wise path). A step
    logged twice (replayed after a crash and resume) counts once, with its last value."""
    out = {}
    for key in keys:
        last: dict[int, float] = {}
        for m in sorted(logger.experiment.get_metric_history(logger.run_id, key), key=lambda m: m.timestamp):
            last[m.step] = m.value  # stable sort: a tie in time keeps the order MLflow returned
        if last:
            out[key] = sum(last.values()) / len(last)
    return out
