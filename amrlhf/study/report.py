"""A study's report: per method the mean ± SE over seeds of every held-out metric, and the delta
against the baseline paired across seeds and items (`amrlhf.stats`), as a printed table, a
markdown file, a PNG chart and `results.json` under <runs_root>/<study>/."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

from amrlhf.stats import mean_se, paired_delta

ORDER = ("eval/heldout/", "eval/marked/", "eval/gen/", "eval/loc/", "segments/", "lm_eval/")
LABELS = {
    "eval/heldout/implicit_acc": "held-out implicit-reward accuracy (ties 0.5)",
    "eval/heldout/implicit_margin": "held-out implicit-reward margin",
    "eval/heldout/lognorm_acc": "held-out length-normalised log-prob preference accuracy",
    "eval/marked/marked_acc": "held-out teacher-forced accuracy on the marked spans of the right answer",
    "eval/marked/marked_logp": "held-out mean log-prob of the marked tokens of the right answer",
    "eval/gen/answer_correct": "greedy answer correct (checker)",
    "eval/gen/steps_right": "greedy answer and every step right (checker)",
    "eval/loc/precision": "mask localisation precision (rejected)",
    "eval/loc/recall": "mask localisation recall (rejected)",
    "eval/loc/f1": "mask localisation F1 (rejected)",
    "segments/kept_frac_chosen": "kept fraction, chosen (training mean)",
    "segments/kept_frac_rejected": "kept fraction, rejected (training mean)",
}
SKIP = ("eval/loc/flagged_frac", "eval/loc/fallback_frac")
DESCRIPTIVE = ("segments/",)  # how a method trains, not an outcome: a delta, no better/worse
# metrics where lower is better (matched on the last part of the key, e.g. lm_eval/wikitext/word_perplexity_none)
LOWER_IS_BETTER = re.compile(r"perplexity|bits_per_byte|(^|_)loss($|_)|(^|_)nll($|_)|(^|_)error($|_)")
log = logging.getLogger(__name__)


def higher_is_better(key: str) -> bool:
    """A metric's direction: lower is better for perplexities, bits per byte, losses, NLLs and error rates."""
    return not LOWER_IS_BETTER.search(key.rsplit("/", 1)[-1])


def _metric_order(keys: set[str]) -> list[str]:
    rank = {p: i for i, p in enumerate(ORDER)}
    known = list(LABELS)
    return sorted((k for k in keys if k not in SKIP),
                  key=lambda k: (next((rank[p] for p in ORDER if k.startswith(p)), 9),
                                 known.index(k) if k in known else 99, k))


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def summarise(study, cells: list[dict]) -> dict:
    """-> {metric: {method: {mean, se, seeds, delta?, se_seed?, se_item?, half_width?, verdict?}}}."""
    by = {m.name: {c["seed"]: c for c in cells if c["method"] == m.name} for m in study.methods}
    keys = _metric_order({k for c in cells for k in c["metrics"]})
    base = by[study.baseline]
    out: dict[str, dict] = {}
    for key in keys:
        out[key] = {}
        for method, seeds in by.items():
            vals = [seeds[s]["metrics"][key] for s in study.seeds if s in seeds and key in seeds[s]["metrics"]]
            if not vals:
                continue
            mean, se = mean_se(vals)
            row = {"mean": mean, "se": se, "seeds": len(vals)}
            common = [s for s in study.seeds if s in seeds and s in base and key in seeds[s]["metrics"]
                      and key in base[s]["metrics"]]
            up = higher_is_better(key)
            row["higher_is_better"] = up
            if method != study.baseline and common:
                pair = [seeds[s] for s in common] + [base[s] for s in common]
                has_items = all(key in c["items"] for c in pair)
                has_ids = has_items and all(key in c.get("item_ids", {}) for c in pair)
                if has_items and not has_ids:
                    log.warning("%s: cells without item identities (an earlier amrlhf): items paired by position", key)
                d = paired_delta([seeds[s]["metrics"][key] for s in common], [base[s]["metrics"][key] for s in common],
                                 [seeds[s]["items"][key] for s in common] if has_items else None,
                                 [base[s]["items"][key] for s in common] if has_items else None,
                                 [seeds[s]["item_ids"][key] for s in common] if has_ids else None,
                                 [base[s]["item_ids"][key] for s in common] if has_ids else None)
                row.update(delta=d.delta, se_seed=d.se_seed, se_item=d.se_item, half_width=d.half_width,
                           verdict="descriptive" if key.startswith(DESCRIPTIVE) else d.verdict_for(up))
            out[key][method] = row
    return out


