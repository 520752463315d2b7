"""`amrlhf study STUDY.yaml`: every (method, seed) cell is an ordinary tracked fit, nested in MLflow under
one parent study run; a cell that finished is skipped when the study is started again, and an
unfinished one resumes from its last checkpoint. Each cell is scored on the held-out split, then one
report (table, markdown, PNG) compares the methods with paired deltas against the baseline."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import shutil
import signal
import time
from pathlib import Path

from amrlhf.errors import AmrlhfError, Interrupted
from amrlhf.scorers.cached import CachedScorer, scorer_identity
from amrlhf.stats import mean_se
from amrlhf.study.config import Fit, Study, load_study
from amrlhf.study.heldout import (
    base_preference_items,
    data_sha256,
    generation_items,
    item_ids,
    localisation,
    marked_items,
    preference_items,
)
from amrlhf.tracking import RunWriter, check_reachable, default_uri, ui_hint
from amrlhf.train import check_recipes, run_lightning, training_means

log = logging.getLogger(__name__)
STATE = "study.json"
CELL_DONE = "cell.json"
FINGERPRINT = "fingerprint.json"  # what a cell (or setup fit) was started with; written before it trains
LOCALISATION_FORMAT = 1  # bump when the localisation's computation changes: earlier stored results are not reused
SEED_ONLY_ARGS = ("--seed_everything=", "--data.init_args.seed=")  # change the training, never the mask


def _write_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class PhaseClock:
    """Seconds a cell spends in each phase (`phases` in cell.json: where a study's time goes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(state):
    """A masker state (floats, ints, tensors, nested dicts) as JSON values, exactly (floats keep their repr)."""
    if isinstance(state, dict):
        return {str(k): _plain(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return [_plain(v) for v in state]
    if hasattr(state, "tolist"):
        return state.tolist()
    return state


def _changes(saved: dict | None, now: dict) -> list[str]:
    """What differs between a stored fingerprint and the current one, in words."""
    if saved is None:
        return ["no fingerprint stored (started by an earlier amrlhf)"]
    out = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):  # name the changed leaf: setup.rm.args: ...
            out += [f"{key}.{change}" for change in _changes(old, new)]
        elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):  # args[4]: a -> b
            out += [f"{key}[{i}]: {json.dumps(a)[:160]} -> {json.dumps(b)[:160]}"
                    for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
        else:
            out.append(f"{key}: {json.dumps(old)[:160]} -> {json.dumps(new)[:160]}")
    return out


class StudyRun:
    def __init__(self, study: Study, track: bool = True):
        """`track`: attach to (or start) the study's MLflow parent run; without it only the files are read
        (the report of the finished seeds)."""
        self.study = study
        self._data_hash = data_sha256(study.heldout.data)  # also: a missing held-out file, before anything runs
        study.dir.mkdir(parents=True, exist_ok=True)
        self.uri = default_uri(study.runs_root)
        if track:
            check_reachable(self.uri)
            self.writer = RunWriter(self.uri)
            self.parent = self._parent_run()
        self.base: dict | None = None
        self._held = None  # (tokenizer, encoded pairs, base log-probs)

    # ------------------------------------------------------------------ fingerprints
    def fingerprint(self, fit: Fit, seed: int | None) -> dict:
        """Everything a cell's (or setup fit's) results depend on that the study file states: the recipe's
        text, the arguments it is run with, and (cells) the held-out specification with its data's hash and the
        fingerprints of the setup fits (a cell may read what they export)."""
        args = self.study.cell_args(fit, seed) if seed is not None else list(map(str, fit.args))
        shas = [_sha256_file(c) for c in fit.configs]
        out = {"recipe": fit.config, "recipe_sha256": shas[0] if isinstance(fit.config, str) else shas, "args": args}
        if seed is not None:
            out["heldout"] = self.heldout_key()
            if self.study.setup:
                out["setup"] = {f.name: self.fingerprint(f, None) for f in self.study.setup}
        return out

    def _stored_fingerprint(self, run_dir: Path, done_file: str) -> tuple[bool, dict | None]:
        """(has the fit started or finished, its stored fingerprint)."""
        done = run_dir / done_file
        if done.exists():
            return True, json.loads(done.read_text()).get("fingerprint")
        started = (run_dir / FINGERPRINT).exists() or (run_dir / "checkpoints" / "last.ckpt").exists()
        fp = json.loads((run_dir / FINGERPRINT).read_text()) if (run_dir / FINGERPRINT).exists() else None
        return started, fp

    def check_fingerprints(self) -> None:
        """Refuse, before anything trains, to continue or reuse a cell started with other settings: its results
        (or checkpoint) would be mixed with the new ones. Names every such cell and what changed."""
        stale = []
        fits = [(f, None, "setup.json") for f in self.study.setup] + \
               [(m, s, CELL_DONE) for s in self.study.seeds for m in self.study.methods]
        for fit, seed, done_file in fits:
            name = fit.name if seed is None else f"{fit.name}-seed{seed}"
            started, saved = self._stored_fingerprint(self.study.dir / name, done_file)
            now = self.fingerprint(fit, seed)
            if started and saved != now:
                stale.append(f"  {name}: " + "; ".join(_changes(saved, now)))
        if stale:
            raise AmrlhfError(
                f"study {self.study.name}: {len(stale)} cell(s) in {self.study.dir} were started with other settings "
                "and cannot be mixed with this study's:\n" + "\n".join(stale) +
                "\ngive the study a new 'name' (or runs_root), or delete those cells' folders to rerun them")

    def _start(self, run_dir: Path, fp: dict) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / FINGERPRINT).exists():
            _write_atomic(run_dir / FINGERPRINT, fp)

    # ------------------------------------------------------------------ tracking
    def _parent_run(self) -> str:
        state_file = self.study.dir / STATE
        if state_file.exists():
            saved = json.loads(state_file.read_text())
            if saved.get("uri") == self.uri:
                log.info("study %s: continuing (MLflow parent run %s)", self.study.name, saved["parent_run"])
                self.writer.reopen(saved["parent_run"])
                return saved["parent_run"]
        run_id = self.writer.start(self.study.name, self.study.name, self.study.runs_root, tags={"amrlhf.kind": "study"})
        self.writer.files(run_id, [self.study.path])
        exp_id = self.writer.client.get_run(run_id).info.experiment_id
        _write_atomic(state_file, {"uri": self.uri, "parent_run": run_id, "experiment_id": exp_id})
        return run_id

    def _fit_args(self, fit: Fit, run_name: str, extra: list[str]) -> list[str]:
        args = ["fit", *fit.config_args(), *extra, f"--run_name={run_name}", f"--runs_root={self.study.dir}",
                f"--tracking.uri={self.uri}", f"--tracking.experiment={self.study.name}",
                f"--tracking.parent_run={self.parent}"]
        if not self.study.keep_checkpoints and fit not in self.study.setup:
            args.append("--tracking.log_checkpoint=false")  # cells are scored in memory: no final weights
        if (self.study.dir / run_name / "checkpoints" / "last.ckpt").exists():
            log.info("%s: resuming from its last checkpoint", run_name)
            args.append("--ckpt_path=last")
        return args

    # ------------------------------------------------------------------ stages
    def run_setup(self, fit: Fit) -> None:
        done = self.study.dir / fit.name / "setup.json"
        if done.exists():
            log.info("setup %s: done before, skipped", fit.name)
            return
        t = time.perf_counter()
        fp = self.fingerprint(fit, None)
        self._start(self.study.dir / fit.name, fp)
        cli = run_lightning(self._fit_args(fit, fit.name, list(map(str, fit.args))))
        if fit.export:
            from amrlhf.export import export

            export(self.study.dir / fit.name / "final.ckpt", self.study.dir / fit.name / "hf")
        del cli
        gc.collect()
        _write_atomic(done, {"name": fit.name, "seconds": time.perf_counter() - t, "fingerprint": fp})

    def heldout_data(self, policy_name: str):
        """Tokenizer, encoded held-out pairs and the base's log-probs (the DPO reference), once per study."""
        if self._held is not None:
            return self._held
        import torch

        from amrlhf.evaluation.preference import pair_logps
        from amrlhf.models import ModelSpec, load_causal_lm, load_tokenizer

        spec, tok = self.study.heldout, load_tokenizer(policy_name)
        data = spec.load(tok)
        key = hashlib.sha256(json.dumps([policy_name, spec.data, spec.limit, spec.max_length,
                                         [e.prompt_ids + sum(e.responses, []) for e in data]]).encode()).hexdigest()
        cache = self.study.dir / f"base_heldout-{key[:16]}.pt"  # keyed: a changed held-out spec recomputes
        base_model = None
        if cache.exists():
            base_lp = torch.load(cache, weights_only=False)
        else:
            base_model = load_causal_lm(ModelSpec(name=policy_name), trainable=False)
            base_lp = pair_logps(base_model, data, tok.pad_token_id, spec.batch_size, desc="held-out: base")
            torch.save(base_lp, cache)
        self._held = (tok, data, base_lp)
        self.base = self._base_metrics(policy_name, base_model)
        return self._held

    def _base_metrics(self, policy_name: str, base_model) -> dict:
        """The untrained policy's generations and lm-eval scores (a row of the report, not a method)."""
        path = self.study.dir / "base.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("heldout") == self.heldout_key() and saved.get("policy") == policy_name:
                return saved
        from amrlhf.models import ModelSpec, load_causal_lm

        tok, data, base_lp = self._held
        model = base_model or load_causal_lm(ModelSpec(name=policy_name), trainable=False)
        metrics, items, ids = {}, {}, {}
        for k, v in base_preference_items(base_lp, self.study.heldout).items():  # the untrained policy's own row
            items[f"eval/heldout/{k}"], ids[f"eval/heldout/{k}"] = v, item_ids(self.study.heldout, data)
        trivial = ("eval/heldout/implicit_acc", "eval/heldout/implicit_margin")  # 0.5 and 0 by construction
        if self.study.heldout.generate is not None:
            gen, _, gen_ids = generation_items(model, tok, data, self.study.heldout, "generate: base")
            items.update({f"eval/gen/{k}": v for k, v in gen.items()})
            ids.update({f"eval/gen/{k}": gen_ids for k in gen})
        if self.study.heldout.marked is not None:
            marked, marked_ids = marked_items(model, tok, data, self.study.heldout, "marked: base")
            items.update({f"eval/marked/{k}": v for k, v in marked.items()})
            ids.update({f"eval/marked/{k}": marked_ids for k in marked})
        metrics.update({k: _mean(v) for k, v in items.items() if k not in trivial})
        metrics.update(self._lm_eval(model, tok, self.study.dir / "base_lm_eval"))
        base = {"policy": policy_name, "heldout": self.heldout_key(), "metrics": metrics, "items": items,
                "item_ids": ids}
        _write_atomic(path, base)
        self.writer.metrics(self.parent, {f"base/{key}": value for key, value in metrics.items()})
        return base

    def heldout_key(self) -> dict:
        h, g, m = self.study.heldout, self.study.heldout.generate, self.study.heldout.marked
        # what changes a held-out number (batch sizes only change the compute)
        return {"data": h.data, "data_sha256": self._data_hash, "limit": h.limit, "max_length": h.max_length,
                "beta": h.beta, "spans": h.spans, "spans_through_end": h.spans_through_end, "eval": self.study.eval,
                "generate": None if g is None else {"limit": g.limit, "max_new_tokens": g.max_new_tokens,
                                                    "grader": g.grader},
                "marked": None if m is None else {"spans": m.spans, "limit": m.limit}}

    def _lm_eval(self, model, tok, out_dir: Path, run_id: str | None = None) -> dict[str, float]:
        if not self.study.eval:
            return {}
        from amrlhf.evaluation.harness import evaluate, log_to_mlflow
        from amrlhf.evaluation.suites import load_suite

        report = evaluate(model, tok, load_suite(self.study.eval["suite"]), out_dir=out_dir,
                          limit=self.study.eval.get("limit"))
        if run_id is not None:
            log_to_mlflow(self.writer, run_id, report)
        return {k: v for k, v in report.metrics.items() if not k.endswith("_stderr")}

    def localisation(self, module, tok, data, method: Fit, seed: int, fp: dict) -> dict[str, float] | None:
        """The method's held-out localisation, computed once per study and reused by its other seeds. It cannot
        depend on the trained policy (a scorer sees a ScoringContext, never the module), so it is a function of
        the method's settings (the seed-only arguments left out; any other seeded argument kept), its scorer's
        models and settings (by file fingerprint: a scorer loads its models from files) and the masker's state
        after training (the score scale, a running baseline: a mask that learned differently on another seed
        is scored afresh); kept in `localisation/` of the study folder. `fp`: the cell's fingerprint."""
        if module.segmenter is None or not self.study.heldout.spans:
            return None
        args = [*map(str, method.args), *map(str, self.study.common_args),
                *(a.format(seed=seed) for a in self.study.seed_args if not a.startswith(SEED_ONLY_ARGS))]
        scorer = module.masker.scorer
        scorer = scorer.source if isinstance(scorer, CachedScorer) else scorer
        key = {**fp, "format": LOCALISATION_FORMAT, "args": args,
               "scorer": None if scorer is None else scorer_identity(scorer),
               "masker": _plain(module.masker.state_dict())}
        path = self.study.dir / "localisation" / f"{method.name}-{_sha256_text(json.dumps(key, sort_keys=True))[:16]}.json"
        if path.exists():
            log.info("localisation of %s: the same mask as an earlier seed's, read from %s", method.name, path)
            return json.loads(path.read_text())["localisation"]
        loc = localisation(module, tok, data, self.study.heldout)
        path.parent.mkdir(exist_ok=True)
        _write_atomic(path, {"key": key, "localisation": loc})
        return loc

    def run_cell(self, method: Fit, seed: int) -> dict:
        name = f"{method.name}-seed{seed}"
        cell_dir = self.study.dir / name
        fp = self.fingerprint(method, seed)
        if (cell_dir / CELL_DONE).exists():
            cell = json.loads((cell_dir / CELL_DONE).read_text())
            if cell.get("fingerprint") != fp:  # check_fingerprints refuses this before anything runs
                changed = "; ".join(_changes(cell.get("fingerprint"), fp))
                raise AmrlhfError(f"{cell_dir}: finished with other settings: {changed}")
            return cell
        t, clock = time.perf_counter(), PhaseClock()
        self._start(cell_dir, fp)
        with clock("fit"):
            cli = run_lightning(self._fit_args(method, name, self.study.cell_args(method, seed)))
        module, logger = cli.model, cli.trainer.logger
        with clock("base (once per study)"):
            tok, data, base_lp = self.heldout_data(module.policy_spec.name)
        spec = self.study.heldout
        with clock("held-out preference"):
            items = {f"eval/heldout/{k}": v for k, v in preference_items(module.policy, base_lp, data, tok.pad_token_id,
                                                                         spec, f"held-out: {name}").items()}
        ids = {k: item_ids(spec, data) for k in items}
        if spec.generate is not None:
            with clock("generate"):
                gen, texts, gen_ids = generation_items(module.policy, tok, data, spec, f"generate: {name}")
            items.update({f"eval/gen/{k}": v for k, v in gen.items()})
            ids.update({f"eval/gen/{k}": gen_ids for k in gen})
            (cell_dir / "generations.jsonl").write_text("".join(json.dumps({"row": e.index, "text": x}) + "\n"
                                                                for e, x in zip(data, texts, strict=False)))
        if spec.marked is not None:
            with clock("marked"):
                marked, marked_ids = marked_items(module.policy, tok, data, spec, f"marked: {name}")
            items.update({f"eval/marked/{k}": v for k, v in marked.items()})
            ids.update({f"eval/marked/{k}": marked_ids for k in marked})
        metrics = {k: _mean(v) for k, v in items.items()}
        with clock("localisation"):
            loc = self.localisation(module, tok, data, method, seed, fp)
        metrics.update({f"eval/loc/{k}": v for k, v in (loc or {}).items()})
        metrics.update(training_means(logger, ("segments/kept_frac_chosen", "segments/kept_frac_rejected")))
        with clock("lm-eval"):
            metrics.update(self._lm_eval(module.policy, tok, cell_dir / "lm_eval", logger.run_id))
        self.writer.metrics(logger.run_id, {k: v for k, v in metrics.items() if k.startswith("eval/")})
        self.writer.metrics(logger.run_id, {f"{k}_se": se for k, v in items.items()  # over items: what compare shows
                                            if math.isfinite(se := mean_se(v)[1])})
        cell = {"method": method.name, "seed": seed, "run_id": logger.run_id, "metrics": metrics, "items": items,
                "item_ids": ids, "seconds": time.perf_counter() - t, "phases": clock.seconds, "fingerprint": fp}
        log.info("%s: %.0f s (%s)", name, cell["seconds"], ", ".join(f"{k} {v:.0f} s" for k, v in clock.seconds.items()))
        del cli, module
        gc.collect()
        _write_atomic(cell_dir / CELL_DONE, cell)  # first: a kill in between must not lose the trained cell
        if not self.study.keep_checkpoints:
            shutil.rmtree(cell_dir / "checkpoints", ignore_errors=True)
        return cell


def _run_cells(run: StudyRun, study: Study) -> list[dict]:
    for fit in study.setup:
        run.run_setup(fit)
    cells = [(m, s) for s in study.seeds for m in study.methods]  # seed-major: an early stop leaves whole seeds
    results: list[dict] = []
    times: list[float] = []
    for i, (method, seed) in enumerate(cells, 1):
        done = (study.dir / f"{method.name}-seed{seed}" / CELL_DONE).exists()
        eta = f", ETA {_mean(times) * (len(cells) - i + 1) / 60:.1f} min" if times else ""
        log.info("study %s: cell %d/%d: %s, seed %d%s%s", study.name, i, len(cells), method.name, seed,
                 " (finished before: skipped)" if done else "", eta)
        cell = run.run_cell(method, seed)
        if not done:
            times.append(cell["seconds"])
        results.append(cell)
    timed = [c["phases"] for c in results if "phases" in c]
    if timed:
        total: dict[str, float] = {}
        for phases in timed:
            for phase, seconds in phases.items():
                total[phase] = total.get(phase, 0.0) + seconds
        log.info("study %s: time by phase over %d timed cell(s): %s", study.name, len(timed),
                 ", ".join(f"{k} {v / 60:.1f} min" for k, v in total.items()))
    return results


def _stored_base(run: StudyRun) -> dict:
    """The untrained base's row as stored, checked against this study's held-out settings (none: empty)."""
    base_file = run.study.dir / "base.json"
    saved = json.loads(base_file.read_text()) if base_file.exists() else None
    if saved is not None and saved.get("heldout") != run.heldout_key():
        changed = "; ".join(_changes(saved.get("heldout"), run.heldout_key()))
        raise AmrlhfError(f"{base_file}: the untrained base was scored with other held-out settings "
                          f"({changed}); delete it to rescore")
    return saved or {"metrics": {}, "items": {}}


def report_finished(path: str | Path) -> dict:
    """`amrlhf study STUDY.yaml --report-finished`: the report of the seeds whose every method has finished,
    marked PARTIAL, written where the full report goes (the study run, when it ends, replaces it). Trains
    nothing and writes nothing to MLflow; refuses cells started with other settings, as a study does."""
    from amrlhf.study.report import write_report

    study = load_study(path)
    run = StudyRun(study, track=False)
    run.check_fingerprints()
    cells = {(m.name, s): json.loads(f.read_text()) for s in study.seeds for m in study.methods
             if (f := study.dir / f"{m.name}-seed{s}" / CELL_DONE).exists()}
    done = [s for s in study.seeds if all((m.name, s) in cells for m in study.methods)]
    if not done:
        raise AmrlhfError(f"study {study.name}: no seed has finished every method yet ({len(cells)} of "
                          f"{len(study.seeds) * len(study.methods)} cell(s) finished in {study.dir})")
    left = sorted(f"{m}-seed{s}" for m, s in cells if s not in done)
    note = (f"**PARTIAL**: seeds {done} of {study.seeds} have finished every method; "
            + (f"{len(left)} finished cell(s) of later seeds are not in it ({', '.join(left)})." if left
               else "no later cell has finished."))
    study.seeds = done
    report = write_report(study, [cells[(m.name, s)] for s in done for m in study.methods], _stored_base(run),
                          note=note)
    print(f"{note}\n\n{report['table']}\n\nreport: {report['files'][0]}")
    return report


def run_study(path: str | Path) -> dict:
    from amrlhf.assets import prepare
    from amrlhf.study.report import write_report

    study = load_study(path)
    if study.prepare:
        prepare(study.prepare)
    check_recipes(Path(path), [{"config": f.config, "args": f.args} for f in study.setup] +
                  [{"config": m.config, "args": study.cell_args(m, study.seeds[0])} for m in study.methods])
    run = StudyRun(study)
    try:
        run.check_fingerprints()
        results = _run_cells(run, study)
        if run.base is None:  # every cell finished before: the stored base row, if scored on this held-out
            run.base = _stored_base(run)
        report = write_report(study, results, run.base)
    except (Interrupted, KeyboardInterrupt) as exc:  # a cell's hint says `amrlhf fit ... --ckpt_path last`
        run.writer.finish(run.parent, "KILLED")
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        said = str(exc).partition("; resume with:")[0] if isinstance(exc, Interrupted) else "interrupted by SIGINT"
        raise Interrupted(signum, f"{said}; continue the study (finished cells are kept, the interrupted one "
                                  f"resumes from its checkpoint) with: amrlhf study {path}") from None
    except BaseException:
        run.writer.finish(run.parent, "FAILED")
        raise
    run.writer.files(run.parent, report["files"])
    run.writer.metrics(run.parent, report["parent_metrics"])
    run.writer.finish(run.parent)
    print(report["table"])
    print(f"\nreport: {report['files'][0]}\nMLflow parent run {run.parent} in {run.uri}")
    print(f"open the MLflow UI: {ui_hint(run.uri)}")
    return report


__all__ = ["run_study", "report_finished", "AmrlhfError"]
