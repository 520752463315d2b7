"""End to end through the real `amrlhf` entry point: smoke recipes, MLflow round trip,
resume after a crash, DDP with 2 CPU processes, export, clear errors for expected mistakes."""

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import amrlhf, recipe, start_amrlhf, wait_for_metric

pytestmark = pytest.mark.slow


def runs_df(runs_root: Path | str, experiment: str = "amrlhf"):
    """mlflow.search_runs on a store, without touching the process-wide tracking URI."""
    uri = runs_root if isinstance(runs_root, str) else f"sqlite:///{runs_root.resolve()}/mlflow.db"
    with mlflow_uri(uri):
        return mlflow.search_runs(experiment_names=[experiment])


@contextmanager
def mlflow_uri(uri: str):
    old = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old or "")
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if old:
            os.environ["MLFLOW_TRACKING_URI"] = old


def history(runs_root: Path, run_id: str, key: str) -> dict[int, float]:
    client = mlflow.MlflowClient(f"sqlite:///{runs_root.resolve()}/mlflow.db")
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize(
    "name,keys",
    [
        ("dpo", ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected", "logits/chosen", "logits/rejected", "segments/kept_frac_chosen",
                 "eval/rewards/accuracies"]),
        ("sft", ["sft/nll", "eval/sft/nll", "segments/fallback_frac"]),
        ("rm", ["rm/accuracy", "rm/margin", "eval/rm/accuracy"]),
        ("token_rm", ["rm/token_accuracy", "rm/flaw_recall", "rm/flawed_frac", "eval/rm/token_accuracy"]),
        ("am_dpo", ["rewards/accuracies", "segments/kept_frac_chosen", "segments/kept_frac_rejected",
                    "segments/pivots_per_response", "segments/mean_segment_len", "segments/fallback_frac",
                    "segments/score_std", "eval/segments/kept_frac_chosen"]),
        ("am_sft", ["sft/nll", "arj/best_score", "arj/skipped_frac", "segments/kept_frac_chosen",
                    "segments/fallback_frac"]),
    ],
)
def test_smoke_recipe_trains_and_round_trips_through_mlflow(tmp_path, name, keys):
    ok(amrlhf("fit", "--config", recipe(name), "--runs_root", str(tmp_path / "runs"), cwd=tmp_path))
    df = runs_df(tmp_path / "runs")
    assert len(df) == 1 and df.loc[0, "status"] == "FINISHED"
    for key in keys:
        assert f"metrics.{key}" in df.columns, key
    run_id = df.loc[0, "run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db")
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert {"config.yaml", "checkpoints/final.ckpt"} <= artifacts
    kind = client.get_experiment(df.loc[0, "experiment_id"]).tags.get("mlflow.experimentKind")
    assert kind == "custom_model_development"  # MLflow's UI opens it on runs and charts, not GenAI evaluation
    if name == "am_dpo":  # the segments view, logged at the start and every 3 steps
        views = {a.path for a in client.list_artifacts(run_id, "segments")}
        assert {"segments/step_000000.html", "segments/step_000003.html"} <= views
    assert df.loc[0, "params.data.init_args.train"].startswith("local:tiny-arith/")
    run_dir = tmp_path / "runs" / f"smoke-{name}"
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(k.startswith("policy.") for k in ckpt["state_dict"])  # no frozen reference inside
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run_id


def test_experiments_are_marked_as_model_training_unless_the_user_chose_a_kind(tmp_path):
    from amrlhf.tracking import experiment_id

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    new = experiment_id(client, "a", None)
    old = client.create_experiment("b")  # made before this tag existed
    mine = client.create_experiment("c", tags={"mlflow.experimentKind": "genai_development"})
    assert experiment_id(client, "a", None) == new and experiment_id(client, "b", None) == old
    assert experiment_id(client, "c", None) == mine
    kinds = [client.get_experiment(i).tags.get("mlflow.experimentKind") for i in (new, old, mine)]
    assert kinds == ["custom_model_development", "custom_model_development", "genai_development"]