def format_table(study, summary: dict, base: dict) -> str:
    lines = [f"study {study.name}: {len(study.methods)} methods x {len(study.seeds)} seeds, baseline "
             f"'{study.baseline}'; mean ± SE over seeds; delta paired by seed and item, 95% interval"]
    width = max(len(m.name) for m in study.methods) + 2
    for key, rows in summary.items():
        lines.append("")
        head = LABELS.get(key, key) + ("" if higher_is_better(key) else " (lower is better)")
        if key in base.get("metrics", {}):
            head += f"   (untrained base: {_fmt(base['metrics'][key])})"
        lines.append(head)
        for m in study.methods:
            r = rows.get(m.name)
            if r is None:
                continue
            text = f"  {m.name:{width}s}{_fmt(r['mean']):>8s} ± {_fmt(r['se']):5s}"
            if "delta" in r:
                text += f"   Δ {r['delta']:+.3f} ± {_fmt(r['half_width'])}  {r['verdict']}"
            lines.append(text)
    return "\n".join(lines)


BEFORE_AFTER = (
    ("eval/heldout/implicit_acc", "implicit-reward accuracy (ties 0.5)"),
    ("eval/heldout/implicit_margin", "implicit-reward margin"),
    ("eval/heldout/lognorm_acc", "length-normalised log-prob preference accuracy"),
)


def _mean_se_text(values: list[float]) -> str:
    mean, se = mean_se(values)
    return f"{mean:.3f}" if not math.isfinite(se) else f"{mean:.3f} ± {se:.3f}"


def format_before_after(study, cells: list[dict], base: dict) -> str | None:
    """A one-seed study's before/after table (the quickstart's): the untrained base and each method on the
    held-out pairs, mean ± SE over the pairs, the training means of the kept fractions, and the length-only
    rule beside them. None for a study of several seeds (its report pools seeds the paired way) or when the
    base row has no held-out preference values (a base row stored by an earlier amrlhf)."""
    items = base.get("items", {})
    if len(study.seeds) != 1:
        return None
    if any(k not in items for k, _ in BEFORE_AFTER):
        log.info("no before/after table: the stored base row has no held-out preference values (delete base.json "
                 "in the study's folder to rescore the base)")
        return None
    by = {c["method"]: c for c in cells}
    names = [m.name for m in study.methods if m.name in by]
    pairs = len(items["eval/heldout/implicit_acc"])
    head = f"{'held-out ' + study.heldout.data + ' (' + str(pairs) + ' pairs)':58s}{'base':>18s}"
    head += "".join(f"{n:>18s}" for n in names)
    lines = [head, "-" * len(head)]
    for key, label in BEFORE_AFTER:
        row = [_mean_se_text(items[key])] + [_mean_se_text(by[n]["items"][key]) for n in names]
        lines.append(f"{label:58s}" + "".join(f"{c:>18s}" for c in row))
    for key, label in (("segments/kept_frac_chosen", "kept fraction, chosen (training mean)"),
                       ("segments/kept_frac_rejected", "kept fraction, rejected (training mean)")):
        if any(key in by[n]["metrics"] for n in names):
            row = ["-"] + [f"{by[n]['metrics'][key]:.3f}" if key in by[n]["metrics"] else "1 (all)" for n in names]
            lines.append(f"{label:58s}" + "".join(f"{c:>18s}" for c in row))
    if "eval/heldout/length_rule_acc" in items:
        lines.append(f"{'length-only rule: shorter response is chosen':58s}"
                     f"{_mean_se_text(items['eval/heldout/length_rule_acc']):>18s}")
    return "\n".join(lines)


