"""GRPO / RLOO / REINFORCE++ and their AM variants: they learn a programmatic reward on the letters model,
the sample-wise segmenter is bit-identical to the unmasked path, a single on-policy update skips the old
log-prob pass, recipes round-trip through MLflow, a run killed at a data-epoch boundary resumes exactly,
and bad configuration or a broken reward stops with an error line naming what is wrong."""

import dataclasses
import json
from contextlib import contextmanager

import lightning as L
import pytest
import torch
import yaml
from conftest import amrlhf, recipe
from ppo_fixtures import Curve
from test_cli import history, ok, runs_df

from amrlhf.data import PromptDataModule
from amrlhf.errors import ConfigError, DataError
from amrlhf.losses import FixedKL, LeaveOneOut, ReinforcePlusPlus, SequenceMean
from amrlhf.models import ModelSpec
from amrlhf.modules import DenseAdvantage, GRPOModule
from amrlhf.sampling import Sampling
from amrlhf.scorers import TargetTokenReward
from amrlhf.segmenters import AdaptivePivotSegmenter, SampleWiseSegmenter


def fit(module, letters, rollouts: int, prompts: int = 4) -> list[dict[str, float]]:
    model, path = letters
    L.seed_everything(0, verbose=False)
    dm = PromptDataModule(train=str(path), tokenizer=str(model), max_length=8, batch_size=prompts)
    curve = Curve()
    per = module.steps_per_rollout(module.rows_per_rollout(prompts))
    L.Trainer(accelerator="cpu", max_steps=rollouts * per, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
              callbacks=[curve]).fit(module, dm)
    return curve.rows


def letters_grpo(letters, **kw):
    args = dict(policy=ModelSpec(str(letters[0])), reward=TargetTokenReward("x"), num_generations=4,
                sampling=Sampling(max_new_tokens=8), epochs=2, mini_batch_size=8, lr=3e-3)
    return GRPOModule(**{**args, **kw})


