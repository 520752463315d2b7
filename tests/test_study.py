"""The controlled task's generator and checker, the study statistics worked by hand, the oracle step
scorer, and a tiny study end to end: killed mid-cell, started again, report checked against MLflow."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from conftest import ROOT, amrlhf

from amrlhf.data.arithmetic import (
    SPLITS,
    ArithmeticGrader,
    check_solution,
    generate,
    start_value,
    step_verdicts,
)
from amrlhf.errors import AmrlhfError
from amrlhf.study import load_study, mean_se, paired_delta


# ---------------------------------------------------------------- the task and its checker
@pytest.mark.parametrize("variant", ["clean", "conflicting"])
def test_checker_finds_exactly_the_planted_step(variant):
    rows = generate(variant, "train", 400)
    for r in rows:
        rej = check_solution(r["rejected"], r["answer"], r["start"])
        assert rej.first_wrong == r["rejected_error_step"], r
        assert rej.correct is False
        ch = check_solution(r["chosen"], r["answer"], r["start"])
        assert ch.correct is True
        assert (ch.first_wrong is None) == (not r["chosen_flaw_spans"]), r  # only a flaw makes chosen imperfect
        (start, end), = r["rejected_spans"]
        a, b = r["rejected_error_number"]
        assert start == a and end == len(r["rejected"])  # from the wrong number to the end
        assert r["rejected"][a:b].isdigit() or r["rejected"][a:b].lstrip("-").isdigit()
        # the prefix before the error is identical arithmetic: the checker sees no error there
        assert check_solution(r["rejected"][:a] + "0", start=r["start"]).first_wrong in (None, r["rejected_error_step"])
        assert start_value(r["prompt"]) == r["start"]
    if variant == "clean":
        assert all(not r["chosen_flaw_spans"] for r in rows)
        assert all(r["chosen"].startswith("Step 1:") and r["rejected"].startswith("Step 1:") for r in rows)
    else:
        flawed = sum(bool(r["chosen_flaw_spans"]) for r in rows) / len(rows)
        assert 0.2 < flawed < 0.4
        differ = sum(r["chosen"][:5] != r["rejected"][:5] for r in rows) / len(rows)
        assert 0.3 < differ < 0.7  # wording drawn independently per side


def test_generator_is_seeded_and_splits_do_not_share_rows():
    a, b = generate("conflicting", "train", 50), generate("conflicting", "train", 50)
    assert a == b
    assert generate("conflicting", "train", 60)[:50] == a  # a row never changes with the size
    train = {r["prompt"] + r["chosen"] for r in generate("conflicting", "train", SPLITS["train"])}
    held = [r["prompt"] + r["chosen"] for r in generate("conflicting", "heldout", SPLITS["heldout"])]
    assert sum(h in train for h in held) / len(held) < 0.05  # independent draws (a rare exact collision allowed)


def test_step_verdicts_and_grader_by_hand():
    text = "Step 1: 10 + 5 = 15.\nStep 2: 15 * 2 = 31.\nStep 3: 31 - 1 = 30.\nThe answer is 30."
    # true totals: 15, 30, 29 -> right, wrong, wrong (carried)
    assert [v for _, v in step_verdicts(text, 10)] == [1, -1, -1]
    assert check_solution(text, 29, 10).first_wrong == 2
    row = {"answer": 29, "start": 10}
    assert ArithmeticGrader().grade(row, text) == {"answer_correct": 0.0, "steps_right": 0.0}
    good = "First, 10 + 5 = 15. Then, 15 * 2 = 30. Finally, 30 - 1 = 29. The answer is 29."
    assert ArithmeticGrader().grade(row, good) == {"answer_correct": 1.0, "steps_right": 1.0}
    assert ArithmeticGrader().grade(row, "I think it is 29.") == {"answer_correct": 1.0, "steps_right": 0.0}


def test_oracle_scorer_flags_exactly_the_wrong_span(tokenizer):
    """The step-checker scorer with a zero baseline: every rejected token from the wrong number on scores
    -1, every token before it 0 or +1, and the localisation truth of the same rows agrees."""

    from amrlhf.data import Collator, encode_examples
    from amrlhf.data.records import preference_example
    from amrlhf.evaluation.localization import diff_token_mask
    from amrlhf.scorers import ArithmeticStepScorer

    rows = generate("clean", "val", 6)
    examples = [preference_example("mem", i + 1, r) for i, r in enumerate(rows)]
    encoded, _ = encode_examples(examples, tokenizer, 512)
    scorer = ArithmeticStepScorer()
    scorer.tokenizer = tokenizer
    batch = Collator(tokenizer.pad_token_id)(encoded)
    s = scorer.score(batch, "train").scores
    n = len(rows)
    for i, (ex, e, r) in enumerate(zip(examples, encoded, rows, strict=True)):
        truth = torch.tensor(diff_token_mask(tokenizer, ex, r["rejected_spans"], e.responses[1], through_end=True))
        got = s[n + i][batch["response_mask"][n + i].bool()]
        assert truth[-1] and truth.sum() < len(truth)  # the end-of-turn token closes the wrong span
        assert (got[truth] == -1).all()
        assert (got[~truth] >= 0).all()
        assert (s[i][batch["response_mask"][i].bool()] >= 0).all()  # a clean chosen answer is never wrong


# ---------------------------------------------------------------- statistics, by hand
def test_mean_se_and_paired_delta_by_hand():
    mean, se = mean_se([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert se == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2 / 3))
    assert math.isnan(mean_se([3.0])[1])
    # per-seed means: method 0.6, 0.8, 0.7; baseline 0.5, 0.6, 0.7 -> D = 0.1, 0.2, 0.0
    m_items = [[1.0, 0.2], [1.0, 0.6], [0.8, 0.6]]
    b_items = [[0.8, 0.2], [0.8, 0.4], [0.8, 0.6]]
    d = paired_delta([0.6, 0.8, 0.7], [0.5, 0.6, 0.7], m_items, b_items)
    assert d.delta == pytest.approx(0.1)
    assert d.se_seed == pytest.approx(0.1 / math.sqrt(3))  # sd(D) = 0.1
    # item deltas averaged over seeds: 0.4/3 and 0.2/3 -> sd = 0.1/3 * sqrt(2) / ... = 0.04714, se = 0.03333
    assert d.se_item == pytest.approx(1 / 30)
    assert d.half_width == pytest.approx(math.sqrt((4.3026527 * 0.1 / math.sqrt(3)) ** 2 + (1.96 / 30) ** 2))
    assert d.verdict == "within noise"
    clear = paired_delta([0.9, 0.91, 0.92], [0.5, 0.5, 0.5])
    assert clear.verdict == "better" and clear.se_item is None
    assert paired_delta([0.1, 0.11], [0.5, 0.52]).verdict == "worse"
    with pytest.raises(ValueError, match="different held-out items"):
        paired_delta([0.5], [0.5], [[1.0, 0.0]], [[1.0]])


def test_t_quantile_is_exact_past_ten_degrees_of_freedom():
    from amrlhf.stats import t975

    # Student's t 97.5% quantiles from published tables (3 decimals)
    for df, q in {1: 12.706, 3: 3.182, 10: 2.228, 11: 2.201, 15: 2.131, 20: 2.086, 30: 2.042, 120: 1.980}.items():
        assert t975(df) == pytest.approx(q, abs=5e-4), df
    # 12 seeds (df 11): D_s alternating 0.1 / 0.3 -> delta 0.2, sd 0.10445, se 0.03015; interval 2.201 * se
    d = paired_delta([0.1, 0.3] * 6, [0.0] * 12)
    assert d.half_width == pytest.approx(2.201 * 0.1044466 / math.sqrt(12), rel=1e-3)


def test_batch_mean_baseline_by_hand():
    from amrlhf.segmenters import BatchMeanBaseline

    scores = torch.tensor([[1.0, 3.0, 9.0], [2.0, 0.0, 0.0]])
    resp = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert BatchMeanBaseline().value(scores, resp, None).tolist() == [2.0, 2.0]  # (1 + 3 + 2) / 3


# ---------------------------------------------------------------- the study command
def _study_yaml(tmp_path: Path, crash_marker: Path | None) -> Path:
    cfg = yaml.safe_load((ROOT / "recipes" / "smoke" / "study.yaml").read_text())
    cfg["runs_root"] = str(tmp_path / "runs")
    for m in cfg["methods"]:
        m["config"] = str(ROOT / m["config"])
    if crash_marker is not None:  # the second method's first cell is killed once, after step 2's checkpoint
        cfg["methods"][1]["args"] = cfg["methods"][1].get("args", []) + [
            "--trainer.callbacks+=amrlhf.callbacks.CrashAtStep", "--trainer.callbacks.step=2",
            f"--trainer.callbacks.once={crash_marker}"]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_tiny_study_killed_and_continued_reports_what_mlflow_holds(tmp_path):
    marker = tmp_path / "crashed"
    study = _study_yaml(tmp_path, marker)
    first = amrlhf("study", str(study), cwd=tmp_path)
    assert first.returncode == 17, first.stderr[-3000:]  # CrashAtStep's hard exit, mid-study
    root = tmp_path / "runs" / "smoke-study"
    assert (root / "dpo-seed0" / "cell.json").exists()
    assert (root / "am-dpo-oracle-seed0" / "checkpoints" / "last.ckpt").exists()
    assert not (root / "am-dpo-oracle-seed0" / "cell.json").exists()
    done_before = (root / "dpo-seed0" / "cell.json").stat().st_mtime_ns
    crashed_run = json.loads((root / "am-dpo-oracle-seed0" / "mlflow_run.json").read_text())["run_id"]

    second = amrlhf("study", str(study), cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "finished before: skipped" in second.stderr and "resuming from its last checkpoint" in second.stderr
    assert (root / "dpo-seed0" / "cell.json").stat().st_mtime_ns == done_before  # not recomputed
    assert not (root / "dpo-seed0" / "checkpoints").exists()  # a finished cell's checkpoints are removed

    client = mlflow.MlflowClient(f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db")
    exp = client.get_experiment_by_name("smoke-study")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("amrlhf.kind") == "study"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    cells = {r.data.tags["mlflow.runName"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert sorted(cells) == ["am-dpo-oracle-seed0", "am-dpo-oracle-seed1", "dpo-seed0", "dpo-seed1"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in cells.values())
    assert cells["am-dpo-oracle-seed0"].info.run_id == crashed_run  # the resumed cell reattached
    steps = {m.step for m in client.get_metric_history(crashed_run, "loss")}
    assert max(steps) == 4 - 1 or max(steps) == 4  # trained to the end, once per step
    assert len([m for m in client.get_metric_history(crashed_run, "loss")]) == len(steps)

    results = json.loads((root / "results.json").read_text())
    for key in ("eval/heldout/implicit_acc", "eval/marked/marked_acc", "eval/gen/answer_correct", "eval/loc/f1"):
        for method in ("dpo", "am-dpo-oracle"):
            mine = [cells[f"{method}-seed{s}"].data.metrics[key] for s in (0, 1)]
            assert results["summary"][key][method]["mean"] == pytest.approx(sum(mine) / 2, abs=1e-9), key
        dpo = [cells[f"dpo-seed{s}"].data.metrics[key] for s in (0, 1)]
        am = [cells[f"am-dpo-oracle-seed{s}"].data.metrics[key] for s in (0, 1)]
        assert results["summary"][key]["am-dpo-oracle"]["delta"] == pytest.approx(
            (am[0] - dpo[0] + am[1] - dpo[1]) / 2, abs=1e-9)
    # sample-wise DPO flags every rejected token: its localisation precision is the span base rate, recall 1
    assert results["summary"]["eval/loc/recall"]["dpo"]["mean"] == pytest.approx(1.0)
    assert results["summary"]["eval/loc/precision"]["am-dpo-oracle"]["mean"] > \
        results["summary"]["eval/loc/precision"]["dpo"]["mean"]
    assert (root / "report.md").read_text().startswith("# Study `smoke-study`")
    assert (root / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artefacts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"report.md", "report.png", "results.json"} <= artefacts
    cell = json.loads((root / "dpo-seed0" / "cell.json").read_text())
    assert cell["item_ids"]["eval/heldout/implicit_acc"] and cell["fingerprint"]["args"]

    # a method's localisation is scored once per study (its mask does not depend on the seed): seed 1 read seed
    # 0's; scored afresh instead, the report is the same to the last digit
    assert "localisation of am-dpo-oracle: the same mask as an earlier seed's" in second.stderr
    assert sorted(p.name.rsplit("-", 1)[0] for p in (root / "localisation").glob("*.json")) == ["am-dpo-oracle", "dpo"]
    shutil.rmtree(root / "localisation")
    shutil.rmtree(root / "am-dpo-oracle-seed1")
    again = amrlhf("study", str(study), cwd=tmp_path)
    assert again.returncode == 0 and "the same mask as an earlier seed's" not in again.stderr, again.stderr[-3000:]
    assert json.loads((root / "results.json").read_text())["summary"] == results["summary"]

    # a changed budget or held-out file is refused before anything trains, naming the cells and the change
    cfg = yaml.safe_load(study.read_text())
    cfg["common_args"] = [a.replace("max_steps=4", "max_steps=8") for a in cfg["common_args"]]
    study.write_text(yaml.safe_dump(cfg))
    third = amrlhf("study", str(study), cwd=tmp_path)
    assert third.returncode == 2 and "Traceback" not in third.stderr, third.stderr[-3000:]
    assert "4 cell(s)" in third.stderr and "--trainer.max_steps=8" in third.stderr
    assert (root / "dpo-seed0" / "cell.json").stat().st_mtime_ns == done_before
    cfg["common_args"] = [a.replace("max_steps=8", "max_steps=4") for a in cfg["common_args"]]
    cfg["heldout"]["data"] = "local:arith_steps_conflicting/val"
    study.write_text(yaml.safe_dump(cfg))
    fourth = amrlhf("study", str(study), cwd=tmp_path)
    assert fourth.returncode == 2 and "heldout" in fourth.stderr and "arith_steps_conflicting/val" in fourth.stderr


@pytest.mark.parametrize("change,message", [
    ({"baseline": "nope"}, "baseline 'nope' is not one of the methods"),
    ({"methods": [{"name": "a", "config": "missing.yaml"}]}, "methods[0].config: recipe not found"),
    ({"seeds": [1, 1]}, "'seeds' must be a non-empty list of distinct integers"),
    ({"colour": "red"}, "unknown key(s) colour"),
    ({"heldout": {"limit": 3}}, "'heldout' needs at least 'data'"),
    ({"heldout": {"data": "local:x", "marked": {"limit": 3}}}, "heldout.marked needs 'spans'"),
    ({"seeds": [-1, 0]}, "'seeds' must lie in [0, 4294967295]"),
    ({"seed_args": ["--seed_everything={seed}", "--data.init_args.seed={sed}"]},
     "seed_args[1] '--data.init_args.seed={sed}': only the placeholder"),
    ({"heldout": {"data": "local:x", "limit": "abc"}}, "heldout.limit must be a positive integer or null, got 'abc'"),
    ({"common_args": "--trainer.max_steps=4"}, "'common_args' must be a list of command-line overrides"),
    ({"keep_checkpoints": "false"}, "'keep_checkpoints' must be true or false (unquoted), got 'false'"),
])
def test_bad_study_files_are_named_errors(tmp_path, change, message):
    cfg = yaml.safe_load((ROOT / "recipes" / "smoke" / "study.yaml").read_text())
    for m in cfg["methods"]:
        m["config"] = str(ROOT / m["config"])
    cfg.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(AmrlhfError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        load_study(path)


def test_study_cli_missing_file_is_one_error_line(tmp_path):
    proc = amrlhf("study", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: study file not found")
    assert "Traceback" not in proc.stderr


def test_a_metric_equal_on_every_seed_without_items_gets_no_verdict():
    d = paired_delta([0.49, 0.49, 0.49], [0.48, 0.48, 0.48])
    assert d.delta == pytest.approx(0.01) and d.half_width == 0
    assert d.verdict.startswith("no uncertainty estimate")


def test_result_spans_mark_every_step_result_and_no_remark():
    from amrlhf.data.arithmetic import ResultSpans

    chosen = "First, 27 + 8 = 35. Then, 35 + 28 = 63. Check: 63 + 1 = 65. Finally, 63 * 2 = 126. The answer is 126."
    spans = ResultSpans().spans({"chosen": chosen})
    assert [chosen[a:b] for a, b in spans] == ["35", "63", "126"]
    assert spans[1] == (chosen.index("= 63") + 2, chosen.index("= 63") + 4)


def test_marked_items_by_hand(tokenizer):
    import torch

    from amrlhf.evaluation.localization import response_offsets
    from amrlhf.models import ModelSpec, load_causal_lm
    from amrlhf.study.heldout import Heldout, Marked, marked_items, row_id, row_ids

    spans = {"class_path": "amrlhf.study.heldout.RegexSpans", "init_args": {"pattern": r"is (\d+)", "group": 1}}
    spec = Heldout(data="local:tiny-arith/prefs_heldout", limit=5, max_length=64, batch_size=2, marked=Marked(spans))
    data = spec.load(tokenizer)
    torch.manual_seed(0)
    model = load_causal_lm(ModelSpec("local:tiny-llama"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):  # memorise the first 3 answers, so that both outcomes occur
        for e in data[:3]:
            ids = torch.tensor([e.prompt_ids + e.responses[0]])
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    got, ids = marked_items(model, tokenizer, data, spec, "marked")
    assert len(got["marked_acc"]) == len(got["marked_logp"]) == 5
    assert len(set(ids)) == 5 and ids == [row_id(spec.rows[e.index]) for e in data]
    assert row_ids([{"a": 1}, {"a": 2}, {"a": 1}]) == [row_id({"a": 1}), row_id({"a": 2}), row_id({"a": 1}) + "#1"]
    assert set(got["marked_acc"]) == {0.0, 1.0}
    for i, e in enumerate(data):
        ex = spec.examples[e.index]
        a, b = re.search(r"is (\d+)", ex.chosen).span(1)
        offsets = response_offsets(tokenizer, ex, e.responses[0], "chosen")
        marked = [j for j, (s, t) in enumerate(offsets) if s < b and a < t]
        assert marked
        ids = e.prompt_ids + e.responses[0]
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        at = [len(e.prompt_ids) - 1 + j for j in marked]  # the position predicting response token j
        right = all(int(logp[p].argmax()) == ids[p + 1] for p in at)
        assert got["marked_acc"][i] == float(right)
        assert got["marked_logp"][i] == pytest.approx(sum(logp[p, ids[p + 1]].item() for p in at) / len(at), abs=1e-4)


def test_items_are_paired_by_identity_not_position():
    # the same two items, stored in another order by the method's cell: pairing by position would compare
    # item a with item b; by identity the deltas are 0.1 and 0.3 on every seed
    base = [[0.5, 0.1], [0.5, 0.1]]
    method = [[0.4, 0.6], [0.4, 0.6]]  # b, a
    d = paired_delta([0.5, 0.5], [0.3, 0.3], method, base, [["b", "a"]] * 2, [["a", "b"]] * 2)
    assert d.se_item == pytest.approx(math.sqrt(((0.1 - 0.2) ** 2 + (0.3 - 0.2) ** 2) / 1) / math.sqrt(2))
    with pytest.raises(ValueError, match="different held-out items"):
        paired_delta([0.5, 0.5], [0.3, 0.3], method, base, [["b", "c"]] * 2, [["a", "b"]] * 2)


def test_verdicts_follow_each_metrics_direction():
    from types import SimpleNamespace

    from amrlhf.study.report import higher_is_better, summarise

    assert not higher_is_better("lm_eval/wikitext/word_perplexity_none")
    assert not higher_is_better("lm_eval/wikitext/bits_per_byte_none") and not higher_is_better("train/loss")
    assert higher_is_better("eval/marked/marked_logp") and higher_is_better("lm_eval/gsm8k/exact_match_strict-match")
    study = SimpleNamespace(methods=[SimpleNamespace(name="dpo"), SimpleNamespace(name="am")], baseline="dpo",
                            seeds=[0, 1, 2])
    ppl = "lm_eval/wikitext/word_perplexity_none"
    cells = [{"method": m, "seed": s, "metrics": {ppl: v + 0.01 * s, "eval/heldout/implicit_acc": v + 0.01 * s},
              "items": {}} for m, v in (("dpo", 20.0), ("am", 10.0)) for s in (0, 1, 2)]
    out = summarise(study, cells)
    assert out[ppl]["am"]["verdict"] == "better" and out[ppl]["am"]["higher_is_better"] is False
    assert out["eval/heldout/implicit_acc"]["am"]["verdict"] == "worse"


def test_training_means_count_a_replayed_step_once(tmp_path):
    from types import SimpleNamespace

    from amrlhf.train import training_means

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("e"))
    rid = run.info.run_id
    for step, value, ts in ((0, 0.2, 1), (1, 0.4, 2), (2, 0.9, 3), (1, 0.6, 4), (2, 0.8, 5)):  # 1, 2 replayed
        client.log_metric(rid, "segments/kept_frac_chosen", value, timestamp=ts, step=step)
    got = training_means(SimpleNamespace(experiment=client, run_id=rid), ("segments/kept_frac_chosen",))
    assert got["segments/kept_frac_chosen"] == pytest.approx((0.2 + 0.6 + 0.8) / 3)


def test_study_with_a_missing_heldout_file_stops_before_training(tmp_path):
    cfg = yaml.safe_load(_study_yaml(tmp_path, None).read_text())
    cfg["heldout"]["data"] = str(tmp_path / "nope.jsonl")
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = amrlhf("study", str(path), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data file not found") and "nope.jsonl" in proc.stderr
    assert not (tmp_path / "runs" / "smoke-study" / "dpo-seed0").exists()


def test_an_interrupted_study_says_to_continue_the_study_and_marks_its_parent_run_killed(tmp_path, monkeypatch):
    import signal

    from amrlhf.errors import Interrupted
    from amrlhf.study import runner

    def interrupted(run, study):
        raise Interrupted(signal.SIGTERM, "interrupted by SIGTERM: saved runs/x/last.ckpt (step 2); resume with: "
                                          "amrlhf fit --config recipes/smoke/dpo.yaml --ckpt_path last")

    monkeypatch.setattr(runner, "_run_cells", interrupted)
    monkeypatch.chdir(tmp_path)
    path = _study_yaml(tmp_path, None)
    with pytest.raises(Interrupted) as caught:
        runner.run_study(path)
    message = str(caught.value)
    assert "amrlhf fit" not in message and message.endswith(f"amrlhf study {path}")
    assert message.startswith("interrupted by SIGTERM: saved runs/x/last.ckpt (step 2)")
    client = mlflow.MlflowClient(f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db")
    parent = client.search_runs([client.get_experiment_by_name("smoke-study").experiment_id])[0]
    assert parent.info.status == "KILLED"


def test_the_report_pairs_items_by_identity():
    from types import SimpleNamespace

    from amrlhf.study.report import summarise

    study = SimpleNamespace(methods=[SimpleNamespace(name="dpo"), SimpleNamespace(name="am")], baseline="dpo",
                            seeds=[0, 1])
    key = "eval/marked/marked_acc"

    def cell(method, seed, values, ids):
        return {"method": method, "seed": seed, "metrics": {key: sum(values) / len(values)},
                "items": {key: values}, "item_ids": {key: ids}}

    # item a: +0.1 on both seeds, item b: +0.3; the method's cells store b first
    cells = [cell("dpo", s, [0.5, 0.1], ["a", "b"]) for s in (0, 1)] + \
            [cell("am", s, [0.4, 0.6], ["b", "a"]) for s in (0, 1)]
    row = summarise(study, cells)[key]["am"]
    assert row["delta"] == pytest.approx(0.2) and row["se_item"] == pytest.approx(0.1 / math.sqrt(2) * math.sqrt(2))


def test_a_started_cell_or_a_changed_setup_fit_is_refused_before_training(tmp_path, monkeypatch):
    from amrlhf.assets import prepare
    from amrlhf.study.runner import FINGERPRINT, StudyRun

    prepare(["arith_steps_conflicting"])
    monkeypatch.chdir(tmp_path)
    cfg = yaml.safe_load(_study_yaml(tmp_path, None).read_text())
    cfg["setup"] = [{"name": "rm", "config": cfg["methods"][0]["config"], "args": ["--trainer.max_steps=2"]}]
    path = tmp_path / "with_setup.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = StudyRun(load_study(path))
    run.check_fingerprints()  # nothing started yet
    started = run.study.dir / "dpo-seed1"
    started.mkdir(parents=True)
    (started / FINGERPRINT).write_text(json.dumps(run.fingerprint(run.study.methods[0], 1)))
    run.check_fingerprints()  # started with these settings: it resumes
    cfg["setup"][0]["args"] = ["--trainer.max_steps=3"]
    path.write_text(yaml.safe_dump(cfg))
    run = StudyRun(load_study(path))
    with pytest.raises(AmrlhfError) as err:
        run.check_fingerprints()
    assert 'dpo-seed1: setup.rm.args[0]: "--trainer.max_steps=2" -> "--trainer.max_steps=3"' in str(err.value)


def test_a_method_given_as_base_and_overlay_runs_both_and_fingerprints_each(tmp_path, monkeypatch):
    """`config: [base, overlay]` passes both files, in order, as repeated --config; the fingerprint holds each
    file's sha256, so an edited overlay makes a started cell stale (named to the file)."""
    from amrlhf.assets import prepare
    from amrlhf.study.runner import FINGERPRINT, StudyRun

    prepare(["arith_steps_conflicting"])
    monkeypatch.chdir(tmp_path)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model:\n  init_args:\n    lr: 0.002\n")
    cfg = yaml.safe_load(_study_yaml(tmp_path, None).read_text())
    cfg["methods"][0]["config"] = [cfg["methods"][0]["config"], str(overlay)]
    path = tmp_path / "overlaid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = StudyRun(load_study(path))
    method = run.study.methods[0]
    args = run._fit_args(method, "x", [])
    assert args[:5] == ["fit", "--config", cfg["methods"][0]["config"][0], "--config", str(overlay)]
    fp = run.fingerprint(method, 1)
    assert fp["recipe"] == cfg["methods"][0]["config"] and len(fp["recipe_sha256"]) == 2
    started = run.study.dir / f"{method.name}-seed1"
    started.mkdir(parents=True)
    (started / FINGERPRINT).write_text(json.dumps(fp))
    run.check_fingerprints()
    overlay.write_text("model:\n  init_args:\n    lr: 0.003\n")
    with pytest.raises(AmrlhfError, match=rf"{method.name}-seed1: recipe_sha256\[1\]"):
        StudyRun(load_study(path)).check_fingerprints()
    cfg["methods"][0]["config"] = [str(overlay), str(tmp_path / "missing.yaml")]
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(AmrlhfError, match="recipe not found: .*missing.yaml"):
        load_study(path)