def format_markdown(study, summary: dict, base: dict, note: str | None = None) -> str:
    out = [f"# Study `{study.name}`", "", *([note, ""] if note else []),
           f"{len(study.methods)} methods x seeds {study.seeds}, baseline `{study.baseline}`, held-out "
           f"`{study.heldout.data}`. Mean ± standard error over seeds; Δ = paired delta against the baseline "
           "(paired by seed and by held-out item) ± the half-width of its 95% interval (`amrlhf.stats`).", ""]
    for key, rows in summary.items():
        label = LABELS.get(key, key) + ("" if higher_is_better(key) else " (lower is better)")
        if key in base.get("metrics", {}):
            label += f" (untrained base {_fmt(base['metrics'][key])})"
        out += [f"## {label}", "", "| method | mean ± SE | Δ vs baseline | 95% ± | seed SE | item SE | verdict |",
                "|---|---:|---:|---:|---:|---:|---|"]
        for m in study.methods:
            r = rows.get(m.name)
            if r is None:
                continue
            if "delta" in r:
                out.append(f"| {m.name} | {_fmt(r['mean'])} ± {_fmt(r['se'])} | {r['delta']:+.3f} | "
                           f"{_fmt(r['half_width'])} | {_fmt(r['se_seed'])} | {_fmt(r['se_item'])} | {r['verdict']} |")
            else:
                out.append(f"| {m.name} (baseline) | {_fmt(r['mean'])} ± {_fmt(r['se'])} | | | | | |")
        out.append("")
    return "\n".join(out)


def chart(study, summary: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(summary)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    names = [m.name for m in study.methods]
    for ax, key in zip(axes.flat, keys, strict=False):
        r = summary[key]
        xs = [i for i, n in enumerate(names) if n in r]
        ax.bar(xs, [r[names[i]]["mean"] for i in xs],
               yerr=[0 if not math.isfinite(r[names[i]]["se"]) else r[names[i]]["se"] for i in xs], capsize=3,
               color=["#888888" if names[i] == study.baseline else "#3b75af" for i in xs])
        ax.set_xticks(xs)
        ax.set_xticklabels([names[i] for i in xs], rotation=30, ha="right", fontsize=7)
        ax.set_title(LABELS.get(key, key), fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{study.name}: mean ± SE over {len(study.seeds)} seeds (grey = baseline)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(study, cells: list[dict], base: dict, note: str | None = None) -> dict:
    """report.md (with `note` under its title, e.g. PARTIAL), report.png and results.json in the study folder."""
    summary = summarise(study, cells)
    table = format_table(study, summary, base)
    before_after = format_before_after(study, cells, base)
    if before_after is not None:
        table = f"{table}\n\n{before_after}"
    d = study.dir
    md, png, res = d / "report.md", d / "report.png", d / "results.json"
    md.write_text(format_markdown(study, summary, base, note))
    chart(study, summary, png)
    res.write_text(json.dumps({"study": study.name, "seeds": study.seeds, "baseline": study.baseline,
                               **({"note": note} if note else {}),
                               "summary": summary, "base": base.get("metrics", {}),
                               "cells": [{k: v for k, v in c.items() if k not in ("items", "item_ids")}
                                         for c in cells]}, indent=1))
    parent_metrics = {}
    for key, rows in summary.items():
        for method, r in rows.items():
            parent_metrics[f"study/{method}/{key}"] = r["mean"]
            if "delta" in r:
                parent_metrics[f"study/{method}/{key}/delta"] = r["delta"]
    return {"table": table, "files": [md, png, res], "summary": summary, "parent_metrics": parent_metrics}
