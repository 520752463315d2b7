"""`amrlhf eval --config recipes/eval/X.yaml --model M [--limit N]`: evaluation-only mode.

M is a Lightning checkpoint (`.ckpt`), an HF folder, a LoRA adapter folder, a `local:` id or a hub id.
Results are printed as a table and logged to MLflow (experiment `eval`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from amrlhf.evaluation.harness import EvalReport, evaluate, log_to_mlflow
from amrlhf.evaluation.suites import load_suite
from amrlhf.tracking import RunWriter, check_reachable, default_uri

log = logging.getLogger(__name__)


def load_for_eval(name: str):
    """-> (model, tokenizer) from any of the model forms `amrlhf eval` accepts."""
    from amrlhf.models import ModelSpec, load_causal_lm, load_tokenizer

    path = Path(name)
    if path.suffix == ".ckpt":
        from amrlhf.export import policy_from_checkpoint

        model, spec = policy_from_checkpoint(path)
        return model, load_tokenizer(spec.tokenizer or spec.name)
    if path.is_dir() and (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(path), load_tokenizer(str(path))
    return load_causal_lm(ModelSpec(name), trainable=False), load_tokenizer(name)


def model_label(name: str) -> str:
    """A readable run label: `runs/quickstart-dpo/hf` -> `quickstart-dpo-hf`, `local:x` -> `local-x`."""
    path = Path(name.rstrip("/"))
    parts = path.parts[-2:] if (path.exists() and len(path.parts) > 1) else (name,)
    return "-".join(parts).replace(":", "-").replace("/", "-")


def run_eval(config: str, model_name: str, limit: int | None, runs_root: str = "runs",
             tracking_uri: str | None = None) -> EvalReport:
    suite = load_suite(config, limit)
    uri = tracking_uri or default_uri(Path(runs_root))
    check_reachable(uri)
    model, tok = load_for_eval(model_name)
    label = model_label(model_name)
    out_dir = Path(runs_root) / "eval" / f"{label}-{Path(config).stem}"
    report = evaluate(model, tok, suite, out_dir=out_dir, limit=limit)
    os.environ.pop("MLFLOW_RUN_ID", None)
    writer = RunWriter(uri)
    run_id = writer.start("eval", f"eval-{label}", Path(runs_root), tags={"amrlhf.model": model_name})
    writer.params(run_id, {"model": model_name})
    log_to_mlflow(writer, run_id, report)
    writer.finish(run_id)
    log.info("evaluation logged to MLflow run %s (%s)", run_id, uri)
    return report
