"""The one entry point: `amrlhf fit|validate|test|prepare|study|eval|compare|segments|export`.

An expected mistake (bad path, bad config, missing asset, malformed data) is printed as one
`error:` line with exit code 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from amrlhf.errors import AmrlhfError, Interrupted

log = logging.getLogger("amrlhf")
LIGHTNING_COMMANDS = ("fit", "validate", "test")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").propagate = False  # Lightning prints its own lines


def _lightning(argv: list[str]) -> None:
    from amrlhf.train import run_lightning  # each command imports what it runs: `amrlhf --help` stays fast

    run_lightning(argv)


def _prepare(args: argparse.Namespace) -> None:
    from amrlhf.assets import REGISTRY, prepare

    if args.list:
        for name, asset in REGISTRY.items():
            print(f"{name:24s} {asset.kind:7s} {asset.about}")
        return
    timings = prepare(args.names, force=args.force)
    for name, sec in timings.items():
        print(f"{name}: {'already prepared' if sec == 0 else f'built in {sec:.1f} s'}")


def _study(args: argparse.Namespace) -> None:
    from amrlhf.study.runner import report_finished, run_study

    if args.report_finished:
        report_finished(Path(args.study))
    else:
        run_study(Path(args.study))


def _export(args: argparse.Namespace) -> None:
    from amrlhf.export import export

    out = export(Path(args.ckpt), Path(args.out), merge=args.merge)
    print(f"exported to {out}")


def _eval(args: argparse.Namespace) -> None:
    from amrlhf.evaluation.run import run_eval

    report = run_eval(args.config, args.model, args.limit, runs_root=args.runs_root, tracking_uri=args.tracking_uri)
    print(report.table())


def _compare(args: argparse.Namespace) -> None:
    from amrlhf.evaluation.compare import compare
    from amrlhf.tracking import default_uri

    uri = args.tracking_uri or default_uri(Path(args.runs_root))
    print(compare(uri, args.experiment, args.metrics, Path(args.out), args.baseline, args.runs))
    print(f"chart: {args.out}")


def _segments(args: argparse.Namespace) -> None:
    from amrlhf.segments import segments_page

    out = segments_page(args.config, args.overrides, args.limit, args.split, Path(args.out))
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amrlhf", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name}: amrlhf {name} --config RECIPE.yaml [--a.b=v]",
                       add_help=False)
    pp = sub.add_parser("prepare", help="build local copies of real models/data into $AMRLHF_HOME")
    pp.add_argument("names", nargs="*", help="asset names (default: the quickstart's)")
    pp.add_argument("--force", action="store_true", help="rebuild even if prepared")
    pp.add_argument("--list", action="store_true", help="list the known assets")
    pp.set_defaults(func=_prepare)
    pst = sub.add_parser("study", help="methods x seeds at one budget: held-out metrics, paired deltas, report")
    pst.add_argument("study", help="a study YAML: recipes/study/*.yaml, or the quickstart's "
                                   "recipes/quickstart/dpo_halueval.yaml (one seed)")
    pst.add_argument("--report-finished", action="store_true",
                     help="train nothing: write the report of the seeds whose every method has finished, marked "
                          "PARTIAL (for a study still running or stopped)")
    pst.set_defaults(func=_study)
    pv = sub.add_parser("eval", help="evaluation-only mode: an lm-eval suite on a checkpoint, folder or hub id")
    pv.add_argument("--config", required=True, help="a suite, recipes/eval/*.yaml")
    pv.add_argument("--model", required=True, help="Lightning .ckpt, HF folder, LoRA adapter folder, local: id or hub id")
    pv.add_argument("--limit", type=int, default=None, help="examples per task (overrides the suite)")
    pv.add_argument("--runs_root", default="runs")
    pv.add_argument("--tracking_uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI or runs/mlflow.db)")
    pv.set_defaults(func=_eval)
    pc = sub.add_parser("compare", help="table + PNG chart over MLflow runs (mean ± SE over seeds, deltas)")
    pc.add_argument("--experiment", default="quickstart")
    pc.add_argument("--metrics", nargs="*", help="metric keys (default: the held-out preference metrics)")
    pc.add_argument("--baseline", help="run group to show deltas against (e.g. the base or plain DPO)")
    pc.add_argument("--runs", help="regular expression selecting run names")
    pc.add_argument("--out", default="runs/compare.png")
    pc.add_argument("--runs_root", default="runs")
    pc.add_argument("--tracking_uri", default=None)
    pc.set_defaults(func=_compare)
    ps = sub.add_parser("segments", help="HTML view of scores, pivots and kept/masked spans for a recipe's data")
    ps.add_argument("--config", required=True, help="a training recipe with a segmenter (and scorer)")
    ps.add_argument("--limit", type=int, default=12, help="examples to show")
    ps.add_argument("--split", choices=["train", "val"], default="val")
    ps.add_argument("--out", default="segments.html")
    ps.add_argument("overrides", nargs="*", help="recipe overrides, e.g. --model.init_args.segmenter.init_args.delta=0.5")
    ps.set_defaults(func=_segments)
    pe = sub.add_parser("export", help="a Lightning checkpoint to an HF folder")
    pe.add_argument("ckpt")
    pe.add_argument("out")
    pe.add_argument("--merge", action="store_true", help="merge LoRA adapters into the base weights")
    pe.set_defaults(func=_export)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            _lightning(argv)
            return 0
        args, rest = build_parser().parse_known_args(argv)
        if rest and args.command != "segments":
            build_parser().parse_args(argv)  # reports the unknown arguments
        if args.command == "segments":
            args.overrides = list(args.overrides) + rest
        args.func(args)
        return 0
    except AmrlhfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:  # SIGTERM / SIGINT: the message says where the checkpoint is and how to resume
        print(f"\n{exc}", file=sys.stderr)  # on a line of its own, after any progress bar
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
