"""Evaluation: suites and slots, the one evaluate() function through `amrlhf eval` on each model
form and as a callback after fit, parity with the lm-eval command line, clear errors."""

import json
import os
import shutil
import subprocess
import sys

import mlflow
import pytest
from conftest import ROOT, amrlhf, recipe

from amrlhf.errors import AmrlhfError
from amrlhf.evaluation.adversarial import adversarial_rows
from amrlhf.evaluation.harness import flatten
from amrlhf.evaluation.suites import EvalSuite, load_suite

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_mmlu(tiny_assets):
    """A 6-question MMLU-format asset written by the test (offline slot data without the network)."""
    root = tiny_assets / "data" / "mmlu"
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a), str(b)],
             "answer": 0, "subject": "arithmetic"} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1)]]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "ASSET.json").write_text(json.dumps({"source": "written by the tests"}))
    return root


def suite_file(tmp_path, **fields):
    base = {"slots": ["adversarial", "mmlu"], "limit": 3, "batch_size": 2, "max_gen_toks": 6, "max_length": 256}
    path = tmp_path / "suite.yaml"
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in {**base, **fields}.items()) + "\n")
    return path


def test_adversarial_questions_are_deterministic_and_verifiable():
    rows = adversarial_rows(8, seed=0)
    assert rows == adversarial_rows(8, seed=0) and rows != adversarial_rows(8, seed=1)
    assert {r["kind"] for r in rows} == {"decimal_compare", "letter_count", "relative_day", "equal_mass"}
    dec = next(r for r in rows if r["kind"] == "decimal_compare")
    a, b = dec["question"].split("bigger, ")[1].split("?")[0].split(" or ")
    assert dec["answer"] == max(a, b, key=float)
    count = next(r for r in rows if r["kind"] == "letter_count")
    letter, word = count["question"].split('"')[1], count["question"].split('"')[3]
    assert count["answer"] == str(word.count(letter))


def test_flatten_metric_keys_have_no_commas():
    flat = flatten({"t": {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "t", "exact_match,answer": 1.0}})
    assert flat == {"lm_eval/t/acc_none": 0.5, "lm_eval/t/acc_none_stderr": 0.1, "lm_eval/t/exact_match_answer": 1.0}


def test_suite_errors_say_what_to_do(tmp_path):
    with pytest.raises(AmrlhfError, match="unknown evaluation slot 'mmmlu'"):
        EvalSuite(slots=["mmmlu"]).resolve()
    with pytest.raises(AmrlhfError, match="slot 'halueval' has no hub task.*set source: offline"):
        EvalSuite(slots=["halueval"], source="hub").resolve()
    with pytest.raises(AmrlhfError, match="evaluation suite not found"):
        load_suite(tmp_path / "nope.yaml")
    with pytest.raises(AmrlhfError, match="unknown field"):
        load_suite(suite_file(tmp_path, shots=5))
    for path in sorted((ROOT / "recipes" / "eval").glob("*.yaml")):
        assert path.read_text().splitlines()[0] == f"# amrlhf eval --config {path.relative_to(ROOT)} --model MODEL [--limit N]"
        load_suite(path)