def test_the_study_cost_table_by_hand(tmp_path, capsys):
    """benchmarks/study_cost.py: mean seconds per cell by phase, per method and for all cells; what the phases
    do not cover is 'other'; cells without phases (finished by an older amrlhf) are left out."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import study_cost

    cells = {"dpo-seed0": ("dpo", 0, 100.0, {"fit": 60.0, "marked": 20.0}),
             "dpo-seed1": ("dpo", 1, 80.0, {"fit": 50.0, "marked": 10.0}),
             "am-seed0": ("am", 0, 130.0, {"fit": 70.0, "marked": 20.0, "localisation": 30.0})}
    for name, (method, seed, seconds, phases) in cells.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "cell.json").write_text(json.dumps(
            {"method": method, "seed": seed, "seconds": seconds, "phases": phases}))
    (tmp_path / "old-seed0").mkdir()
    (tmp_path / "old-seed0" / "cell.json").write_text(json.dumps({"method": "old", "seed": 0, "seconds": 5.0}))
    assert study_cost.main([str(tmp_path)]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["method"] == ["cells", "fit", "marked", "localisation", "other", "total"]
    assert rows["am"] == ["1", "70", "20", "30", "10", "130"]
    assert rows["dpo"] == ["2", "55", "15", "0", "20", "90"]
    assert rows["all"] == ["3", "60", "17", "10", "17", "103"]  # other: 103.3 - 86.7
    assert "old" not in rows
    assert study_cost.main([str(tmp_path), "--seeds", "1"]) == 0
    assert "| dpo | 1 | 50 | 10 | 20 | 80 |" in capsys.readouterr().out


def test_the_report_of_the_finished_seeds_is_marked_partial_and_trains_nothing(tmp_path, monkeypatch):
    """`amrlhf study X --report-finished`: only seeds whose every method finished, a PARTIAL note naming the
    finished cells left out, no MLflow store created; a cell finished with other settings is refused."""
    from amrlhf.assets import prepare
    from amrlhf.study.runner import CELL_DONE, StudyRun

    prepare(["arith_steps_conflicting"])
    monkeypatch.chdir(tmp_path)
    path = _study_yaml(tmp_path, None)
    study = load_study(path)
    run = StudyRun(study, track=False)
    key = "eval/marked/marked_acc"
    values = {("dpo", 0): [0.5, 0.1], ("am-dpo-oracle", 0): [0.7, 0.2], ("dpo", 1): [0.3, 0.3]}
    for (method, seed), v in values.items():
        fit = next(m for m in study.methods if m.name == method)
        cell = study.dir / f"{method}-seed{seed}"
        cell.mkdir(parents=True)
        (cell / CELL_DONE).write_text(json.dumps({
            "method": method, "seed": seed, "metrics": {key: sum(v) / 2}, "items": {key: v},
            "item_ids": {key: ["a", "b"]}, "seconds": 1.0, "fingerprint": run.fingerprint(fit, seed)}))
    proc = amrlhf("study", str(path), "--report-finished", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PARTIAL**: seeds [0] of [0, 1]" in proc.stdout and "(dpo-seed1)" in proc.stdout
    results = json.loads((study.dir / "results.json").read_text())
    assert results["seeds"] == [0] and results["note"].startswith("**PARTIAL**")
    assert results["summary"][key]["am-dpo-oracle"]["delta"] == pytest.approx(0.15)
    assert (study.dir / "report.md").read_text().splitlines()[2].startswith("**PARTIAL**")
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing tracked
    stale = json.loads((study.dir / "dpo-seed0" / CELL_DONE).read_text())
    stale["fingerprint"]["args"][0] = "--data.init_args.train=other"
    (study.dir / "dpo-seed0" / CELL_DONE).write_text(json.dumps(stale))
    refused = amrlhf("study", str(path), "--report-finished", cwd=tmp_path)
    assert refused.returncode == 2 and "dpo-seed0" in refused.stderr and "Traceback" not in refused.stderr


def test_a_metric_equal_on_every_seed_has_no_interval_despite_float_rounding():
    """Three seeds of the same localisation (0.1 each): the float mean (0.1 + 0.1 + 0.1) / 3 is 0.10000000000000002
    and left a tiny SE, so a verdict was given on no evidence; equal values have SE 0 and no verdict."""
    from amrlhf.stats import mean_se

    assert mean_se([0.1, 0.1, 0.1]) == (0.1, 0.0)
    d = paired_delta([0.1, 0.1, 0.1], [0.3, 0.3, 0.3])
    assert d.half_width == 0.0 and d.verdict == "no uncertainty estimate (same on every seed, no per-item values)"
    assert mean_se([0.1, 0.2]) == pytest.approx((0.15, 0.05))
