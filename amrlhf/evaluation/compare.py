"""`amrlhf compare`: a table and a PNG chart over MLflow runs (e.g. DPO vs AM-DPO vs baselines,
several seeds), with deltas against a baseline group; the chart and table are logged to MLflow.

Runs are grouped by run name with a trailing `-seedN` removed; each cell is the mean over the
group's runs, ± the standard error across runs (or, for one run, the metric's own `_se`/`_stderr`
value when it was logged)."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

from amrlhf.errors import AmrlhfError
from amrlhf.stats import mean_se
from amrlhf.tracking import RunWriter

DEFAULT_METRICS = ("eval/heldout/implicit_acc", "eval/heldout/lognorm_acc", "eval/heldout/implicit_margin")


def _se_of(metrics: dict, key: str) -> float | None:
    for k in (f"{key}_se", f"{key}_stderr"):
        if k in metrics:
            return metrics[k]
    return None


def collect(client, experiment: str, metrics: list[str], pattern: str | None = None) -> dict[str, dict]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise AmrlhfError(f"no MLflow experiment '{experiment}' in {client.tracking_uri}")
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in client.search_runs([exp.experiment_id]):
        name = run.data.tags.get("mlflow.runName", run.info.run_id)
        if pattern and not re.search(pattern, name):
            continue
        groups[re.sub(r"-seed\d+$", "", name)].append(run.data.metrics)
    table = {}
    for group, runs in sorted(groups.items()):
        row = {}
        for key in metrics:
            vals = [r[key] for r in runs if key in r]
            if not vals:
                continue
            mean, se = mean_se(vals)
            if len(vals) == 1:
                se = _se_of(runs[0], key)
            row[key] = (mean, se, len(vals))
        if row:
            table[group] = row
    if not table:
        raise AmrlhfError(f"no run in '{experiment}' has any of {', '.join(metrics)}")
    return table


def format_table(table: dict[str, dict], metrics: list[str], baseline: str | None) -> str:
    def cell(group: str, key: str) -> str:
        if key not in table[group]:
            return "-"
        mean, se, n = table[group][key]
        text = f"{mean:.3f}" if se is None else f"{mean:.3f}±{se:.3f}"
        text += f" (n={n})" if n > 1 else ""
        if baseline and group != baseline and key in table.get(baseline, {}):
            bm, bse, _ = table[baseline][key]
            text += f" Δ{mean - bm:+.3f}±{math.sqrt((se or 0) ** 2 + (bse or 0) ** 2):.3f}"
        return text

    cells = {g: [cell(g, k) for k in metrics] for g in table}
    heads = [m.split("/", 1)[-1] for m in metrics]
    widths = [max(len(heads[j]), *(len(c[j]) for c in cells.values())) + 2 for j in range(len(metrics))]
    first = max(len("run"), *(len(g) for g in table)) + 2
    lines = [f"{'run':{first}s}" + "".join(f"{h:>{w}s}" for h, w in zip(heads, widths, strict=True))]
    for group, row in cells.items():
        lines.append(f"{group:{first}s}" + "".join(f"{c:>{w}s}" for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def chart(table: dict[str, dict], metrics: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(table)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(metrics) * len(groups) / 2), 4))
    width = 0.8 / len(groups)
    for i, group in enumerate(groups):
        xs, ys, errs = [], [], []
        for j, key in enumerate(metrics):
            if key in table[group]:
                mean, se, _ = table[group][key]
                xs.append(j + i * width)
                ys.append(mean)
                errs.append(se or 0.0)
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=group)
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(metrics))])
    ax.set_xticklabels([m.split("/", 1)[-1] for m in metrics], rotation=15, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title("mean ± standard error")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def compare(uri: str, experiment: str, metrics: list[str] | None, out: Path, baseline: str | None = None,
            pattern: str | None = None) -> str:
    writer = RunWriter(uri)
    client = writer.client  # reads
    metrics = list(metrics or DEFAULT_METRICS)
    table = collect(client, experiment, metrics, pattern)
    if baseline and baseline not in table:
        raise AmrlhfError(f"baseline '{baseline}' is not among the runs: {', '.join(table)}")
    text = format_table(table, metrics, baseline)
    png = chart(table, metrics, out)
    txt = out.with_suffix(".txt")
    txt.write_text(text + "\n")
    run_id = writer.start(experiment, "compare", out.parent, tags={"amrlhf.kind": "compare"})
    writer.files(run_id, [png, txt])
    writer.finish(run_id)
    return text