def test_resume_after_crash_is_exact(tmp_path):
    common = ["--config", recipe("dpo"), "--checkpoint_every=1", "--trainer.max_steps=6",
              "--trainer.val_check_interval=6", "--tracking.log_checkpoint=false"]
    ok(amrlhf("fit", *common, "--runs_root", str(tmp_path / "a"), cwd=tmp_path))
    crashed = amrlhf("fit", *common, "--runs_root", str(tmp_path / "b"),
                     "--trainer.callbacks+=amrlhf.callbacks.CrashAtStep", "--trainer.callbacks.step=3", cwd=tmp_path)
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    resumed = amrlhf("fit", *common, "--runs_root", str(tmp_path / "b"), "--ckpt_path", "last", cwd=tmp_path)
    ok(resumed)
    assert "dataloader is not resumable" not in resumed.stderr  # Lightning's warning: ours resumes exactly (below)
    a, b = runs_df(tmp_path / "a"), runs_df(tmp_path / "b")
    assert len(b) == 1  # the resumed run reattached to the same MLflow run
    ha = history(tmp_path / "a", a.loc[0, "run_id"], "loss")
    hb = history(tmp_path / "b", b.loc[0, "run_id"], "loss")
    assert sorted(hb) == sorted(ha) and len(ha) == 6
    for step in ha:
        assert hb[step] == pytest.approx(ha[step], rel=1e-6, abs=1e-7), step
    ea = history(tmp_path / "a", a.loc[0, "run_id"], "eval/loss")
    eb = history(tmp_path / "b", b.loc[0, "run_id"], "eval/loss")
    assert list(ea.values()) == pytest.approx(list(eb.values()), rel=1e-6)


