"""LightningCLI for `amrlhf fit|validate|test --config RECIPE.yaml`.

Adds to plain LightningCLI: runs write to `<runs_root>/<run_name>/` (default run name: the
recipe's folder and file name, e.g. `dpo-smollm2`, so `--ckpt_path last` finds the run), an MLflow logger (reattached on
resume), last/best checkpoints (each written to a temporary file beside it and renamed over it: a kill leaves the
previous one whole), the resolved recipe saved with the run, and `data.tokenizer` defaulting to the policy's
(a reward model's `model`'s) tokenizer. Expected mistakes (a recipe key or value the parser refuses, a setting a class
refuses, a trainer set-up Lightning refuses, a missing or damaged
checkpoint, a runs folder that cannot be written) end as one AmrlhfError; SIGTERM / SIGINT during fit end as
Interrupted after a resumable last.ckpt (callbacks/interrupt.py).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from jsonargparse import ArgumentError
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from amrlhf.callbacks import TrackRun
from amrlhf.callbacks.checkpoint import StepCheckpoint
from amrlhf.callbacks.interrupt import StopOnSignal
from amrlhf.errors import AmrlhfError, Interrupted
from amrlhf.modules import AlignmentModule
from amrlhf.tracking import RunWriter, Tracking, make_logger

log = logging.getLogger(__name__)
PARTIAL = ".partial"  # `.<name>.partial`: a checkpoint being written beside `<name>`


def default_run_name(recipe: Path) -> str:
    """`recipes/dpo/smollm2.yaml` -> `dpo-smollm2` (unique across algorithms, stable across runs)."""
    parent = recipe.resolve().parent.name
    return recipe.stem if parent in ("recipes", "") else f"{parent}-{recipe.stem}"


def _module_class(class_path: str):
    import importlib

    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def expected_cause(exc: BaseException) -> AmrlhfError | None:
    """The AmrlhfError an exception was raised from, if any: jsonargparse re-raises an error of a class's
    constructor as a ValueError per level of nesting ("Does not validate against any of the Union subtypes")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, AmrlhfError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _recipe_files(argv: list[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _command_line_keys(argv: list[str]) -> set[str]:
    """The keys the command line sets (`--trainer.max_steps=5`, `--trainer.max_steps 5`), recipe files aside."""
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and not a.startswith("--config")}


_PARSER_KEY = re.compile(r'Parser key "([^"]+)":')


def refused_recipe(argv: list[str], message: str) -> str:
    """jsonargparse's refusal of a recipe (a usage dump and a nested report) as one line: where (the recipe file(s);
    "or the command line" where that sets the refused key or a key above it), the key, the class and what is wrong;
    for an option a class does not take, the options it takes."""
    key = _PARSER_KEY.match(message)
    problem = re.search(r"Problem with given class_path '([^']+)':\n(.*?)(?=\n\s*- |\n\s*Given value|\Z)", message,
                        re.DOTALL)
    full = key.group(1) if key else None
    if problem is None:
        lines = [line.strip() for line in message.splitlines() if not line.strip().startswith("Given value")]
        what = _PARSER_KEY.sub(r"\1:", " ".join(line for line in lines if line))
    else:
        class_path = problem.group(1)
        detail = _PARSER_KEY.sub(r"\1:", " ".join(line.strip() for line in problem.group(2).splitlines()))
        inner = re.match(r"([\w.]+): |Option '([^']+)' is not accepted", detail)
        if full and inner:
            full = f"{full}.init_args.{inner.group(1) or inner.group(2)}"
        if inner and inner.group(2):  # an option the class does not take: name the ones it takes
            try:
                params = [name for name, p in inspect.signature(_module_class(class_path)).parameters.items()
                          if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
                detail = (f"{class_path.rsplit('.', 1)[-1]} takes no '{inner.group(2).split('.')[0]}'; "
                          f"it takes: {', '.join(params)}")
            except Exception:  # noqa: BLE001 (only the hint is lost: the refusal itself is reported as it was)
                pass
        what = f"{key.group(1) + ': ' if key else ''}{class_path}: {detail}"
    files = ", ".join(_recipe_files(argv))
    if message.lower().startswith("unrecognized arguments") or not files:
        where = "the command line"
    elif full is not None and any(full == k or full.startswith(k + ".") for k in _command_line_keys(argv)):
        where = f"{files} or the command line"  # both set the key: either value may be the refused one
    else:
        where = files
    return f"{where}: {what}"


def check_writable(folder: Path) -> None:
    """Fail before anything runs when the run's folder cannot be created or written to."""
    probe = folder / f".amrlhf-write-test-{os.getpid()}"  # one per process: DDP ranks probe at once
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink(missing_ok=True)
    except OSError as exc:
        raise AmrlhfError(f"cannot write to the runs folder {folder} ({exc.strerror or exc}): "
                          "choose another with --runs_root") from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, saving atomically on a local disk, with a missing or unreadable checkpoint
    (`--ckpt_path`, resume, validate) reported as one line naming the file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        """Written to `.<name>.partial` beside `path`, synced, then renamed over `path` (Lightning's save writes a
        temporary file in $TMPDIR and moves it: across file systems a copy, which a kill truncates). A failed save
        removes its temporary file; a save removes those that killed saves left in the folder."""
        if storage_options is not None or "://" in str(path):  # Lightning's refusal, or a remote store
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".*{PARTIAL}"):
            stale.unlink(missing_ok=True)
        partial = path.with_name(f".{path.name}{PARTIAL}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync(path.parent)  # the rename itself survives a crash

    def load_checkpoint(self, path, *args, **kwargs):
        if not Path(path).is_file():
            raise AmrlhfError(f"checkpoint not found: {path}")
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except Exception as exc:
            line = (str(exc).strip().splitlines() or [""])[0]
            raise AmrlhfError(f"{path}: not a readable checkpoint, damaged or incomplete ({type(exc).__name__}: "
                              f"{line}); use another checkpoint, or start again without --ckpt_path") from None


def resume_command(argv: list[str]) -> str:
    """The command line that resumes a run: the same arguments, with `--ckpt_path last`."""
    args, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--ckpt_path="):
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        args.append(arg)
    return shlex.join(["amrlhf", *args, "--ckpt_path", "last"])


class AmrlhfCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        self.argv = list(sys.argv[1:] if args is None else args)
        super().__init__(
            model_class=AlignmentModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=None,  # TrackRun saves the config (works with any MLflow URI)
            auto_configure_optimizers=False,
            trainer_defaults={"use_distributed_sampler": False, "num_sanity_val_steps": 0},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="run folder under runs_root (default: <recipe folder>-<recipe name>)")
        parser.add_argument("--runs_root", type=str, default="runs", help="parent folder of all runs")
        parser.add_argument("--checkpoint_every", type=int, default=50, help="save last.ckpt every N steps")
        parser.add_class_arguments(Tracking, "tracking")

    def init_parser(self, **kwargs):
        parser = super().init_parser(**kwargs)
        parser.exit_on_error = False  # a refused recipe raises; parse_arguments turns it into one error line
        return parser

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as exc:
            raise AmrlhfError(refused_recipe(self.argv, str(exc))) from None

    def _cfg(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg()
        init = cfg.model.init_args
        spec = init.policy if "policy" in init else init.model  # a reward model's is `model`
        if "tokenizer" in cfg.data.init_args and not cfg.data.init_args.tokenizer:
            cfg.data.init_args.tokenizer = spec.tokenizer or spec.name
        if not cfg.run_name:
            configs = cfg.get("config") or []
            cfg.run_name = default_run_name(Path(str(configs[0]))) if configs else \
                cfg.model.class_path.rsplit(".", 1)[-1]
        self.run_dir = Path(cfg.runs_root) / cfg.run_name

    def _parse_ckpt_path(self) -> None:
        """Lightning torch.loads a `--ckpt_path` file here, to read the module's saved hyper_parameters into the
        config: ours save none (the recipe is the run's config.yaml), so that would only load the file twice
        (and fail on a damaged one with a traceback); the trainer's load (CheckedCheckpointIO) is the one."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except AmrlhfError:
            raise
        except Exception as exc:
            cause = expected_cause(exc)
            if cause is None:
                raise
            raise AmrlhfError(str(cause)) from None

    def instantiate_trainer(self, **kwargs):
        cfg = self._cfg()
        if self.subcommand:
            check_writable(self.run_dir)
        resume = self.subcommand == "fit" and cfg.get("ckpt_path") is not None
        if cfg.trainer.get("logger") in (None, True):
            kwargs["logger"] = make_logger(cfg.tracking, self.run_dir, cfg.run_name, resume)
        kwargs.setdefault("default_root_dir", str(self.run_dir))
        ckpt_dir = self.run_dir / "checkpoints"
        self.stop = StopOnSignal(ckpt_dir)
        ours = [
            self.stop,
            StepCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=cfg.checkpoint_every),
            TrackRun(self.run_dir, self.parser.dump(cfg, skip_none=False) if not self.subcommand
                     else self._parser(self.subcommand).dump(cfg, skip_none=False),
                     cfg.as_dict(), log_checkpoint=cfg.tracking.log_checkpoint and self.subcommand == "fit"),
        ]
        if cfg.data.init_args.get("val"):
            monitor, mode = _module_class(cfg.model.class_path).best_metric
            ours.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best-{step}", monitor=monitor, mode=mode,
                                        save_top_k=1))
        extra = list(self._get(self.config_init, "trainer", default={}).get("callbacks") or [])
        if cfg.trainer.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in extra):
            # rich draws only on a terminal; tqdm also shows progress in logs and CI output
            ours.append(RichProgressBar() if sys.stderr.isatty() else TQDMProgressBar(refresh_rate=1))
        kwargs["callbacks"] = extra + ours
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as exc:
            # Lightning refuses an impossible trainer set-up (strategy / accelerator / devices /
            # precision, a negative max_steps) while building the Trainer: an expected mistake
            raise AmrlhfError(f"trainer: {' '.join(str(exc).split())}") from None
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default, not one the user chose
            trainer.strategy.checkpoint_io = CheckedCheckpointIO()
        return trainer

    # `amrlhf fit|validate|test` run through these (LightningCLI calls a method of the subcommand's name)
    def fit(self, **kwargs) -> None:
        self._stoppable(self.trainer.fit, **kwargs)

    def validate(self, **kwargs) -> None:
        self._stoppable(self.trainer.validate, **kwargs)

    def test(self, **kwargs) -> None:
        self._stoppable(self.trainer.test, **kwargs)

    def _stoppable(self, call, **kwargs) -> None:
        """A stop signal ends the call with Interrupted, whose message says how to resume; the MLflow run
        is marked KILLED (Lightning marks an interrupted run FAILED)."""
        try:
            with self.stop.handling_signals():
                call(**kwargs)
        except Interrupted as exc:
            self._mark_killed()
            if self.trainer.global_rank:  # the other processes of a multi-process run: rank 0 says it
                raise Interrupted(exc.signum, f"rank {self.trainer.global_rank}: stopped with rank 0") from None
            raise Interrupted(exc.signum, self._interrupted_message(exc.signum)) from None

    def _mark_killed(self) -> None:
        logger = self.trainer.logger
        if not hasattr(logger, "run_id") or not (self.run_dir / "mlflow_run.json").exists():
            return  # no MLflow run was started
        try:
            RunWriter(client=logger.experiment).finish(logger.run_id, "KILLED")
        except Exception as exc:  # the tracking store may be what is going away
            log.warning("could not mark MLflow run %s KILLED: %s", logger.run_id, exc)

    def _interrupted_message(self, signum: int) -> str:
        name = signal.Signals(signum).name
        if self.subcommand != "fit":
            return f"interrupted by {name} during {self.subcommand}: nothing to resume"
        last = self.run_dir / "checkpoints" / "last.ckpt"
        if self.stop.saved is not None:
            where = f"saved {self.stop.saved} (step {self.stop.step})"
        elif last.exists():
            where = f"no checkpoint could be saved now; the latest is {last}"
        else:
            return f"interrupted by {name} before any checkpoint was saved: run the same command to start again"
        return f"interrupted by {name}: {where}; resume with: {resume_command(self.argv)}"
