"""`amrlhf run PIPELINE.yaml`: prepare -> score the base on a held-out split -> fit each recipe
-> score each trained policy on the same split -> a printed before/after table.

Pipeline YAML:
    name: quickstart                # folder runs/<name>/ gets summary.json
    prepare: [ASSET, ...]           # `amrlhf prepare` names (idempotent)
    heldout: {data, limit, max_length, batch_size, beta}
    fit:                            # one entry per training run
      - {name: dpo, config: recipes/dpo/x.yaml, args: ["--trainer.max_steps=10"]}
      - {name: rm, config: recipes/rm/x.yaml, export: true, heldout: false}
    A fit with `export: true` writes its final weights as an HF folder to runs/<name>/hf, so a
    later recipe can use it (e.g. as the AM-DPO scorer). `heldout: false` skips its held-out
    scoring (a reward model is not a policy).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from amrlhf.config_files import read_mapping
from amrlhf.errors import AmrlhfError, Interrupted
from amrlhf.train import check_recipes, run_lightning, training_means

log = logging.getLogger(__name__)

ROWS = (
    ("implicit_acc", "implicit-reward accuracy (ties 0.5)"),
    ("implicit_margin", "implicit-reward margin"),
    ("lognorm_acc", "length-normalised log-prob preference accuracy"),
)


def _load(path: Path) -> dict:
    cfg = read_mapping(path, "pipeline")
    unknown = set(cfg) - {"name", "prepare", "heldout", "fit", "runs_root"}
    if unknown:
        raise AmrlhfError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    for i, entry in enumerate(cfg.get("fit") or []):
        if not isinstance(entry, dict) or "config" not in entry:
            raise AmrlhfError(f"{path}: fit[{i}] needs a 'config' (a recipe path)")
        if not Path(entry["config"]).is_file():
            raise AmrlhfError(f"{path}: fit[{i}].config: recipe not found: {entry['config']}")
    return cfg


def _fmt(mean: float, se: float | None = None) -> str:
    return f"{mean:.3f}" if se is None or se != se else f"{mean:.3f} ± {se:.3f}"


def format_table(heldout: dict, base: dict, results: dict[str, dict]) -> str:
    names = list(results)
    head = f"{'held-out ' + heldout['data'] + ' (' + str(int(base['pairs'])) + ' pairs)':58s}{'base':>18s}"
    head += "".join(f"{n:>18s}" for n in names)
    lines = [head, "-" * len(head)]
    for key, label in ROWS:
        cells = [_fmt(base[key], base[f"{key}_se"])] + [_fmt(r[key], r[f"{key}_se"]) for r in results.values()]
        lines.append(f"{label:58s}" + "".join(f"{c:>18s}" for c in cells))
    for key, label in (("segments/kept_frac_chosen", "kept fraction, chosen (training mean)"),
                       ("segments/kept_frac_rejected", "kept fraction, rejected (training mean)")):
        if any(key in r for r in results.values()):
            cells = ["-"] + [f"{r[key]:.3f}" if key in r else "1 (all)" for r in results.values()]
            lines.append(f"{label:58s}" + "".join(f"{c:>18s}" for c in cells))
    lines.append(f"{'length-only rule: shorter response is chosen':58s}"
                 f"{_fmt(base['length_rule_acc'], base['length_rule_acc_se']):>18s}")
    return "\n".join(lines)


def run_pipeline(path: Path) -> dict:
    cfg = _load(path)
    from amrlhf.assets import prepare

    check_recipes(path, cfg.get("fit") or [])
    name = cfg.get("name") or path.stem
    runs_root = Path(cfg.get("runs_root", "runs"))
    out_dir = runs_root / name
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if cfg.get("prepare"):
        prepare(cfg["prepare"])
    timings["prepare"] = time.perf_counter() - t0

    from amrlhf.data import encode_examples, read_examples
    from amrlhf.evaluation import heldout_summary, pair_logps
    from amrlhf.models import ModelSpec, load_causal_lm, load_tokenizer
    from amrlhf.tracking import ui_hint

    held = cfg.get("heldout")
    beta = (held or {}).get("beta", 0.1)
    results, bases, tracking = {}, {}, {}
    for entry in cfg.get("fit") or []:
        run_name = entry.get("name") or Path(entry["config"]).stem
        t = time.perf_counter()
        try:
            cli = run_lightning(["fit", "--config", entry["config"], f"--run_name={run_name}",
                                 f"--runs_root={runs_root}", *map(str, entry.get("args", []))])
        except Interrupted as exc:  # the later stages do not run
            raise Interrupted(exc.signum, f"pipeline '{name}' stopped at stage '{run_name}' ({exc}); "
                                          "the pipeline itself restarts that stage from the beginning") from None
        timings[f"fit:{run_name}"] = time.perf_counter() - t
        logger = cli.trainer.logger
        tracking[run_name] = {"uri": logger._tracking_uri, "run_id": logger.run_id}
        if entry.get("export"):
            from amrlhf.export import export

            export(runs_root / run_name / "final.ckpt", runs_root / run_name / "hf")
        if not held or entry.get("heldout") is False:
            del cli  # free this run's model and optimizer state before the next fit
            continue
        base_name = cli.model.policy_spec.name
        if base_name not in bases:  # the policy before training = the DPO reference
            t = time.perf_counter()
            tok = load_tokenizer(base_name)
            max_len = held.get("max_length", 512)
            data, rep = encode_examples(read_examples(held["data"], "preference", held.get("limit")), tok, max_len)
            log.info(rep.describe(f"held-out ({held['data']})", max_len))
            base_model = load_causal_lm(ModelSpec(name=base_name), trainable=False)
            lp = pair_logps(base_model, data, tok.pad_token_id, held.get("batch_size", 4), desc="held-out: base")
            del base_model
            bases[base_name] = (data, tok.pad_token_id, lp, heldout_summary(lp, lp, beta))
            timings["heldout:base"] = time.perf_counter() - t
        data, pad_id, base_lp, base_summary = bases[base_name]
        t = time.perf_counter()
        lp = pair_logps(cli.model.policy, data, pad_id, held.get("batch_size", 4), desc=f"held-out: {run_name}")
        results[run_name] = heldout_summary(base_lp, lp, beta)
        results[run_name].update(training_means(logger, ("segments/kept_frac_chosen", "segments/kept_frac_rejected",
                                                         "segments/pivots_per_response")))
        timings[f"heldout:{run_name}"] = time.perf_counter() - t
        metrics = {f"eval/heldout/{k}": v for k, v in results[run_name].items()}
        metrics.update({f"eval/heldout_base/{k}": v for k, v in base_summary.items()})
        for key, value in metrics.items():
            logger.experiment.log_metric(logger.run_id, key, value)
        del cli, lp  # free this run's model and optimizer state before the next fit
    base_summary = next(iter(bases.values()))[3] if bases else None
    summary = {"name": name, "timings_s": timings, "heldout": held, "base": base_summary, "results": results,
               "tracking": tracking}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    if held and results:
        print(format_table(held, base_summary, results))
        print()
    print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    for run_name, tr in tracking.items():
        print(f"MLflow run '{run_name}': {tr['run_id']} in {tr['uri']}")
    if tracking:
        print("open the MLflow UI: " + ui_hint(next(iter(tracking.values()))["uri"]))
    print(f"summary: {out_dir / 'summary.json'}")
    return summary