def test_resume_at_an_epoch_boundary_trains_every_epoch(tmp_path):
    """8 rows, batch 4: 2 steps an epoch. A crash after step 2 (the end of epoch 0) resumes at the start
    of epoch 1 in its own order, not skipping it: 6 optimizer steps in all, the same losses."""
    common = ["--config", recipe("dpo"), "--data.init_args.limit_train=8", "--trainer.max_steps=-1",
              "--trainer.max_epochs=3", "--trainer.limit_val_batches=0", "--checkpoint_every=1",
              "--tracking.log_checkpoint=false"]
    ok(amrlhf("fit", *common, "--runs_root", str(tmp_path / "a"), cwd=tmp_path))
    crashed = amrlhf("fit", *common, "--runs_root", str(tmp_path / "b"),
                     "--trainer.callbacks+=amrlhf.callbacks.CrashAtStep", "--trainer.callbacks.step=2", cwd=tmp_path)
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    ok(amrlhf("fit", *common, "--runs_root", str(tmp_path / "b"), "--ckpt_path", "last", cwd=tmp_path))
    ha = history(tmp_path / "a", runs_df(tmp_path / "a").loc[0, "run_id"], "loss")
    hb = history(tmp_path / "b", runs_df(tmp_path / "b").loc[0, "run_id"], "loss")
    assert len(ha) == 6 and sorted(hb) == sorted(ha), (ha, hb)
    for step in ha:
        assert hb[step] == pytest.approx(ha[step], rel=1e-6, abs=1e-7), step
    ckpt = torch.load(tmp_path / "b" / "smoke-dpo" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    assert ckpt["global_step"] == 6


KILL_AFTER_CHECKPOINT = """
import os
import lightning as L
from amrlhf.cli import main

save, at = L.Trainer.save_checkpoint, int(os.environ["KILL_AT_STEP"])

def save_then_die(trainer, filepath, *args, **kwargs):  # a SIGKILL right after last.ckpt of step `at` is written
    save(trainer, filepath, *args, **kwargs)
    if os.path.basename(filepath) == "last.ckpt" and trainer.global_step == at:
        os._exit(17)

L.Trainer.save_checkpoint = save_then_die
raise SystemExit(main())
"""


def all_histories(runs_root: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric of the store's one run: (step, value) for each time it was logged, a repeat included."""
    client = mlflow.MlflowClient(f"sqlite:///{runs_root.resolve()}/mlflow.db")
    run_id = runs_df(runs_root).loc[0, "run_id"]
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in client.get_run(run_id).data.metrics}


def test_a_kill_between_a_checkpoint_and_its_metrics_loses_none(tmp_path):
    """Killed right after last.ckpt of step 3 is written (validation follows step 3), then, resumed, right after
    that of step 4: Lightning writes a step's checkpoint in on_train_batch_end, before it logs the step's metrics
    and before the validation that follows it, and a resumed run goes on from the next step. The history still has
    every step's metrics exactly once (the same values), as an uninterrupted run's has."""
    common = ["--config", recipe("dpo"), "--checkpoint_every=1", "--trainer.max_steps=6",
              "--trainer.val_check_interval=3", "--tracking.log_checkpoint=false"]
    ok(amrlhf("fit", *common, "--runs_root", str(tmp_path / "a"), cwd=tmp_path))
    for step, resume in ((3, []), (4, ["--ckpt_path", "last"])):
        killed = amrlhf("fit", *common, "--runs_root", str(tmp_path / "b"), *resume, cwd=tmp_path,
                        patched=KILL_AFTER_CHECKPOINT, env={"KILL_AT_STEP": str(step)})
        assert killed.returncode == 17, killed.stderr[-2000:]
    ok(amrlhf("fit", *common, "--runs_root", str(tmp_path / "b"), "--ckpt_path", "last", cwd=tmp_path))
    a, b = all_histories(tmp_path / "a"), all_histories(tmp_path / "b")
    assert sorted(b) == sorted(a)
    for key, logged in a.items():
        assert [step for step, _ in b[key]] == [step for step, _ in logged], key
        assert [v for _, v in b[key]] == pytest.approx([v for _, v in logged], rel=1e-6, abs=1e-7), key


def test_ddp_two_cpu_processes_reduce_metrics_across_ranks(tmp_path):
    runs = tmp_path / "runs"
    ok(amrlhf("fit", "--config", recipe("dpo"), "--runs_root", str(runs), "--trainer.devices=2",
              "--trainer.strategy=ddp", "--trainer.max_steps=3", "--trainer.val_check_interval=3",
              "--tracking.log_checkpoint=false", cwd=tmp_path, timeout=900))
    df = runs_df(runs)
    assert len(df) == 1  # rank 0 logs one run
    ddp_eval = df.loc[0, "metrics.eval/loss"]
    # a single process validating the same weights on the whole held-out set gives the same mean:
    # each rank saw half of it, so the DDP value is right only if it was reduced across ranks
    ok(amrlhf("validate", "--config", recipe("dpo"), "--runs_root", str(tmp_path / "v"),
              "--ckpt_path", str(runs / "smoke-dpo" / "checkpoints" / "last.ckpt"), cwd=tmp_path))
    single = runs_df(tmp_path / "v").loc[0, "metrics.eval/loss"]
    assert ddp_eval == pytest.approx(single, rel=1e-5)


def test_ppo_with_a_critic_on_its_own_backbone_trains_under_ddp(tmp_path):
    """On one process the critic's loss is backpropagated after the policy's; DDP's reducer refuses a second
    backward before the first one's reduction, so under DDP the summed loss is backpropagated once."""
    runs = tmp_path / "runs"
    ok(amrlhf("fit", "--config", recipe("ppo"), "--runs_root", str(runs), "--trainer.devices=2",
              "--trainer.strategy=ddp", "--trainer.max_steps=4", "--trainer.limit_val_batches=0",
              "--model.init_args.critic=amrlhf.modules.ValueModel",
              "--model.init_args.critic.init_args.model.name=local:tiny-llama",
              "--tracking.log_checkpoint=false", cwd=tmp_path, timeout=900))
    df = runs_df(runs)
    assert len(df) == 1 and df.loc[0, "metrics.loss/value_avg"] == df.loc[0, "metrics.loss/value_avg"]  # not NaN


def test_export_full_and_lora(tmp_path):
    from transformers import AutoModelForCausalLM

    runs = tmp_path / "runs"
    ok(amrlhf("fit", "--config", recipe("dpo"), "--runs_root", str(runs), "--trainer.max_steps=2", cwd=tmp_path))
    ok(amrlhf("export", str(runs / "smoke-dpo" / "final.ckpt"), str(tmp_path / "hf"), cwd=tmp_path))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ckpt = torch.load(runs / "smoke-dpo" / "final.ckpt", map_location="cpu", weights_only=False)
    for name, p in model.state_dict().items():
        if f"policy.{name}" in ckpt["state_dict"]:
            assert torch.equal(p, ckpt["state_dict"][f"policy.{name}"]), name
    assert (tmp_path / "hf" / "tokenizer_config.json").exists()

    lora = ["--model.init_args.policy.lora.r=4", "--model.init_args.reference=amrlhf.modules.AdapterReference",
            "--run_name=lora"]
    ok(amrlhf("fit", "--config", recipe("dpo"), "--runs_root", str(runs), "--trainer.max_steps=2", *lora,
              cwd=tmp_path))
    lckpt = torch.load(runs / "lora" / "final.ckpt", map_location="cpu", weights_only=False)
    assert lckpt["state_dict"] and all("lora_" in k for k in lckpt["state_dict"])  # adapters only
    ok(amrlhf("export", str(runs / "lora" / "final.ckpt"), str(tmp_path / "adapter"), cwd=tmp_path))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    ok(amrlhf("export", str(runs / "lora" / "final.ckpt"), str(tmp_path / "merged"), "--merge", cwd=tmp_path))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n in merged.state_dict())


