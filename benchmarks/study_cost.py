r"""Where a study's time goes (not a test): seconds per cell by phase, read from the `phases` every cell
records in its cell.json (fit, the untrained base's scoring once per study, held-out preference, marked
spans, generation, localisation, lm-eval).

    python benchmarks/study_cost.py runs/scorers [--seeds 22,23]

One row per method (mean seconds per cell over the cells that recorded phases), then all cells together.
A method's localisation is scored once and read back on its other seeds when its mask does not depend
on the seed (no running baseline), so its mean falls as seeds accumulate; `--seeds` restricts the table to some seeds (e.g. the reused ones).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_cells(root: Path, seeds: set[int] | None) -> list[dict]:
    cells = []
    for path in sorted(root.glob("*/cell.json")):
        cell = json.loads(path.read_text())
        if "phases" in cell and (seeds is None or cell["seed"] in seeds):
            cells.append(cell)
    return cells


def table(cells: list[dict]) -> str:
    phases = list(dict.fromkeys(p for c in cells for p in c["phases"]))
    by_method: dict[str, list[dict]] = {}
    for c in cells:
        by_method.setdefault(c["method"], []).append(c)
    head = ["method", "cells", *phases, "other", "total"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, group in [*by_method.items(), ("all", cells)]:
        mean = {p: sum(c["phases"].get(p, 0.0) for c in group) / len(group) for p in phases}
        total = sum(c["seconds"] for c in group) / len(group)
        row = [name, str(len(group)), *(f"{mean[p]:.0f}" for p in phases), f"{total - sum(mean.values()):.0f}",
               f"{total:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study_dir", type=Path)
    p.add_argument("--seeds", default=None, help="comma-separated seeds to include (default: all)")
    args = p.parse_args(argv)
    seeds = {int(s) for s in args.seeds.split(",")} if args.seeds else None
    cells = load_cells(args.study_dir, seeds)
    if not cells:
        print(f"{args.study_dir}: no cell.json with per-phase times (cells finished before phases were recorded)",
              file=sys.stderr)
        return 1
    print(f"seconds per cell by phase, {args.study_dir} ({len(cells)} cells)\n")
    print(table(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