def test_unprepared_suite_data_names_the_prepare_command(tmp_path):
    proc = amrlhf("eval", "--config", str(suite_file(tmp_path, slots=["halueval"])), "--model", "local:tiny-llama",
                  "--runs_root", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "run `amrlhf prepare halueval_dialogue`" in proc.stderr
    proc = amrlhf("eval", "--config", str(suite_file(tmp_path)), "--model", str(tmp_path / "missing.ckpt"),
                  "--runs_root", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr


def test_eval_command_on_every_model_form(tmp_path, tiny_mmlu):
    runs = tmp_path / "runs"
    lora = ["--model.init_args.policy.lora.r=4", "--model.init_args.reference=amrlhf.modules.AdapterReference",
            "--run_name=lora"]
    for extra in ([], lora):
        proc = amrlhf("fit", "--config", recipe("dpo"), "--runs_root", str(runs), "--trainer.max_steps=1",
                      "--trainer.limit_val_batches=0", *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert amrlhf("export", str(runs / "smoke-dpo" / "final.ckpt"), str(tmp_path / "hf"), cwd=tmp_path).returncode == 0
    assert amrlhf("export", str(runs / "lora" / "final.ckpt"), str(tmp_path / "adapter"), cwd=tmp_path).returncode == 0
    suite = suite_file(tmp_path)
    forms = {"ckpt": str(runs / "smoke-dpo" / "final.ckpt"), "hf": str(tmp_path / "hf"),
             "adapter": str(tmp_path / "adapter"), "local": "local:tiny-llama"}
    accs = {}
    for form, model in forms.items():
        proc = amrlhf("eval", "--config", str(suite), "--model", model, "--runs_root", str(tmp_path / "e"),
                      cwd=tmp_path)
        assert proc.returncode == 0, (form, proc.stderr[-2000:])
        assert "lm_eval/mmlu_0shot_offline/acc_none" in proc.stdout and "tasks run: adversarial -> adversarial_tricks" in proc.stdout
        accs[form] = proc.stdout
    assert "limit=3" in accs["hf"]  # the settings are shown beside the results
    client = mlflow.MlflowClient(f"sqlite:///{(tmp_path / 'e').resolve()}/mlflow.db")
    runs_ = client.search_runs([client.get_experiment_by_name("eval").experiment_id])
    assert len(runs_) == 4
    for run in runs_:
        assert "lm_eval/mmlu_0shot_offline/acc_none" in run.data.metrics
        assert run.data.params["lm_eval.task.mmlu"] == "mmlu_0shot_offline"
        arts = {a.path for a in client.list_artifacts(run.info.run_id, "lm_eval")}
        assert "lm_eval/lm_eval_results.json" in arts and "lm_eval/samples_mmlu_0shot_offline.jsonl" in arts


def test_in_memory_evaluation_equals_the_lm_eval_command_line(tmp_path, tiny_mmlu):
    from amrlhf.assets import asset_dir
    from amrlhf.evaluation.harness import evaluate
    from amrlhf.evaluation.tasks import render_tasks
    from amrlhf.models import ModelSpec, load_causal_lm, load_tokenizer

    suite = EvalSuite(slots=["mmlu"], limit=6, batch_size=2, max_length=256)
    ours = evaluate(load_causal_lm(ModelSpec("local:tiny-llama")), load_tokenizer("local:tiny-llama"), suite,
                    out_dir=tmp_path / "ours")
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={asset_dir('tiny-llama')},dtype=float32,max_length=256", "--tasks", "mmlu_0shot_offline",
         "--include_path", str(render_tasks(suite)), "--limit", "6", "--batch_size", "2", "--device", "cpu",
         "--output_path", str(out), "--seed", "0"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = out.rglob("results_*.json")
    theirs = json.loads(result_file.read_text())["results"]["mmlu_0shot_offline"]
    assert ours.metrics["lm_eval/mmlu_0shot_offline/acc_none"] == theirs["acc,none"]
    assert ours.metrics["lm_eval/mmlu_0shot_offline/acc_norm_none"] == theirs["acc_norm,none"] if \
        "acc_norm,none" in theirs else True


def test_lm_eval_callback_after_fit_logs_to_the_run(tmp_path, tiny_mmlu):
    suite = suite_file(tmp_path, slots=["mmlu"], limit=2)
    runs = tmp_path / "runs"
    proc = amrlhf("fit", "--config", recipe("dpo"), "--runs_root", str(runs), "--trainer.max_steps=1",
                  "--trainer.limit_val_batches=0", "--trainer.callbacks+=amrlhf.callbacks.LmEval",
                  f"--trainer.callbacks.suite={suite}", "--tracking.log_checkpoint=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = mlflow.MlflowClient(f"sqlite:///{runs.resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("amrlhf").experiment_id])
    assert "lm_eval/mmlu_0shot_offline/acc_none" in run.data.metrics
    assert (runs / "smoke-dpo" / "lm_eval" / "final" / "lm_eval_results.json").exists()


def test_num_fewshot_zero_overrides_a_task_default(tmp_path):
    """A suite's `num_fewshot: 0` reaches lm-eval as 0 (None would let the task's own default run)."""
    from amrlhf.evaluation.harness import evaluate
    from amrlhf.models import ModelSpec, load_causal_lm, load_tokenizer

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"question": f"{a} plus {b}?", "choices": [str(a + b), str(a)], "gold": 0} for a, b in [(1, 2), (3, 4)]]
    data = tasks / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "fewshot_default_two.yaml").write_text(
        f"task: fewshot_default_two\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"    train: {data}\ntest_split: test\nfewshot_split: train\nnum_fewshot: 2\noutput_type: multiple_choice\n"
        "doc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n"
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    suite = EvalSuite(slots=[], tasks=["fewshot_default_two"], include_path=str(tasks), num_fewshot=0, limit=1,
                      batch_size=1, max_length=128)
    report = evaluate(load_causal_lm(ModelSpec("local:tiny-llama")), load_tokenizer("local:tiny-llama"), suite,
                      out_dir=tmp_path / "out")
    results = json.loads((tmp_path / "out" / "lm_eval_results.json").read_text())
    assert results["n-shot"]["fewshot_default_two"] == 0
    (sample,) = [json.loads(x) for x in (tmp_path / "out" / "samples_fewshot_default_two.jsonl").read_text().splitlines()]
    context = sample["arguments"][0][0]
    assert context.count("Q: ") == 1, context  # the question alone, no few-shot examples before it
    assert report.settings["num_fewshot"] == 0


@pytest.mark.slow
def test_a_non_editable_install_runs_the_offline_suites_from_any_folder(tmp_path, tiny_mmlu, eval_slot_assets):
    """The task YAMLs and their hooks are package data: a wheel installed elsewhere (no source tree on the path)
    runs `amrlhf eval` with the offline slots from an unrelated working directory."""
    wheels, site, elsewhere, src = (tmp_path / d for d in ("wheels", "site", "elsewhere", "src"))
    elsewhere.mkdir()
    # built from a copy of the tracked files: the build writes build/ and *.egg-info, never into the checkout
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("amrlhf-*.whl")
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert (site / "amrlhf" / "evaluation" / "slots" / "gsm" / "amrlhf_task_fns.py").exists()
    suite = suite_file(elsewhere, slots=["adversarial", "mmlu", "gsm"], limit=2)
    entry = "import sys, amrlhf; print('amrlhf from', amrlhf.__file__, file=sys.stderr); " \
            "from amrlhf.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", entry, "eval", "--config", str(suite), "--model", "local:tiny-llama",
                           "--runs_root", str(elsewhere / "runs")], cwd=elsewhere, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"amrlhf from {site / 'amrlhf' / '__init__.py'}" in proc.stderr
    assert "tasks run: adversarial -> adversarial_tricks, mmlu -> mmlu_0shot_offline, gsm -> gsm_style" in proc.stdout