def test_unreachable_tracking_server_fails_before_training(tmp_path):
    proc = amrlhf("fit", "--config", recipe("dpo"), "--runs_root", str(tmp_path / "runs"),
                  "--tracking.uri=http://127.0.0.1:9", cwd=tmp_path)
    assert proc.returncode == 2
    assert "error: MLflow tracking server http://127.0.0.1:9 is unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "smoke-dpo" / "checkpoints").exists()


def test_expected_mistakes_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "y"}\n')
    proc = amrlhf("fit", "--config", recipe("dpo"), "--runs_root", str(tmp_path / "runs"),
                  f"--data.init_args.train={bad}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {bad}:1: field 'rejected' missing" in proc.stderr
    proc = amrlhf("prepare", "no-such-asset", cwd=tmp_path)
    assert proc.returncode == 2 and "error: unknown asset(s) no-such-asset" in proc.stderr
    proc = amrlhf("export", str(tmp_path / "missing.ckpt"), str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 2 and "error: checkpoint not found" in proc.stderr
    proc = amrlhf("study", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "error: study file not found" in proc.stderr


@pytest.mark.parametrize("edit,expected", [
    (("    model:\n      name:", "    policy:\n      name:"),
     ": model: amrlhf.modules.RewardModule: RewardModule takes no 'policy'; it takes: model, center_coef, lr,"),
    (("  class_path: amrlhf.modules.RewardModule", "  class_path: amrlhf.modules.RewardModul"),
     ": model: amrlhf.modules.RewardModul: module 'amrlhf.modules' has no attribute 'RewardModul'"),
    (("seed_everything: 0", "seed_everything: 0\nseeds: 1"), ": Subcommand 'fit' does not accept option 'seeds'"),
], ids=["renamed-key", "misspelt-class", "unknown-top-level-key"])
def test_a_recipe_the_parser_refuses_is_one_error_line_naming_file_and_field(tmp_path, edit, expected):
    """jsonargparse's refusal (a usage dump of every option, then a nested report) ends as one line naming the
    recipe, the key and what is wrong; for an option a class does not take, the options it takes."""
    text = Path(recipe("rm")).read_text()
    assert edit[0] in text
    bad = tmp_path / "old.yaml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    proc = amrlhf("fit", "--config", str(bad), "--runs_root", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "usage:" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [line for line in errors if line.startswith(f"error: {bad}{expected}")] and len(errors) == 1, \
        proc.stderr


def test_a_value_the_parser_refuses_names_the_key(tmp_path):
    proc = amrlhf("fit", "--config", recipe("rm"), "--runs_root", str(tmp_path / "runs"), "--trainer.max_steps=abc",
                  cwd=tmp_path)
    assert proc.returncode == 2 and "usage:" not in proc.stderr, proc.stderr
    assert f"error: {recipe('rm')} or the command line: trainer.max_steps: Expected a <class 'int'>" \
        in proc.stderr, proc.stderr


def test_a_refusal_names_the_command_line_only_where_it_set_the_key():
    from amrlhf.lightning_cli import refused_recipe

    misspelt = ("Parser key \"model\":\n  Does not validate against any of the Union subtypes\n  Errors:\n"
                "    - Problem with given class_path 'amrlhf.modules.RewardModul':\n"
                "        module 'amrlhf.modules' has no attribute 'RewardModul'\n    - Expected a <class 'NoneType'>\n"
                "  Given value type: <class 'dict'>")
    argv = ["fit", "--config", "r.yaml", "--model.init_args.lr=0.1"]  # a key below the refused one: not the cause
    assert refused_recipe(argv, misspelt) == ("r.yaml: model: amrlhf.modules.RewardModul: module 'amrlhf.modules' "
                                              "has no attribute 'RewardModul'")
    assert refused_recipe(["fit", "--config", "r.yaml", "--model", "x.yaml"], misspelt).startswith(
        "r.yaml or the command line: model: ")
    assert refused_recipe(argv, "Unrecognized arguments: --trainer.max_stepz 5") == \
        "the command line: Unrecognized arguments: --trainer.max_stepz 5"
    unknown = misspelt.replace("RewardModul'", "RewardModule'").replace(
        "module 'amrlhf.modules' has no attribute 'RewardModule'", "Option 'policy.name' is not accepted")
    assert refused_recipe(["fit", "-c", "r.yaml", "--model.init_args.policy.name=x"], unknown) == (
        "r.yaml or the command line: model: amrlhf.modules.RewardModule: RewardModule takes no 'policy'; it takes: "
        "model, center_coef, lr, weight_decay, warmup_steps, betas, optimizer_in_backward, fused_adamw")


@pytest.mark.parametrize("args", [["--trainer.strategy=fsdp"], ["--trainer.max_steps=-5"],
                                  ["--trainer.strategy=no_such_strategy"]],
                         ids=["fsdp-on-cpu", "negative-max-steps", "unknown-strategy"])
def test_a_strategy_lightning_refuses_is_one_error_line(tmp_path, args):
    proc = amrlhf("fit", "--config", recipe("dpo"), "--runs_root", str(tmp_path / "runs"), *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: trainer: ")], proc.stderr[-3000:]


def _damaged_home(tmp_path: Path, file: str, size: int | None) -> dict:
    """A copy of the prepared tiny assets with one file of tiny-llama cut to `size` bytes (None: half)."""
    import shutil

    from amrlhf.paths import home

    for kind, name in (("models", "tiny-llama"), ("data", "tiny-arith")):
        shutil.copytree(home() / kind / name, tmp_path / "home" / kind / name)
    target = tmp_path / "home" / "models" / "tiny-llama" / file
    os.truncate(target, target.stat().st_size // 2 if size is None else size)
    return {"AMRLHF_HOME": str(tmp_path / "home")}


def _truncated_checkpoint(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(4096)}}, path)
    os.truncate(path, path.stat().st_size // 2)
    return path


def _eval_suite(tmp_path: Path, limit) -> str:
    path = tmp_path / "suite.yaml"
    path.write_text(f"slots: [adversarial]\nlimit: {limit}\nbatch_size: 2\nmax_gen_toks: 4\nmax_length: 256\n")
    return str(path)


def _a_file(path: Path) -> Path:
    path.write_text("")  # a folder under a file can never be created, even by root (unlike a read-only one)
    return path


def _not_a_model(tmp_path: Path) -> str:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model\n")
    return str(tmp_path / "notes")


def _long_pairs(t: Path) -> Path:
    """Preference rows, the second longer than tiny-llama's 512 positions."""
    rows = [{"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "6"},
            {"prompt": "Count.", "chosen": " ".join(["one"] * 700), "rejected": "no"}]
    path = t / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FIT = ("fit", "--config", recipe("dpo"))
MISTAKES = {  # case -> tmp_path -> (command line, environment, what the error line must say)
    "negative-lr": lambda t: ([*FIT, "--model.init_args.lr=-1"], {}, ["lr", "-1"]),
    "batch-size-0": lambda t: ([*FIT, "--data.init_args.batch_size=0"], {}, ["batch_size", "0"]),
    "negative-logits-chunk": lambda t: ([*FIT, "--model.init_args.logits_chunk=-1"], {}, ["logits_chunk", "-1"]),
    "negative-delta": lambda t: (["fit", "--config", recipe("am_dpo"),
                                  "--model.init_args.segmenter.init_args.delta=-1"], {}, ["delta", "-1"]),
    "truncated-weights": lambda t: (FIT, _damaged_home(t, "model.safetensors", None),
                                    ["model.safetensors", "amrlhf prepare tiny-llama --force"]),
    "zero-byte-weights": lambda t: (FIT, _damaged_home(t, "model.safetensors", 0),
                                    ["model.safetensors", "amrlhf prepare tiny-llama --force"]),
    "truncated-tokenizer": lambda t: (FIT, _damaged_home(t, "tokenizer.json", None),
                                      ["tokenizer.json", "amrlhf prepare tiny-llama --force"]),
    "folder-not-a-model": lambda t: ([*FIT, f"--model.init_args.policy.name={_not_a_model(t)}"], {},
                                     [str(t / "notes"), "config.json"]),
    "file-tracking-uri": lambda t: ([*FIT, f"--tracking.uri=file:{t}/mlruns"], {}, [f"file:{t}/mlruns"]),
    "eval-limit-0": lambda t: (["eval", "--config", _eval_suite(t, 2), "--model", "local:tiny-llama", "--limit",
                                "0"], {}, ["limit", "0"]),
    "eval-limit-negative": lambda t: (["eval", "--config", _eval_suite(t, 2), "--model", "local:tiny-llama",
                                       "--limit=-3"], {}, ["limit", "-3"]),
    "eval-limit-string": lambda t: (["eval", "--config", _eval_suite(t, "abc"), "--model", "local:tiny-llama"], {},
                                    ["suite.yaml", "limit", "abc"]),
    "ckpt-path-missing": lambda t: ([*FIT, "--ckpt_path", str(t / "missing.ckpt")], {},
                                    ["checkpoint not found", "missing.ckpt"]),
    "resume-truncated-last": lambda t: (  # the run's own last.ckpt, cut in half
        _truncated_checkpoint(t / "runs" / "smoke-dpo" / "checkpoints" / "last.ckpt") and [*FIT, "--ckpt_path", "last"],
        {}, ["last.ckpt", "damaged"]),
    "validate-truncated": lambda t: (["validate", "--config", recipe("dpo"), "--ckpt_path",
                                      str(_truncated_checkpoint(t / "old.ckpt"))], {}, ["old.ckpt", "damaged"]),
    "runs-folder-unwritable": lambda t: ([*FIT, f"--runs_root={_a_file(t / 'a-file')}/runs"], {},
                                         ["runs folder", "a-file"]),
    "dpo-row-past-positions": lambda t: ([*FIT, "--data.init_args.max_length=4096",
                                         f"--data.init_args.train={_long_pairs(t)}", "--data.init_args.val=null"],
                                        {}, ["train row 2:", "max_length (4096)", "512 positions"]),
    "dpo-row-past-positions-after-skip": lambda t: ([*FIT, "--data.init_args.max_length=4096",
                                                     f"--data.init_args.train={_long_pairs(t)}",
                                                     "--data.init_args.skip_train=1", "--data.init_args.val=null"],
                                                    {}, ["train row 2:", "512 positions"]),  # the file's row
    "grpo-max-new-tokens-0": lambda t: (["fit", "--config", recipe("grpo"),
                                         "--model.init_args.sampling.max_new_tokens=0"], {}, ["max_new_tokens", "0"]),
    "grpo-temperature-0": lambda t: (["fit", "--config", recipe("grpo"), "--model.init_args.sampling.temperature=0"],
                                     {}, ["temperature must be > 0"]),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_expected_mistake_is_one_error_line(tmp_path, case):
    args, env, says = MISTAKES[case](tmp_path)
    if not any(a.startswith("--runs_root") for a in args):
        args = [*args, "--runs_root", str(tmp_path / "runs")]
    proc = amrlhf(*args, cwd=tmp_path, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    print(f"\n[{case}] {errors[0]}")  # TEMP
    for part in says:
        assert part in errors[0], errors[0]


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["sigterm", "sigint"])
def test_stop_signal_saves_last_ckpt_and_says_how_to_resume(tmp_path, sig, status):
    """SIGTERM (a scheduler's pre-emption, `kill`) or SIGINT mid-training: a resumable last.ckpt, one line
    with the command that resumes, exit status 128 + signal, the MLflow run KILLED (not FINISHED)."""
    runs, log = tmp_path / "runs", tmp_path / "fit.log"
    proc = start_amrlhf("fit", "--config", recipe("dpo"), "--runs_root", str(runs), "--trainer.max_steps=100000",
                        "--trainer.limit_val_batches=0", "--checkpoint_every=100000", "--tracking.log_checkpoint=false",
                        cwd=tmp_path, log=log)
    wait_for_metric(runs / "mlflow.db", "loss", proc, log)
    proc.send_signal(sig)
    assert proc.wait(timeout=300) == status, log.read_text()[-3000:]
    out = log.read_text()
    lines = [line for line in out.splitlines() if line.startswith("interrupted by")]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    last = runs / "smoke-dpo" / "checkpoints" / "last.ckpt"
    assert f"saved {last}" in lines[0] and lines[0].endswith("--ckpt_path last"), lines[0]
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert step >= 1
    df = runs_df(runs)
    assert len(df) == 1 and df.loc[0, "status"] == "KILLED"
    if sig != signal.SIGTERM:
        return
    command = shlex.split(lines[0].split("resume with: ")[1])
    assert command[:2] == ["amrlhf", "fit"]
    ok(amrlhf(*command[1:], f"--trainer.max_steps={step + 2}", cwd=tmp_path))
    df = runs_df(runs)
    assert len(df) == 1 and df.loc[0, "status"] == "FINISHED"  # the same MLflow run, now finished
    assert sorted(history(runs, df.loc[0, "run_id"], "loss")) == list(range(step + 2))  # went on from `step`


def test_a_stop_signal_is_recorded_while_training_and_stops_at_once_outside(tmp_path):
    """Before a training loop runs (loading, caching) a signal stops at once; while one runs, the handler only
    records it, for the next step boundary; a second one stops at once on one process, and changes nothing under
    several (each process of a terminal's job gets Ctrl-C; a scheduler may signal twice)."""
    from amrlhf.callbacks.interrupt import StopOnSignal
    from amrlhf.errors import Interrupted

    def deliver(sig):
        os.kill(os.getpid(), sig)
        time.sleep(0.2)  # the handler runs in the main thread, at the next bytecode

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when started in the background
    stop = StopOnSignal(tmp_path)
    with stop.handling_signals(), pytest.raises(Interrupted) as raised:
        deliver(signal.SIGTERM)
    assert raised.value.signum == signal.SIGTERM
    stop = StopOnSignal(tmp_path)
    stop.training = True
    with stop.handling_signals():
        deliver(signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(Interrupted) as raised:
            deliver(signal.SIGINT)
    assert raised.value.signum == signal.SIGINT
    stop = StopOnSignal(tmp_path)
    stop.training, stop.processes = True, 2
    with stop.handling_signals():
        for sig in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
            deliver(sig)
    assert stop.signum == signal.SIGINT and stop.saved is None
    assert signal.getsignal(signal.SIGINT) is before  # restored, whatever it was


def _alive_in_group(pgid: int) -> list[int]:
    """The processes of a process group that have not exited (zombies excluded)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["sigterm", "sigint"])
def test_stop_signal_to_a_ddp_process_group_saves_last_ckpt_and_exits(tmp_path, sig, status):
    """Ctrl-C in a terminal, or a job-wide SIGTERM, signals every process of a 2-process DDP run: all of them stop
    at the same step (no deadlock) after one fresh, loadable last.ckpt, within a bounded time."""
    runs, log = tmp_path / "runs", tmp_path / "fit.log"
    proc = start_amrlhf("fit", "--config", recipe("dpo"), "--runs_root", str(runs), "--trainer.devices=2",
                        "--trainer.strategy=ddp", "--trainer.max_steps=100000", "--trainer.limit_val_batches=0",
                        "--checkpoint_every=100000", "--tracking.log_checkpoint=false", cwd=tmp_path, log=log,
                        new_session=True)
    try:
        wait_for_metric(runs / "mlflow.db", "loss", proc, log)
        os.killpg(proc.pid, sig)
        try:
            returncode = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 120 s after {sig.name}:\n{log.read_text()[-3000:]}")
        deadline = time.monotonic() + 60
        while _alive_in_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive_in_group(proc.pid), log.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert returncode == status and "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("interrupted by")]
    last = runs / "smoke-dpo" / "checkpoints" / "last.ckpt"
    assert len(lines) == 1 and f"saved {last}" in lines[0], out[-3000:]  # one line, rank 0's
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] >= 1
    df = runs_df(runs)
    assert len(df) == 1 and df.loc[0, "status"] == "KILLED"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_mlflow_server_round_trip(tmp_path):
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--default-artifact-root",
         str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        import requests

        for _ in range(120):
            try:
                if requests.get(uri + "/health", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start within 60 s")
        ok(amrlhf("fit", "--config", recipe("sft"), "--runs_root", str(tmp_path / "runs"),
                  "--tracking.log_checkpoint=false", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}))
        df = runs_df(uri)
        assert len(df) == 1 and "metrics.sft/nll" in df.columns and df.loc[0, "status"] == "FINISHED"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_sft_rm_then_am_dpo_with_cached_reward_model_scores(tmp_path):
    """AM-DPO after its reward model on tiny assets: train a reward model, export it, then AM-DPO with its
    prefix scores (cached once per example) deciding the masks."""
    runs = tmp_path / "runs"
    ok(amrlhf("fit", "--config", recipe("rm"), "--runs_root", str(runs), "--tracking.log_checkpoint=true",
              cwd=tmp_path))
    ok(amrlhf("export", str(runs / "smoke-rm" / "final.ckpt"), str(tmp_path / "rm-hf"), cwd=tmp_path))
    scorer = json.dumps({"class_path": "amrlhf.scorers.CachedScorer", "init_args": {"source": {
        "class_path": "amrlhf.scorers.RewardModelScorer",
        "init_args": {"model": {"name": str(tmp_path / "rm-hf")}}}, "cache": str(tmp_path / "cache")}})
    proc = ok(amrlhf("fit", "--config", recipe("am_dpo"), "--runs_root", str(runs), f"--model.init_args.scorer={scorer}",
                     cwd=tmp_path))
    assert "token scores (train): computed 80 examples" in proc.stderr
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # train and val
    df = runs_df(runs)
    am = df[df["tags.mlflow.runName"] == "smoke-am_dpo"].iloc[0]
    assert 0.0 <= am["metrics.segments/kept_frac_rejected"] <= 1.0
    assert am["metrics.segments/score_std"] > 0


def test_scorer_with_a_different_tokenizer_is_refused_before_training(tmp_path):
    import shutil

    from amrlhf.assets import asset_dir
    from amrlhf.models import load_tokenizer

    other = tmp_path / "other-rm"
    shutil.copytree(asset_dir("tiny-llama"), other)
    tok = load_tokenizer(str(other))
    tok.add_tokens(["<only-in-the-scorer>"])
    tok.save_pretrained(other)
    proc = amrlhf("fit", "--config", recipe("am_dpo"), "--runs_root", str(tmp_path / "runs"),
                  f"--model.init_args.scorer.init_args.model.name={other}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "uses a different tokenizer than the policy" in proc.stderr
    assert not (tmp_path / "runs" / "smoke-am_dpo" / "checkpoints").exists()


def test_segments_command_renders_the_html_view(tmp_path):
    out = tmp_path / "view.html"
    proc = ok(amrlhf("segments", "--config", recipe("am_dpo"), "--limit", "3", "--out", str(out),
                     "--model.init_args.segmenter.init_args.delta=0.0", cwd=tmp_path))
    assert f"wrote {out}" in proc.stdout
    page = out.read_text()
    assert page.count("<b>#") == 3 and "delta=0.0" in page
    assert 'class="tok keep' in page and 'title="score ' in page
    assert page.count('pivot"') > 0  # with delta 0 a random scorer flips often


def test_a_study_cell_parses_without_lightnings_args_warning(monkeypatch, capsys):
    import warnings

    from amrlhf.train import run_lightning

    monkeypatch.setattr("sys.argv", ["amrlhf", "study", "recipes/study/surprisal.yaml"])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit):
            run_lightning(["fit", "--config", "recipes/smoke/dpo.yaml", "--print_config"])
    assert "class_path: amrlhf.modules.DPOModule" in capsys.readouterr().out
    assert not [w for w in seen if "args parameter is intended" in str(w.message)]