VARIANTS = {
    "grpo": {},
    "am_grpo": {"segmenter": AdaptivePivotSegmenter(delta=0.3, signal="increment")},
    "rloo": {"advantage": LeaveOneOut(), "aggregation": SequenceMean()},
    "reinforce_pp": {"advantage": ReinforcePlusPlus()},
    "dense": {"dense": DenseAdvantage(TargetTokenReward("x"))},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_critic_free_family_learns_to_say_the_target_letter(letters, variant):
    rows = fit(letters_grpo(letters, **VARIANTS[variant]), letters, rollouts=20)
    curve = [r["reward"] for r in rows]
    print(variant, "reward per rollout:", [round(x, 3) for x in curve])
    start, end = sum(curve[:3]) / 3, sum(curve[-5:]) / 5
    assert start < 0.1  # ~1/29 of sampled tokens are 'x' at random init
    assert end > 0.5
    if variant == "am_grpo":
        kept = [r["segments/actor_token_frac"] for r in rows]
        print("AM-GRPO policy-loss token fraction per rollout:", [round(x, 3) for x in kept])
        assert min(kept) < 1.0  # the mask removed something from the policy loss


@pytest.mark.parametrize("variant", ["kl_in_reward", "adaptive_kl", "constant_normalizer", "dense_replace",
                                     "one_stream"])
def test_other_configurations_train_with_finite_losses(letters, variant):
    from amrlhf.losses import AdaptiveKL, ConstantNormalizer

    kw = {"kl_in_reward": dict(kl=FixedKL(0.05), kl_in="reward", kl_estimator="k1"),
          "adaptive_kl": dict(kl=AdaptiveKL(0.05, target=1e-4, horizon=100)),
          "constant_normalizer": dict(aggregation=ConstantNormalizer(), kl=FixedKL(0.05)),
          "dense_replace": dict(dense=DenseAdvantage(TargetTokenReward("x"), replace=True)),
          "one_stream": dict(group_seeds=False, kl=FixedKL(0.05))}[variant]
    module = letters_grpo(letters, **kw)
    rows = fit(module, letters, rollouts=3)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if variant != "dense_replace":
        assert all(r["kl"] >= 0 or variant == "kl_in_reward" for r in rows) and "kl" in rows[-1]
    if variant == "adaptive_kl":  # the first rollout's KL is 0 (beta x 0.968), the next two are above target
        assert module.kl_ctl.value == pytest.approx(0.05 * 0.968 * 1.032 * 1.032)


def test_am_labels_are_the_sign_of_the_estimators_advantage_even_with_a_dense_term(letters):
    seen = {}

    class Spy(SampleWiseSegmenter):
        def segment(self, x):
            seen.setdefault("labels", x.labels.clone())
            return super().segment(x)

    module = letters_grpo(letters, segmenter=Spy(), scorer=TargetTokenReward("x"),
                          dense=DenseAdvantage(TargetTokenReward("x"), replace=True))
    estimate = module.advantage.estimate

    def recording(scores, non_score, resp, g):
        adv = estimate(scores, non_score, resp, g)
        seen.setdefault("adv", (adv * resp, resp))
        return adv

    module.advantage.estimate = recording
    fit(module, letters, rollouts=1)
    adv, resp = seen["adv"]
    first = resp.argmax(-1)
    expected = torch.where(adv[torch.arange(len(first)), first] >= 0, 1, -1)
    assert torch.equal(seen["labels"], expected)


def test_a_group_depends_on_its_seed_and_prompt_only(letters):
    """Each prompt's group comes from its own stream, (seed, rollout, prompt index) in the module: the same
    prompt draws the same group whatever else is in the batch, and where."""
    from amrlhf.models import load_causal_lm, load_tokenizer
    from amrlhf.sampling import sample_groups

    tok = load_tokenizer(str(letters[0]))
    model = load_causal_lm(ModelSpec(str(letters[0])))
    a, b, c = (tok(t)["input_ids"] for t in ("a b c", "d", "e f g h i"))
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, n=4)

    def responses(batch):
        return [row[1:][m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["response_mask"], strict=True)]

    one = responses(sample_groups(model, [a, b], [11, 22], Sampling(max_new_tokens=6), **kw)[0])
    two = responses(sample_groups(model, [b, c], [22, 33], Sampling(max_new_tokens=6), **kw)[0])
    other = responses(sample_groups(model, [b], [23], Sampling(max_new_tokens=6), **kw)[0])
    assert one[4:] == two[:4]  # prompt b's group, second in one batch and first in the other
    assert other != two[:4]  # another seed, another group
    assert len(set(map(tuple, one[4:]))) > 1  # the group's samples differ from each other


@pytest.mark.parametrize("sampling", [Sampling(max_new_tokens=8), Sampling(max_new_tokens=8, temperature=0.7,
                                                                           top_k=12, top_p=0.9)],
                         ids=["plain", "warped"])
def test_batched_groups_are_the_per_prompt_groups(letters, sampling):
    """One batched generate (each group drawn from its own generator) gives the groups that one seeded
    generate per prompt gives, token for token, for prompts of different lengths (left padding), with the
    sampling warpers on, and whatever the other prompts of the batch are."""
    from amrlhf.models import load_causal_lm, load_tokenizer
    from amrlhf.sampling import sample_groups

    tok = load_tokenizer(str(letters[0]))
    model = load_causal_lm(ModelSpec(str(letters[0])))
    prompts = [tok(t)["input_ids"] for t in ("a b c", "d", "e f g h i", "j k", "l m n o")]
    seeds = [101, 7, 55, 3, 99]
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, n=4)

    def responses(batch):
        return [row[1:][m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["response_mask"], strict=True)]

    batched = responses(sample_groups(model, prompts, seeds, sampling, **kw)[0])
    one_by_one = responses(sample_groups(model, prompts, seeds, sampling, batched=False, **kw)[0])
    assert batched == one_by_one
    assert any(r[-1] == tok.eos_token_id for r in batched) and len({tuple(r) for r in batched}) > 10
    alone = responses(sample_groups(model, prompts[2:3], seeds[2:3], sampling, **kw)[0])
    assert alone == batched[8:12]
    two_per_call = dataclasses.replace(sampling, prompts_per_call=2)  # a smaller peak, the same groups
    assert responses(sample_groups(model, prompts, seeds, two_per_call, **kw)[0]) == batched


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("sampling", [Sampling(max_new_tokens=8), Sampling(max_new_tokens=8, temperature=0.7,
                                                                           top_k=12, top_p=0.9)],
                         ids=["plain", "warped"])
