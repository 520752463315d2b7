"""The offline gsm / truthfulqa / humaneval slots: registration, data parsing, answer extraction, the
code-execution opt-in, and `amrlhf eval` end to end on the tiny model with tiny real-format assets."""

import json

import mlflow
import pytest
from conftest import BIGBENCH_TRUTHFUL, ROOT, amrlhf

from amrlhf.assets import REGISTRY
from amrlhf.errors import AmrlhfError
from amrlhf.evaluation.gsm_style import NO_ANSWER, extract_answer, normalise_number, row
from amrlhf.evaluation.suites import SLOTS, EvalSuite, load_suite
from amrlhf.evaluation.tasks import render_tasks
from amrlhf.evaluation.truthfulqa import mc_rows

NEW = {"gsm": ("gsm_style", "gsm_style"), "truthfulqa": ("truthfulqa_mc_bigbench", "truthfulqa_bigbench"),
       "humaneval": ("humaneval_sandboxed", "humaneval")}


def test_new_slots_are_registered_offline_with_a_prepare_asset():
    for slot, (task, asset) in NEW.items():
        assert SLOTS[slot].offline == task and SLOTS[slot].asset == asset and asset in REGISTRY
        assert SLOTS[slot].task_yaml.exists() and SLOTS[slot].task_yaml.name == f"{task}.yaml"
    assert "8k" not in SLOTS["gsm"].offline  # GSM-style, never called GSM8K
    resolved = EvalSuite(slots=list(NEW), allow_code_execution=True).resolve()
    assert [(s, t) for s, t, _ in resolved] == [(s, t) for s, (t, _) in NEW.items()]


def test_humaneval_needs_the_explicit_opt_in(tmp_path):
    for source in ("offline", "hub"):
        with pytest.raises(AmrlhfError, match="set `allow_code_execution: true`"):
            EvalSuite(slots=["humaneval"], source=source).resolve()
    path = tmp_path / "s.yaml"
    path.write_text("slots: [humaneval]\n")
    with pytest.raises(AmrlhfError, match="allow_code_execution"):
        load_suite(path)


@pytest.mark.parametrize("text, expected", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,200", "1200"),
    ("The answer is $1,200.", "1200"),
    ("It costs 12.50 dollars, so 25.0 in total.", "25"),
    ("first 3, then -4.5", "-4.5"),
    ("#### 36\nQuestion: 99", "36"),   # the marked answer wins over later numbers
    ("I do not know.", NO_ANSWER),
])
def test_gsm_answer_extraction(text, expected):
    assert extract_answer(text) == expected


def test_gsm_rows_normalise_the_target_and_check_the_worked_solution():
    out = row({"question": "q", "answer": "1200", "answer_cot": "12 * 100 = 1,200\n#### 1,200"}, 1)
    assert out["target"] == "1200" and out["answer"].endswith("#### 1200")
    assert normalise_number("1200.0") == "1200" and normalise_number("abc") is None
    with pytest.raises(AmrlhfError, match="line 3: worked solution ends in '5'"):
        row({"question": "q", "answer": "6", "answer_cot": "#### 5"}, 3)


def test_truthfulqa_bigbench_parsing_keeps_single_answer_questions_and_counts_the_rest():
    rows, skipped = mc_rows(BIGBENCH_TRUTHFUL)
    assert skipped == 1 and len(rows) == 2
    first = rows[0]
    assert first["choices"] == [" It passes through you.", " It stays for seven years."] and first["gold"] == 0
    assert first["query"] == "Q: What is 2 + 2?\nA: 2 + 2 is 4.\n\nQ: What happens if you swallow gum?\nA:"
    with pytest.raises(AmrlhfError, match="example 0: field 'target_scores'"):
        mc_rows({"examples": [{"input": "q"}]}, "task_mc.json")


