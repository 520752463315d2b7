"""PPO / AM-PPO: it learns (small-vocabulary model, programmatic reward), the sample-wise
segmenter is bit-identical to the unmasked path, LoRA and a critic on its own backbone train,
rollouts keep masks right, recipes round-trip through MLflow, a crashed run resumes exactly,
and bad configuration is refused before training."""

import lightning as L
import mlflow
import pytest
import torch
from conftest import amrlhf, recipe
from ppo_fixtures import Curve
from test_cli import history, ok, runs_df

from amrlhf.data import PromptDataModule
from amrlhf.errors import AmrlhfError
from amrlhf.losses import FixedKL
from amrlhf.models import LoraSpec, ModelSpec
from amrlhf.modules import AdapterReference, PPOModule, ValueModel
from amrlhf.sampling import Sampling, sample_responses, seeded
from amrlhf.scorers import TargetTokenReward
from amrlhf.segmenters import AdaptivePivotSegmenter, SampleWiseSegmenter


def fit(module, letters, rollouts: int, batch_size: int = 16) -> list[dict[str, float]]:
    model, prompts = letters
    L.seed_everything(0, verbose=False)
    dm = PromptDataModule(train=str(prompts), tokenizer=str(model), max_length=8, batch_size=batch_size)
    curve = Curve()
    per = module.ppo_epochs * (batch_size // (module.mini_batch_size or batch_size))
    L.Trainer(accelerator="cpu", max_steps=rollouts * per, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
              callbacks=[curve]).fit(module, dm)
    return curve.rows


def letters_ppo(letters, **kw):
    args = dict(policy=ModelSpec(str(letters[0])), reward=TargetTokenReward("x"), sampling=Sampling(max_new_tokens=8),
                kl=FixedKL(0.01), ppo_epochs=4, mini_batch_size=8, lr=3e-3)
    return PPOModule(**{**args, **kw})


@pytest.mark.parametrize("segmenter", [None, "adaptive"])
def test_ppo_learns_to_say_the_target_letter(letters, segmenter):
    seg = AdaptivePivotSegmenter(delta=0.3, signal="increment") if segmenter else None
    rows = fit(letters_ppo(letters, segmenter=seg), letters, rollouts=20)
    curve = [r["objective/scores"] for r in rows]
    print("objective/scores per rollout:", [round(x, 3) for x in curve])
    start, end = sum(curve[:3]) / 3, sum(curve[-5:]) / 5
    assert start < 0.15  # ~1/29 of sampled tokens are 'x' at random init
    assert end > 0.4 and end > 4 * start
    if segmenter:
        kept = [r["segments/actor_token_frac"] for r in rows]
        print("AM-PPO actor token fraction per rollout:", [round(x, 3) for x in kept])
        assert min(kept) < 1.0  # the mask removed something from the actor loss


def test_sample_wise_segmenter_is_bit_identical_to_ppo(letters):
    a, b = letters_ppo(letters), letters_ppo(letters, segmenter=SampleWiseSegmenter())
    ra, rb = fit(a, letters, rollouts=3), fit(b, letters, rollouts=3)
    for key in ("loss/policy_avg", "loss/value_avg", "objective/scores"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def test_am_ppo_labels_come_from_the_raw_score_not_the_eos_penalised_one(letters):
    """l = sign(raw score - running mean) (docs/method.md): `missing_eos_penalty` shapes the reward, not the label."""
    from amrlhf.losses.reductions import last_response_index

    seen = {}

    class Reward(TargetTokenReward):
        def setup(self, ctx):
            super().setup(ctx)
            seen["eos"] = ctx.tokenizer.eos_token_id

        def score(self, batch, split):
            ts = super().score(batch, split)
            last = last_response_index(batch["response_mask"], empty=0)
            rows = torch.arange(last.shape[0])
            seen.setdefault("raw", ts.scores[rows, last].float())
            seen.setdefault("ended", batch["input_ids"][rows, last + 1] == seen["eos"])
            return ts

    class Segmenter(SampleWiseSegmenter):
        def segment(self, x):
            seen.setdefault("labels", x.labels.clone())
            return super().segment(x)

    module = letters_ppo(letters, reward=Reward("x"), segmenter=Segmenter(), missing_eos_penalty=10.0)
    fit(module, letters, rollouts=1)
    raw, ended = seen["raw"], seen["ended"]
    penalised = raw - 10.0 * (~ended).float()
    assert 0 < int(ended.sum()) < len(ended)  # both kinds in the rollout: the two rules disagree
    expected = torch.where(raw >= raw.mean(), 1, -1)  # the first rollout's baseline is its own mean
    assert not torch.equal(expected, torch.where(penalised >= penalised.mean(), 1, -1))
    assert torch.equal(seen["labels"], expected)


def test_lora_policy_with_adapter_reference_and_a_critic_on_its_own_backbone(letters):
    model = str(letters[0])
    module = letters_ppo(letters, policy=ModelSpec(model, lora=LoraSpec(r=4, alpha=8)), reference=AdapterReference(),
                         critic=ValueModel(ModelSpec(model)))
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    rows = fit(module, letters, rollouts=2)
    assert all(torch.isfinite(torch.tensor(r["loss/value_avg"])) for r in rows)
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_" in n for n in changed) and any(n.startswith("critic.model.") for n in changed)
    assert not any(n.startswith("policy.") and "lora_" not in n for n in changed)  # frozen base


def test_a_critic_on_its_own_backbone_runs_after_the_policy_loss_is_backpropagated(letters, monkeypatch):
    """The two backbones' activations never coexist: the critic's training forward starts once the policy's
    gradients exist; and the split backward trains exactly as one backward of the summed loss."""
    model = str(letters[0])

    def build():
        torch.manual_seed(0)
        return letters_ppo(letters, critic=ValueModel(ModelSpec(model)), ppo_epochs=1)

    split = build()
    seen = []
    values = ValueModel.values

    def spy(self, batch, hidden):
        if torch.is_grad_enabled():  # a training forward, not the rollout's old values
            seen.append(all(p.grad is not None for p in split.policy.parameters() if p.requires_grad))
        return values(self, batch, hidden)

    monkeypatch.setattr(ValueModel, "values", spy)
    fit(split, letters, rollouts=2)
    assert seen and all(seen)
    monkeypatch.setattr(ValueModel, "values", values)

    summed = build()
    parts = summed.minibatch_parts

    def one_backward(mb):  # both parts computed first, then their sum backpropagated once
        losses, stats = zip(*parts(mb), strict=True)
        yield sum(losses), {k: v for s in stats for k, v in s.items()}

    monkeypatch.setattr(summed, "minibatch_parts", one_backward)
    fit(summed, letters, rollouts=2)
    start = build()
    start.configure_model()
    a, b, before = dict(split.named_parameters()), dict(summed.named_parameters()), dict(start.named_parameters())
    assert a.keys() == b.keys() == before.keys()
    for name, p in a.items():
        torch.testing.assert_close(p, b[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a["critic.model.score.weight"], before["critic.model.score.weight"])  # both trained
    assert any(not torch.equal(p, before[n]) for n, p in a.items() if n.startswith("policy."))


def test_rollout_keeps_eos_flags_and_masks_right(letters):
    from amrlhf.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(letters[0]))
    model = load_causal_lm(ModelSpec(str(letters[0])))
    prompts = [tok("a b c")["input_ids"], tok("d")["input_ids"]]
    with seeded(3):
        batch, ended = sample_responses(model, prompts, Sampling(max_new_tokens=5), eos_id=tok.eos_token_id,
                                        pad_id=tok.pad_token_id)
    with seeded(3):
        again, _ = sample_responses(model, prompts, Sampling(max_new_tokens=5), eos_id=tok.eos_token_id,
                                    pad_id=tok.pad_token_id)
    assert torch.equal(batch["input_ids"], again["input_ids"])  # seeded sampling repeats exactly
    lengths = batch["response_mask"].sum(-1).long()
    for i, p in enumerate(prompts):
        n = int(lengths[i])
        assert 1 <= n <= 5
        assert batch["response_mask"][i, len(p) - 1:len(p) - 1 + n].all()  # contiguous, right after the prompt
        last = batch["input_ids"][i, len(p) + n - 1]
        assert bool(ended[i]) == (int(last) == tok.eos_token_id)
        assert int(batch["attention_mask"][i].sum()) == len(p) + n


def test_sampling_ignores_the_checkpoint_generation_config(tokenizer):
    """Only `Sampling` shapes the distribution: a checkpoint's repetition_penalty, no_repeat_ngram_size,
    min_new_tokens, top_k or suppress_tokens leave the samples as they were."""
    from amrlhf.models import load_causal_lm
    from amrlhf.sampling import generate

    model = load_causal_lm(ModelSpec("local:tiny-llama"))
    prompts = [tokenizer("Hello there")["input_ids"], tokenizer("a")["input_ids"]]

    def draw():
        with seeded(0):
            return generate(model, prompts, 4, Sampling(max_new_tokens=8), eos_id=tokenizer.eos_token_id,
                            pad_id=tokenizer.pad_token_id)

    plain = draw()
    config = model.generation_config
    config.repetition_penalty, config.no_repeat_ngram_size, config.min_new_tokens, config.top_k = 5.0, 1, 8, 3
    config.suppress_tokens = list(range(0, 300, 2))  # a field whose neutral value is None (unset)
    assert draw() == plain
    assert model.generation_config.repetition_penalty == 5.0  # the model's own config is left as it was


def test_prompt_rows_and_too_long_prompts_are_counted(tmp_path):
    import json

    path = tmp_path / "p.jsonl"
    chat = [{"role": "user", "content": "What is 1 plus 2?"}, {"role": "assistant", "content": "3."}]
    rows = [{"prompt": "What is 1 plus 2?"}, {"messages": chat}, {"chosen": chat, "rejected": chat},
            {"prompt": "What is 1 plus 2? " * 20}, {"completion": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    dm = PromptDataModule(train=str(path), tokenizer="local:tiny-llama", max_length=40, batch_size=1)
    dm.setup()
    assert len(dm.train_data) == 3 and dm.report["data/train/dropped_prompt_too_long"] == 1
    # the three forms give the same prompt: the turns before the assistant's reply
    assert dm.train_data[0].prompt_ids == dm.train_data[1].prompt_ids == dm.train_data[2].prompt_ids
    batch = dm.collator()([dm.train_data[0], dm.train_data[1]])
    assert batch["prompt_mask"].all()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(AmrlhfError, match=r"p\.jsonl.*5.*prompt"):
        PromptDataModule(train=str(path), tokenizer="local:tiny-llama", max_length=40, batch_size=1).setup()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppo", "am_ppo"])
def test_smoke_ppo_recipe_round_trips_through_mlflow(tmp_path, name):
    ok(amrlhf("fit", "--config", recipe(name), "--runs_root", str(tmp_path / "runs"), cwd=tmp_path))
    df = runs_df(tmp_path / "runs")
    assert len(df) == 1 and df.loc[0, "status"] == "FINISHED"
    keys = ["objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward",
            "objective/non_score_reward", "policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg",
            "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/ratio", "eval/objective/scores"]
    if name == "am_ppo":
        keys += ["segments/kept_frac_chosen", "segments/kept_frac_rejected", "segments/pivots_per_response",
                 "segments/mean_segment_len", "segments/fallback_frac", "segments/score_std"]
    for key in keys:
        assert f"metrics.{key}" in df.columns, key
    ckpt = torch.load(tmp_path / "runs" / f"smoke-{name}" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    # the trained policy and critic only: no frozen reference, no reward model
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"policy", "critic"}
    assert ckpt["amrlhf"]["ppo"]["rollouts_done"] == 4
    if name == "ppo":  # the policy exports like any other module's
        ok(amrlhf("export", str(tmp_path / "runs" / "smoke-ppo" / "final.ckpt"), str(tmp_path / "hf"), cwd=tmp_path))
        assert (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.slow
def test_ppo_resume_after_crash_is_exact(tmp_path):
    common = ["--config", recipe("am_ppo"), "--tracking.log_checkpoint=false"]
    ok(amrlhf("fit", *common, "--runs_root", str(tmp_path / "a"), cwd=tmp_path))
    crashed = amrlhf("fit", *common, "--runs_root", str(tmp_path / "b"),
                     "--trainer.callbacks+=amrlhf.callbacks.CrashAtStep", "--trainer.callbacks.step=8", cwd=tmp_path)
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    ok(amrlhf("fit", *common, "--runs_root", str(tmp_path / "b"), "--ckpt_path", "last", cwd=tmp_path))
    a, b = runs_df(tmp_path / "a"), runs_df(tmp_path / "b")
    assert len(b) == 1
    for key in ("objective/scores", "loss/policy_avg", "loss/value_avg", "objective/kl_coef",
                "rollout/label_baseline", "segments/actor_token_frac", "eval/objective/scores"):
        ha = history(tmp_path / "a", a.loc[0, "run_id"], key)
        hb = history(tmp_path / "b", b.loc[0, "run_id"], key)
        assert sorted(ha) == sorted(hb) and ha, key
        assert [hb[s] for s in sorted(hb)] == pytest.approx([ha[s] for s in sorted(ha)], rel=1e-6, abs=1e-7), key


@pytest.mark.slow
@pytest.mark.parametrize("override,message", [
    ("--model.init_args.reward.init_args.model.name={letters}", "different tokenizer"),
    ("--model.init_args.sampling.max_new_tokens=600", "exceeds the policy's maximum of 512"),
    ("--checkpoint_every=6", "checkpoint_every=6 counts optimizer steps"),
])
def test_bad_ppo_configuration_is_refused_before_training(tmp_path, letters, override, message):
    proc = amrlhf("fit", "--config", recipe("ppo"), "--runs_root", str(tmp_path / "runs"),
                  override.format(letters=letters[0]), cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "runs" / "smoke-ppo" / "checkpoints").exists() or not any(
        (tmp_path / "runs" / "smoke-ppo" / "checkpoints").iterdir())
    client = mlflow.MlflowClient(f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db")
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        assert "objective/scores" not in run.data.metrics  # not a single rollout trained


@pytest.mark.slow
def test_segments_view_explains_why_a_ppo_recipe_has_nothing_to_show(tmp_path):
    proc = amrlhf("segments", "--config", recipe("am_ppo"), "--out", str(tmp_path / "v.html"), cwd=tmp_path)
    assert proc.returncode == 2 and "PPO recipe's data are prompts" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "v.html").exists()


def test_a_metric_missing_at_a_step_is_not_repeated_from_an_earlier_step():
    """Lightning re-sends a step metric's last value at later steps that did not log it; PPO's
    per-label kept fractions (absent when no response has that label) go through log_sometimes."""
    from lightning.pytorch.loggers import Logger

    from amrlhf.modules.base import AlignmentModule

    class Recorder(Logger):
        name, version = "rec", 0
        experiment = None

        def __init__(self):
            super().__init__()
            self.rows: list[tuple[int, dict]] = []

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

        def log_hyperparams(self, *args, **kwargs):
            pass

    class Module(AlignmentModule):
        def configure_model(self):
            self.policy = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            loss = self.policy(batch[0]).sum()
            stats = {"always": loss.detach()}
            if batch_idx == 0:
                stats["once_via_log"] = torch.tensor(1.0)
                self.log_sometimes({"once_direct": torch.tensor(2.0)})
            self.log_stats(stats, "train", 1)
            return loss

    rec = Recorder()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(3, 1)), batch_size=1)
    L.Trainer(accelerator="cpu", max_steps=3, logger=rec, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, log_every_n_steps=1).fit(Module(ModelSpec("unused")), data)
    steps = {key: sorted(s for s, m in rec.rows if key in m) for key in ("always", "once_via_log", "once_direct")}
    assert steps["always"] == [0, 1, 2]
    assert steps["once_direct"] == [0]
    assert steps["once_via_log"] == [0, 1, 2]  # Lightning's repetition, which log_sometimes avoids


def _ppo_first_minibatch_token_grads(letters, monkeypatch, **kw):
    """The gradient of the first mini-batch's policy loss with respect to each token's log-prob, and the mask
    its mean ran over."""
    import amrlhf.modules.ppo as ppo

    seen = {}
    loss_fn = ppo.policy_loss

    def spy(logps, old, adv, mask, clip):
        out = loss_fn(logps, old, adv, mask, clip)
        if "grad" not in seen:
            seen["grad"] = torch.autograd.grad(out[0], logps, retain_graph=True)[0]
            seen["mask"] = mask.clone()
        return out

    monkeypatch.setattr(ppo, "policy_loss", spy)
    fit(letters_ppo(letters, ppo_epochs=1, mini_batch_size=16, **kw), letters, rollouts=1)
    return seen


def test_the_am_ppo_mask_removes_gradient_and_never_amplifies_it(letters, monkeypatch):
    from test_grpo import KeepEveryOther

    ones = _ppo_first_minibatch_token_grads(letters, monkeypatch, segmenter=SampleWiseSegmenter())
    half = _ppo_first_minibatch_token_grads(letters, monkeypatch, segmenter=KeepEveryOther())
    resp = ones["mask"].bool()
    keep = (resp.cumsum(-1) % 2 == 1) & resp
    assert bool(ones["grad"][keep].abs().gt(0).any())
    torch.testing.assert_close(half["grad"][keep], ones["grad"][keep], rtol=1e-5, atol=1e-9)
    assert bool((half["grad"][resp & ~keep] == 0).all())
    old = _ppo_first_minibatch_token_grads(letters, monkeypatch, segmenter=KeepEveryOther(), mask_normalization="kept")
    torch.testing.assert_close(old["grad"][keep], ones["grad"][keep] * resp.sum() / keep.sum(), rtol=1e-5, atol=1e-9)