def test_decode_draws_the_tokens_transformers_generate_draws(letters, sampling, lora):
    """Our decode loop gives, from the same global RNG state, the tokens transformers' `generate` samples
    (left-padded prompts of different lengths, n rows each, pad after a row's EOS), with the sampling warpers
    on and under a peft wrapper; and it prefills each prompt once, where `generate` prefills all n rows."""
    from transformers import GenerationConfig

    from amrlhf.models import LoraSpec, load_causal_lm, load_tokenizer
    from amrlhf.sampling import TokenSampler, decode, left_pad, own_generation_config, seeded

    tok = load_tokenizer(str(letters[0]))
    model = load_causal_lm(ModelSpec(str(letters[0]), lora=LoraSpec(r=4) if lora else None)).eval()
    prompts = [tok(t)["input_ids"] for t in ("a b c", "d", "e f g h i")]
    ids, attn = left_pad(prompts, tok.pad_token_id)
    config = GenerationConfig(do_sample=True, num_return_sequences=4, max_new_tokens=8, min_new_tokens=0,
                              temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with seeded(3), own_generation_config(model):
        expected = model.generate(input_ids=ids, attention_mask=attn, generation_config=config)[:, ids.shape[1]:]
    rows = []
    base = model.get_base_model() if lora else model
    hook = base.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    with seeded(3):
        got = decode(model, ids, attn, 4, 8, TokenSampler(sampling, 4, torch.device("cpu")),
                     eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    hook.remove()
    assert torch.equal(got, expected)
    assert (got == tok.eos_token_id).any() and (got == tok.pad_token_id).any()  # rows ended early, then pad
    assert rows[0] == 3 and set(rows[1:]) == {12}  # the prefill: one row per prompt; each step: every row


def test_decode_without_padding_one_sample_and_cut_at_max_length(letters):
    """No padding (prompts of one length), one sample per prompt, and `max_length` leaving 3 tokens: still the
    tokens of transformers' `generate` from the same RNG state."""
    from transformers import GenerationConfig

    from amrlhf.models import load_causal_lm, load_tokenizer
    from amrlhf.sampling import generate, left_pad, own_generation_config, seeded

    tok = load_tokenizer(str(letters[0]))
    model = load_causal_lm(ModelSpec(str(letters[0]))).eval()
    prompts = [tok(t)["input_ids"] for t in ("a b c", "d e f", "g h i", "j k l")]
    assert len({len(p) for p in prompts}) == 1
    ids, attn = left_pad(prompts, tok.pad_token_id)
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    for n, max_length, new in ((1, None, 8), (2, ids.shape[1] + 3, 3)):
        config = GenerationConfig(do_sample=True, num_return_sequences=n, max_new_tokens=new, min_new_tokens=0,
                                  top_k=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        with seeded(5), own_generation_config(model):
            out = model.generate(input_ids=ids, attention_mask=attn, generation_config=config)[:, ids.shape[1]:]
        expected = [row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row for row in out.tolist()]
        with seeded(5):
            got = generate(model, prompts, n, Sampling(max_new_tokens=8), max_length=max_length, **kw)
        assert [s for group in got for s in group] == expected
        assert max(map(len, expected)) == new or n == 1


def test_sample_wise_segmenter_is_bit_identical_to_grpo(letters):
    kw = dict(kl=FixedKL(0.05), clip_high=0.28)
    a, b = letters_grpo(letters, **kw), letters_grpo(letters, segmenter=SampleWiseSegmenter(), **kw)
    ra, rb = fit(a, letters, rollouts=3), fit(b, letters, rollouts=3)
    for key in ("loss", "reward", "kl", "entropy", "clip_ratio/region_mean"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def test_one_on_policy_update_needs_no_old_logprob_pass_and_its_ratio_is_one(letters, monkeypatch):
    module = letters_grpo(letters, epochs=1, mini_batch_size=None)
    assert not module.needs_old_logps(16)
    assert letters_grpo(letters).needs_old_logps(16)  # two epochs
    assert letters_grpo(letters, epochs=1, mini_batch_size=None, kl=FixedKL(0.1), kl_in="reward").needs_old_logps(16)

    def refuse(roll):
        raise AssertionError("old log-probs computed for a single on-policy update")

    monkeypatch.setattr(module, "logps_in_eval", refuse)
    rows = fit(module, letters, rollouts=2)
    assert all(r["clip_ratio/region_mean"] == 0.0 for r in rows)


def test_gradients_are_freed_after_every_mini_batch_step(letters):
    """The last mini-batch's gradients are not kept through the next rollout's generation and forwards."""
    module = letters_grpo(letters)
    held = []

    class Tap(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            held.append(any(p.grad is not None for p in pl_module.parameters()))

    model, path = letters
    dm = PromptDataModule(train=str(path), tokenizer=str(model), max_length=8, batch_size=4)
    per = module.steps_per_rollout(module.rows_per_rollout(4))
    assert per > 1  # several optimizer steps per rollout
    L.Trainer(accelerator="cpu", max_steps=3 * per, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[Tap()]).fit(module, dm)
    assert held == [False, False, False]
    assert all(p.grad is None for p in module.parameters())


def test_a_prompts_responses_are_packed_in_the_policys_forward_passes(letters, monkeypatch):
    """share_prefix (the default): the old-log-prob pass and the training forward pack each prompt's rows
    (the letters model is a Llama: the lean path); false: never."""
    from amrlhf.models import forward

    for share in (True, False):
        calls = []
        real = forward.packing_for

        def spy(decoder, batch, calls=calls, real=real):
            out = real(decoder, batch)
            calls.append((torch.is_grad_enabled(), out is not None))
            return out

        monkeypatch.setattr(forward, "packing_for", spy)
        fit(letters_grpo(letters, share_prefix=share), letters, rollouts=2)
        monkeypatch.setattr(forward, "packing_for", real)
        if share:
            assert any(g and p for g, p in calls) and any(not g and p for g, p in calls)
        else:
            assert calls == []


def test_mask_truncated_leaves_cut_responses_out_of_the_loss(letters):
    module = letters_grpo(letters, sampling=Sampling(max_new_tokens=2), mask_truncated=True)
    seen = {}
    original = module.make_rollout

    def spy(batch):
        roll, stats = original(batch)
        seen.setdefault("roll", roll)
        return roll, stats

    module.make_rollout = spy
    fit(module, letters, rollouts=1)
    roll = seen["roll"]
    eos = 1  # the letters tokenizer's <eos>
    ended = (roll["input_ids"][:, 1:] == eos).logical_and(roll["response_mask"].bool()).any(-1)
    assert not bool(ended.all())  # two new tokens: some responses were cut before their EOS
    assert torch.equal(roll["loss_mask"].sum(-1) > 0, ended)
    assert torch.equal(roll["actor_mask"], roll["loss_mask"])


def test_per_example_caches_are_refused_for_rollouts(letters):
    from amrlhf.modules import CachedReference
    from amrlhf.scorers import DatasetScorer

    with pytest.raises(ConfigError, match="CachedReference holds values per dataset example"):
        letters_grpo(letters, reference=CachedReference())
    with pytest.raises(ConfigError, match="DatasetScorer holds values per dataset example"):
        letters_grpo(letters, segmenter=AdaptivePivotSegmenter(), scorer=DatasetScorer("local:tiny-llama"))
    with pytest.raises(ConfigError, match="DatasetScorer holds values per dataset example"):
        letters_grpo(letters, dense=DenseAdvantage(DatasetScorer("local:tiny-llama")))


def test_group_estimators_refuse_a_group_of_one(letters):
    with pytest.raises(ConfigError, match="needs at least 2"):
        letters_grpo(letters, num_generations=1)
    letters_grpo(letters, num_generations=1, advantage=ReinforcePlusPlus(baseline=False))  # no group needed


def test_prompt_template_builds_prompts_from_row_fields_and_names_a_missing_one(tmp_path, tokenizer):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "What is 2 plus 2?", "target": "4"}) + "\n"
                    + json.dumps({"text": "no question here"}) + "\n")
    dm = PromptDataModule(train=str(path), tokenizer="local:tiny-llama", prompt_template="Q: {question}",
                          limit_train=1)
    dm.setup()
    batch = dm.collator()(dm.train_data)
    assert batch["rows"][0]["prompt"] == "Q: What is 2 plus 2?" and batch["rows"][0]["fields"]["target"] == "4"
    assert batch["rows"][0]["line"] == 1
    with pytest.raises(DataError, match=r"q.jsonl:2: field .question. missing"):
        PromptDataModule(train=str(path), tokenizer="local:tiny-llama", prompt_template="Q: {question}").setup()


GRPO_KEYS = ["reward", "reward_std", "frac_reward_zero_std", "rewards/number_answer/mean", "rewards/number_answer/std",
             "rewards/format/mean", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
             "clip_ratio/region_mean", "completions/mean_length", "completions/min_length", "completions/max_length",
             "completions/clipped_ratio", "completions/mean_terminated_length", "loss", "eval/reward"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo", "am_grpo", "rloo"])
def test_smoke_grpo_recipes_round_trip_through_mlflow(tmp_path, name):
    ok(amrlhf("fit", "--config", recipe(name), "--runs_root", str(tmp_path / "runs"), cwd=tmp_path))
    df = runs_df(tmp_path / "runs")
    assert len(df) == 1 and df.loc[0, "status"] == "FINISHED"
    keys = GRPO_KEYS + (["segments/kept_frac_chosen", "segments/pivots_per_response", "segments/score_std"]
                        if name == "am_grpo" else [])
    for key in keys:
        assert f"metrics.{key}" in df.columns, key
    ckpt = torch.load(tmp_path / "runs" / f"smoke-{name}" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"policy"}  # no reference, no scorer
    assert ckpt["amrlhf"]["grpo"]["rollouts_done"] == 4


@pytest.mark.slow
def test_grpo_killed_at_a_data_epoch_boundary_resumes_exactly(tmp_path):
    """am_grpo: 2 rollouts per data epoch x 4 optimizer steps; the crash at step 8 is the end of epoch 0."""
    common = ["--config", recipe("am_grpo"), "--tracking.log_checkpoint=false"]
    ok(amrlhf("fit", *common, "--runs_root", str(tmp_path / "a"), cwd=tmp_path))
    crashed = amrlhf("fit", *common, "--runs_root", str(tmp_path / "b"),
                     "--trainer.callbacks+=amrlhf.callbacks.CrashAtStep", "--trainer.callbacks.step=8", cwd=tmp_path)
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    ok(amrlhf("fit", *common, "--runs_root", str(tmp_path / "b"), "--ckpt_path", "last", cwd=tmp_path))
    a, b = runs_df(tmp_path / "a"), runs_df(tmp_path / "b")
    assert len(b) == 1
    for key in ("reward", "loss", "kl", "entropy", "segments/actor_token_frac", "segments/score_std", "eval/reward"):
        ha = history(tmp_path / "a", a.loc[0, "run_id"], key)
        hb = history(tmp_path / "b", b.loc[0, "run_id"], key)
        assert sorted(ha) == sorted(hb) and ha, key
        assert [hb[s] for s in sorted(hb)] == pytest.approx([ha[s] for s in sorted(ha)], rel=1e-6, abs=1e-7), key


def _recipe_with(tmp_path, base: str, edit) -> str:
    cfg = yaml.safe_load(open(recipe(base)))
    edit(cfg["model"]["init_args"])
    path = tmp_path / f"{base}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("override,message", [
    ("--model.init_args.mini_batch_size=3", "mini_batch_size (3) must divide data.batch_size x num_generations (2 x 4"),
    ("--model.init_args.num_generations=1", "compares the responses to one prompt, so it needs at least 2"),
    ("--checkpoint_every=6", "checkpoint_every=6 counts optimizer steps, and each rollout makes 4"),
])
def test_bad_grpo_configuration_is_refused_before_training(tmp_path, override, message):
    proc = amrlhf("fit", "--config", recipe("grpo"), "--runs_root", str(tmp_path / "runs"), override, cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_a_mask_without_token_scores_is_refused(tmp_path):
    def edit(args):
        del args["scorer"]

    proc = amrlhf("fit", "--config", _recipe_with(tmp_path, "am_grpo", edit), "--runs_root", str(tmp_path / "runs"),
                  cwd=tmp_path)
    assert proc.returncode != 0
    assert "VerifiableReward gives one score per response, no token scores" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_reward_that_raises_stops_training_with_the_row_named(tmp_path):
    def edit(args):
        args["reward"]["init_args"]["components"].append(
            {"class_path": "amrlhf.rewards.FunctionReward", "init_args": {"function": "math.log", "name": "log"}})
        args["reward"]["init_args"]["weights"].append(1.0)

    proc = amrlhf("fit", "--config", _recipe_with(tmp_path, "grpo", edit), "--runs_root", str(tmp_path / "runs"),
                  cwd=tmp_path)
    assert proc.returncode != 0
    assert "reward 'log' failed on the prompt of" in proc.stderr and "sft_train.jsonl line " in proc.stderr
    assert "TypeError" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


class KeepEveryOther(SampleWiseSegmenter):
    """Keeps the 1st, 3rd, 5th ... response token of every response (a mask that keeps about half)."""

    def segment(self, x):
        seg = super().segment(x)
        resp = x.response_mask.bool()
        keep = (resp.cumsum(-1) % 2 == 1) & resp
        seg.mask = keep.to(seg.mask.dtype)
        return seg


def _first_minibatch_token_grads(letters, monkeypatch, **kw):
    """The gradient of the first mini-batch's loss with respect to each token's log-prob, and its loss mask."""
    import amrlhf.modules.grpo as grpo

    seen = {}
    surrogate = grpo.clipped_surrogate

    def spy(logps, old, adv, low, high):
        if "logps" not in seen:
            logps.retain_grad()
            seen["logps"] = logps
        return surrogate(logps, old, adv, low, high)

    monkeypatch.setattr(grpo, "clipped_surrogate", spy)
    module = letters_grpo(letters, epochs=1, mini_batch_size=16, **kw)
    original = module.minibatch_loss

    def loss_and_grad(mb):
        loss, stats = original(mb)
        if "grad" not in seen:
            loss.backward(retain_graph=True)
            seen["grad"], seen["mask"] = seen["logps"].grad.clone(), mb["response_mask"].clone()
            seen["adv"] = mb["advantages"].clone()
        return loss, stats

    module.minibatch_loss = loss_and_grad
    fit(module, letters, rollouts=1)
    return seen


@pytest.mark.parametrize("aggregation", ["TokenMean", "SequenceMean", "ConstantNormalizer"])
def test_the_am_mask_removes_gradient_and_never_amplifies_it(letters, monkeypatch, aggregation):
    """docs/rl.md: with a mask that keeps half the tokens, a kept token's gradient is the one it has under a mask
    of ones (ratio 1, every aggregation) and a masked token's is 0; `mask_normalization: kept` (the old rule)
    scales TokenMean's by responses' tokens / kept tokens."""
    import amrlhf.losses as losses

    agg = getattr(losses, aggregation)
    ones = _first_minibatch_token_grads(letters, monkeypatch, segmenter=SampleWiseSegmenter(),
                                        scorer=TargetTokenReward("x"), aggregation=agg())
    half = _first_minibatch_token_grads(letters, monkeypatch, segmenter=KeepEveryOther(),
                                        scorer=TargetTokenReward("x"), aggregation=agg())
    resp = ones["mask"].bool()
    keep = (resp.cumsum(-1) % 2 == 1) & resp
    assert torch.equal(ones["mask"], half["mask"]) and bool(ones["grad"][keep].abs().gt(0).any())
    torch.testing.assert_close(half["grad"][keep], ones["grad"][keep], rtol=1e-5, atol=1e-9)
    assert bool((half["grad"][resp & ~keep] == 0).all())
    if aggregation == "TokenMean":
        old = _first_minibatch_token_grads(letters, monkeypatch, segmenter=KeepEveryOther(),
                                           scorer=TargetTokenReward("x"), aggregation=agg(),
                                           mask_normalization="kept")
        ratio = resp.sum() / keep.sum()
        torch.testing.assert_close(old["grad"][keep], ones["grad"][keep] * ratio, rtol=1e-5, atol=1e-9)


def test_the_am_mask_keeps_the_dense_term_on_masked_tokens(letters, monkeypatch):
    """A_t = m_t A_seq + d_t: on a token the mask drops only the sequence part goes; the dense part stays."""
    dense = DenseAdvantage(TargetTokenReward("x"), signal="level")
    plain = _first_minibatch_token_grads(letters, monkeypatch, dense=dense)
    dense_only = _first_minibatch_token_grads(letters, monkeypatch, dense=DenseAdvantage(
        TargetTokenReward("x"), signal="level", replace=True))
    masked = _first_minibatch_token_grads(letters, monkeypatch, dense=dense, segmenter=KeepEveryOther(),
                                          scorer=TargetTokenReward("x"))
    resp = plain["mask"].bool()
    keep = (resp.cumsum(-1) % 2 == 1) & resp
    torch.testing.assert_close(masked["adv"][keep], plain["adv"][keep])
    torch.testing.assert_close(masked["adv"][resp & ~keep], dense_only["adv"][resp & ~keep])
    assert bool(dense_only["adv"][resp & ~keep].abs().gt(0).any())


def test_kept_normalization_with_a_dense_term_is_refused(letters):
    with pytest.raises(ConfigError, match="mask_normalization 'kept'"):
        letters_grpo(letters, dense=DenseAdvantage(TargetTokenReward("x")), mask_normalization="kept")


def test_dynamic_sampling_filter_and_overlong_shaping_reach_the_loss(letters, monkeypatch):
    """drop_zero_std_groups: a group whose (shaped) rewards are all equal leaves the loss mask; overlong:
    the length penalty changes the rewards the estimator sees (its spread), not the raw reward's mean."""
    from amrlhf.losses import SoftOverlongPunishment
    from amrlhf.losses.shaping import zero_std_groups

    seen = []
    module = letters_grpo(letters, drop_zero_std_groups=True, overlong=SoftOverlongPunishment(cache=4))
    make = module.make_rollout

    def spy(batch):
        roll, stats = make(batch)
        seen.append((roll, stats))
        return roll, stats

    module.make_rollout = spy
    fit(module, letters, rollouts=3)
    dropped = 0
    for roll, stats in seen:
        resp = roll["response_mask"]
        tied = zero_std_groups(roll["rewards"], 4)
        assert bool((roll["loss_mask"][tied] == 0).all())
        assert torch.equal(roll["loss_mask"][~tied], resp[~tied])
        dropped += int(tied.sum())
        assert stats["frac_reward_zero_std"].item() == pytest.approx(tied.float().mean().item())
    assert dropped > 0  # at random init most groups say no 'x' at all: tied at 0


def test_an_overlong_cache_longer_than_the_budget_is_refused_at_construction(letters):
    from amrlhf.losses import SoftOverlongPunishment

    with pytest.raises(ConfigError, match="longer than the sampling budget"):
        letters_grpo(letters, overlong=SoftOverlongPunishment(cache=9))


class HalfWeights(SampleWiseSegmenter):
    """Soft weights: 1.0 on odd response tokens (1st, 3rd, ...), 0.5 on the others."""

    def segment(self, x):
        seg = super().segment(x)
        resp = x.response_mask.bool()
        seg.mask = torch.where((resp.cumsum(-1) % 2 == 1) & resp, 1.0, 0.5) * resp.float()
        return seg


def test_soft_weights_scale_each_tokens_gradient_once_under_either_rule(letters, monkeypatch):
    ones = _first_minibatch_token_grads(letters, monkeypatch, segmenter=SampleWiseSegmenter(),
                                        scorer=TargetTokenReward("x"))
    soft = _first_minibatch_token_grads(letters, monkeypatch, segmenter=HalfWeights(), scorer=TargetTokenReward("x"))
    kept = _first_minibatch_token_grads(letters, monkeypatch, segmenter=HalfWeights(), scorer=TargetTokenReward("x"),
                                        mask_normalization="kept")
    resp = ones["mask"].bool()
    w = torch.where((resp.cumsum(-1) % 2 == 1) & resp, 1.0, 0.5) * resp.float()
    torch.testing.assert_close(soft["grad"][resp], (ones["grad"] * w)[resp], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(kept["grad"][resp], (ones["grad"] * w * resp.sum() / w.sum())[resp], rtol=1e-5,
                               atol=1e-9)


def test_freed_memory_is_given_back_after_generation_only_and_changes_nothing(letters, monkeypatch):
    """release_freed_memory runs once per rollout, after its generation, not after every optimizer step (there it
    cost time and lowered no peak: docs/performance.md); the generation runs inside heap_allocations (where
    MapLargeAllocations is on, the KV cache comes from the heap, trimmed after); the training is the same with it
    as without it (it only returns freed pages to the OS)."""
    import amrlhf.modules.onpolicy as onpolicy
    from amrlhf.memory import release_freed_memory

    assert release_freed_memory() in (True, False)  # glibc here; a no-op elsewhere
    calls = []
    monkeypatch.setattr(onpolicy, "release_freed_memory", lambda: calls.append("trim") or True)

    @contextmanager
    def heap_allocations():
        calls.append("heap")
        yield
        calls.append("mapped")

    monkeypatch.setattr(onpolicy, "heap_allocations", heap_allocations)
    a = letters_grpo(letters)
    rows_a = fit(a, letters, rollouts=2)
    # 2 rollouts x 1 generation, inside heap_allocations (MapLargeAllocations' threshold lifted), trimmed after;
    # none of the 2 x (2 epochs x 16 responses / mini-batch 8) optimizer steps
    assert calls == ["heap", "mapped", "trim"] * 2
    monkeypatch.setattr(onpolicy, "release_freed_memory", lambda: False)
    b = letters_grpo(letters)
    rows_b = fit(b, letters, rollouts=2)
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