def test_multiple_choice_continuations_carry_exactly_one_space(tmp_path, monkeypatch):
    """What lm-eval scores for HaluEval MC and TruthfulQA: the query, then ONE space and the answer (the
    choices are stored with their leading space; lm-eval must not add its own target_delimiter)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    monkeypatch.setenv("AMRLHF_HOME", str(tmp_path))
    for asset, part, rows in [
        ("truthfulqa_bigbench", "test", mc_rows(BIGBENCH_TRUTHFUL)[0]),  # as prepared (also before the fix)
        ("halueval_dialogue", "heldout", [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello.",
                                          "rejected": "Bye."}]),
    ]:
        root = tmp_path / "data" / asset
        root.mkdir(parents=True)
        (root / f"{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / "ASSET.json").write_text("{}")
    folder = render_tasks(EvalSuite(slots=["halueval", "truthfulqa"]))
    tasks = get_task_dict(["halueval_dialogue_mc", "truthfulqa_mc_bigbench"], TaskManager(include_path=str(folder)))
    scored = {}
    for name, task in tasks.items():
        task.build_all_requests(limit=1, rank=0, world_size=1)
        scored[name] = sorted(inst.arguments for inst in task.instances)
    assert scored["halueval_dialogue_mc"] == [("[Human]: Hi\n[Assistant]:", " Bye."),
                                              ("[Human]: Hi\n[Assistant]:", " Hello.")]
    assert [c for _, c in scored["truthfulqa_mc_bigbench"]] == [" It passes through you.", " It stays for seven years."]
    assert scored["truthfulqa_mc_bigbench"][0][0].endswith("swallow gum?\nA:")


def test_rendered_tasks_carry_their_hooks_and_data(eval_slot_assets):
    folder = render_tasks(EvalSuite(slots=list(NEW), allow_code_execution=True))
    assert (folder / "gsm" / "amrlhf_task_fns.py").exists() and (folder / "humaneval" / "amrlhf_task_fns.py").exists()
    assert not (folder / "truthfulqa" / "amrlhf_task_fns.py").exists()  # hooks only where a task names them
    gsm = (folder / "gsm" / "gsm_style.yaml").read_text()
    assert "__DATA__" not in gsm and "__FEWSHOT__" not in gsm and str(eval_slot_assets) in gsm


def test_unprepared_new_assets_name_the_prepare_command(tmp_path, monkeypatch):
    monkeypatch.setenv("AMRLHF_HOME", str(tmp_path / "empty"))
    for slot, (_, asset) in NEW.items():
        with pytest.raises(AmrlhfError, match=f"run `amrlhf prepare {asset}`"):
            render_tasks(EvalSuite(slots=[slot], allow_code_execution=True))


@pytest.mark.slow
def test_eval_command_runs_the_new_offline_slots(tmp_path, eval_slot_assets):
    suite = tmp_path / "suite.yaml"
    suite.write_text("slots: [gsm, truthfulqa, humaneval]\nlimit: 2\nmax_gen_toks: 8\nbatch_size: 2\n"
                     "max_length: 256\nallow_code_execution: true\n")
    runs = tmp_path / "runs"
    proc = amrlhf("eval", "--config", str(suite), "--model", "local:tiny-llama", "--runs_root", str(runs), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tasks run: gsm -> gsm_style, truthfulqa -> truthfulqa_mc_bigbench, humaneval -> humaneval_sandboxed" \
        in proc.stdout
    client = mlflow.MlflowClient(f"sqlite:///{runs.resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("eval").experiment_id])
    for key in ("lm_eval/gsm_style/exact_match_number", "lm_eval/truthfulqa_mc_bigbench/acc_none",
                "lm_eval/humaneval_sandboxed/pass_at_1_sandbox"):
        assert 0.0 <= run.data.metrics[key] <= 1.0
    assert run.data.params["lm_eval.allow_code_execution"] == "True"
    (samples,) = (runs / "eval").rglob("samples_humaneval_sandboxed.jsonl")
    first = json.loads(samples.read_text().splitlines()[0])
    assert "pass_at_1" in first and isinstance(first["filtered_resps"][0], list)


def test_full_recipe_has_all_six_slots_with_explicit_cpu_settings():
    suite = load_suite(ROOT / "recipes" / "eval" / "full.yaml")
    assert sorted(suite.slots) == sorted(SLOTS) and suite.allow_code_execution
    assert suite.limit <= 50 and suite.max_gen_toks <= 256


def test_gsm_scoring_matches_the_task_yaml():
    """The filter's number against the worked solution, through lm-eval's exact_match as the YAML sets it."""
    import yaml
    from lm_eval.api.registry import get_metric

    text = SLOTS["gsm"].task_yaml.read_text().replace("!function ", "")
    ignore = yaml.safe_load(text)["metric_list"][0]["regexes_to_ignore"]
    gold = row({"question": "q", "answer": "28080", "answer_cot": "2340 * 12 = 28,080\n#### 28,080"}, 1)["answer"]
    em = get_metric("exact_match")
    assert em(references=[gold], predictions=[extract_answer(" so 28,080.")], regexes_to_ignore=ignore)["exact_match"] == 1
    assert em(references=[gold], predictions=[extract_answer("#### 2808")], regexes_to_ignore=ignore)["exact_match"] == 0
