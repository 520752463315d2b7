"""Module-level guarantees: sample-wise parity (bit-identical) and gradient-accumulation equivalence."""

import lightning as L
import pytest
import torch

from amrlhf.data import Collator, PreferenceDataModule, encode_examples, read_examples
from amrlhf.models import ModelSpec
from amrlhf.modules import DPOModule, FrozenReference, SFTModule
from amrlhf.segmenters import SampleWiseSegmenter


def _batch(tokenizer, n=4):
    enc, _ = encode_examples(read_examples("local:tiny-arith/prefs_train", "preference", n), tokenizer, 64)
    return Collator(tokenizer.pad_token_id)(enc)


def _run(module_cls, segmenter, batch, steps=3, **kw):
    torch.manual_seed(0)
    m = module_cls(ModelSpec("local:tiny-llama"), segmenter=segmenter, lr=1e-2, **kw)
    m.configure_model()
    if hasattr(m, "reference"):
        m.reference.setup(m)
    opt = torch.optim.AdamW(m.policy.parameters(), lr=1e-2)
    losses, grads = [], None
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = m.model_step(batch, "train")
        loss.backward()
        if grads is None:
            grads = {n: p.grad.clone() for n, p in m.policy.named_parameters()}
        opt.step()
        losses.append(loss.detach())
    return losses, grads, {n: p.detach().clone() for n, p in m.policy.named_parameters()}


@pytest.mark.parametrize("module_cls", [DPOModule, SFTModule])
def test_sample_wise_is_bit_identical_to_unmasked(module_cls, tokenizer):
    batch = _batch(tokenizer)
    if module_cls is SFTModule:
        batch = {**batch, **{k: batch[k][:4] for k in ("input_ids", "attention_mask", "response_mask", "labels")}}
    kw = {"reference": FrozenReference()} if module_cls is DPOModule else {}
    l1, g1, p1 = _run(module_cls, None, batch, **kw)
    kw = {"reference": FrozenReference()} if module_cls is DPOModule else {}
    l2, g2, p2 = _run(module_cls, SampleWiseSegmenter(), batch, **kw)
    assert all(torch.equal(a, b) for a, b in zip(l1, l2, strict=True))
    assert all(torch.equal(g1[n], g2[n]) for n in g1)
    assert all(torch.equal(p1[n], p2[n]) for n in p1)
    assert not torch.equal(l1[0], l1[-1])  # the steps really changed the model


class _GradTap(L.Callback):
    """Records the accumulated gradients just before each optimizer step."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.policy.named_parameters()})


def _fit_grads(batch_size, accumulate, steps=2):
    L.seed_everything(0)
    dm = PreferenceDataModule("local:tiny-arith/prefs_train", tokenizer="local:tiny-llama", max_length=64,
                              batch_size=batch_size, shuffle=False)
    module = DPOModule(ModelSpec("local:tiny-llama"), reference=FrozenReference(), segmenter=SampleWiseSegmenter(),
                       lr=1e-3)
    tap = _GradTap()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[tap])
    trainer.fit(module, datamodule=dm)
    return tap.grads


def test_gradient_accumulation_matches_one_large_batch():
    """Batch 4 x accumulation 1 == batch 2 x accumulation 2: the gradient of every optimizer step
    agrees to float32 tolerance (summation order differs): element-wise rtol 1e-4 / atol 1e-6 and
    relative norm error < 1e-4 per tensor. A loss not divided by the accumulation count would be
    off by a factor of 2."""
    big, small = _fit_grads(4, 1), _fit_grads(2, 2)
    assert len(big) == len(small) == 2
    for step_big, step_small in zip(big, small, strict=True):
        for name, g in step_big.items():
            torch.testing.assert_close(step_small[name], g, rtol=1e-4, atol=1e-6)
            assert (step_small[name] - g).norm() <= 1e-4 * g.norm() + 1e-9
    assert any(g.abs().max() > 1e-4 for g in big[1].values())  # the gradients are not trivially zero


class _GradsAtBatchStart(L.Callback):
    """Records, at the start of each training batch, whether the policy still holds gradients."""

    def __init__(self):
        self.held = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.held.append(any(p.grad is not None for p in pl_module.policy.parameters()))


def test_gradients_are_freed_after_each_optimizer_step_and_kept_while_accumulating():
    """Lightning zeroes gradients inside the next step's closure, after its forward pass, which would keep
    a float32 copy of the weights alive through that forward (docs/performance.md). They are freed at the
    optimizer step instead; between the batches of an accumulation window they are kept (the accumulation
    test above checks the values)."""
    L.seed_everything(0)
    dm = PreferenceDataModule("local:tiny-arith/prefs_train", tokenizer="local:tiny-llama", max_length=64,
                              batch_size=2, shuffle=False)
    module = DPOModule(ModelSpec("local:tiny-llama"), reference=FrozenReference(), segmenter=SampleWiseSegmenter(),
                       lr=1e-3)
    tap = _GradsAtBatchStart()
    L.Trainer(accelerator="cpu", max_steps=3, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[tap]).fit(module, datamodule=dm)
    assert tap.held == [False, True, False, True, False, True]


def test_response_logps_equals_full_forward_on_response_tokens(tokenizer):
    from forward_oracle import response_logps

    from amrlhf.losses import token_logprobs
    from amrlhf.models import load_causal_lm

    batch = _batch(tokenizer)
    model = load_causal_lm(ModelSpec("local:tiny-llama")).eval()
    with torch.no_grad():
        full = token_logprobs(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["input_ids"])
        lean, logits = response_logps(model, batch, with_logits=True)
    resp = batch["response_mask"].bool()
    torch.testing.assert_close(lean[resp], full[resp], rtol=1e-5, atol=1e-5)
    assert logits.shape[1] < batch["input_ids"].shape[1]  # prompt-side logits were never computed


def test_dpo_logits_metrics_are_trl_s_token_weighted_means(tokenizer):
    """`logits/chosen|rejected` = the mean logit over every response token of the batch's chosen (rejected)
    side and the vocabulary (TRL's definition), as logged: not a mean of per-row means."""
    batch = _batch(tokenizer)
    m = DPOModule(ModelSpec("local:tiny-llama"), reference=FrozenReference())
    m.configure_model()
    m.reference.setup(m)
    m.policy.eval()
    with torch.no_grad():
        _, stats = m.model_step(batch, "train")
        full = m.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    resp, B = batch["response_mask"].bool(), batch["index"].shape[0]
    lengths = resp.sum(-1)
    assert len(set(lengths[:B].tolist())) > 1 and len(set(lengths[B:].tolist())) > 1  # the definitions differ
    for key, rows in (("logits/chosen", slice(0, B)), ("logits/rejected", slice(B, None))):
        expected = full[rows][resp[rows]].mean()
        logged = stats[key].float().mean()  # what log_stats sends
        torch.testing.assert_close(logged, expected, rtol=1e-5, atol=1e-5)


def test_sft_with_every_example_dropped_is_a_zero_loss_that_still_has_a_graph(tokenizer):
    from amrlhf.scorers import TokenScores
    from amrlhf.segmenters import AdaptivePivotSegmenter, ConstantBaseline

    class Negative:  # every token scores below the band: nothing agrees with label +1
        def setup(self, ctx):
            pass

        def score(self, batch, split):
            return TokenScores(-torch.ones_like(batch["response_mask"]))

    batch = _batch(tokenizer)
    batch = {**batch, **{k: batch[k][:4] for k in ("input_ids", "attention_mask", "response_mask", "labels")}}
    m = SFTModule(ModelSpec("local:tiny-llama"), segmenter=AdaptivePivotSegmenter(
        delta=0.3, baseline=ConstantBaseline(0.0), fallback="drop"), scorer=Negative())
    m.configure_model()
    loss, stats = m.model_step(batch, "train")
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in m.policy.parameters())
    assert stats["segments/fallback_frac"].item() == 1.0


def test_best_of_n_with_every_prompt_below_min_score_is_a_zero_loss_that_keeps_the_graph():
    """Not None (Lightning raises under DDP): a zero loss through the policy, zero gradients everywhere,
    and the batch counted as skipped."""
    from amrlhf.data import SFTDataModule
    from amrlhf.modules import BestOfN
    from amrlhf.sampling import Sampling
    from amrlhf.scorers import TokenScores

    class Flat:  # every sample scores 0, below min_score
        def setup(self, ctx):
            pass

        def score(self, batch, split):
            return TokenScores(torch.zeros_like(batch["response_mask"]))

    class Tap(L.Callback):
        def __init__(self):
            self.outputs, self.grads, self.skipped = [], [], []

        def on_after_backward(self, trainer, pl_module):
            self.grads.append([p.grad for p in pl_module.policy.parameters() if p.requires_grad])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.outputs.append(outputs)
            self.skipped.append(trainer.callback_metrics.get("arj/skipped_batch"))

    L.seed_everything(0, verbose=False)
    module = SFTModule(ModelSpec("local:tiny-llama"), scorer=Flat(),
                       rollout=BestOfN(n=2, sampling=Sampling(max_new_tokens=4), min_score=1.0))
    dm = SFTDataModule(train="local:tiny-arith/sft_train", tokenizer="local:tiny-llama", max_length=64,
                       batch_size=2)
    tap = Tap()
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, log_every_n_steps=1, limit_val_batches=0,
              callbacks=[tap]).fit(module, dm)
    assert len(tap.outputs) == 2
    assert all("loss" in o and o["loss"].item() == 0.0 for o in tap.outputs), tap.outputs
    assert len(tap.grads) == 2 and all(g is not None and not g.any() for step in tap.grads for g in step)
    assert [None if v is None else float(v) for v in tap.skipped] == [1.0, 1.0]


def test_reward_centring_term_is_trl_s_mean_of_squared_pair_sums():
    """coef * mean((r_w + r_l)^2), not coef * mean(r^2): scores worked out by hand through model_step."""
    import math
    from types import SimpleNamespace

    from amrlhf.modules.reward import RewardModule

    class Scores(torch.nn.Module):  # the head's output at every position: a fixed value per row
        def forward(self, input_ids, attention_mask):
            rows = torch.tensor([1.0, 3.0, 0.0, -1.0])[:, None, None]  # chosen 1, 3; rejected 0, -1
            return SimpleNamespace(logits=rows.expand(4, input_ids.shape[1], 1))

    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3),
             "response_mask": torch.tensor([[0.0, 1.0]] * 4), "index": torch.arange(2)}
    m = RewardModule(model=ModelSpec("local:tiny-llama"), center_coef=0.5)  # the recipe's name: model
    m.policy = Scores()
    assert m.reward_model is m.policy
    loss, _ = m.model_step(batch)
    bt = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-4.0))) / 2  # -log sigmoid(margin), margins 1, 4
    centring = 0.5 * ((1.0 + 0.0) ** 2 + (3.0 - 1.0) ** 2) / 2  # 0.5 * mean(1, 4) = 1.25 (mean(r^2): 1.375)
    assert loss.item() == pytest.approx(bt + centring, rel=1e-6)


def test_cached_reference_equals_the_frozen_model_and_is_reused(tmp_path):
    from amrlhf.models import load_causal_lm
    from amrlhf.models.forward import lean_forward
    from amrlhf.modules import CachedReference

    def fit():
        dm = PreferenceDataModule("local:tiny-arith/prefs_train", val="local:tiny-arith/prefs_heldout",
                                  tokenizer="local:tiny-llama", max_length=64, batch_size=4, limit_train=16)
        module = DPOModule(ModelSpec("local:tiny-llama"), reference=CachedReference(cache=str(tmp_path)),
                           segmenter=SampleWiseSegmenter(), lr=1e-3)
        L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0).fit(module, dm)
        return module, dm

    module, dm = fit()
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) == 2  # train and val, per token
    batch = next(iter(dm.train_dataloader()))
    base = load_causal_lm(ModelSpec("local:tiny-llama")).eval()
    with torch.no_grad():
        expected = lean_forward(base, batch).logps
    resp = batch["response_mask"].bool()
    torch.testing.assert_close(module.reference.logps(module, batch, "train")[resp], expected[resp])
    mtimes = [f.stat().st_mtime_ns for f in files]
    fit()
    assert [f.stat().st_mtime_ns for f in sorted(tmp_path.glob("*.pt"))] == mtimes  # a cache hit: nothing rewritten


def test_default_reference_loads_the_policy_as_the_policy_is_loaded(monkeypatch):
    """The default FrozenReference is the policy's model with the policy's revision, dtype and extra loading
    arguments, without LoRA (it must compute what the initial policy computes)."""
    from amrlhf.models import LoraSpec
    from amrlhf.modules import reference as reference_module

    loaded = []
    monkeypatch.setattr(reference_module, "load_causal_lm",
                        lambda spec, trainable=True: loaded.append(spec) or torch.nn.Linear(1, 1))
    policy = ModelSpec("local:tiny-llama", dtype="float32", revision="v2", extra={"attn_implementation": "eager"},
                       lora=LoraSpec(r=4), gradient_checkpointing=True)
    module = DPOModule(policy, reference=FrozenReference())
    module.reference.setup(module)
    (spec,) = loaded
    assert (spec.name, spec.dtype, spec.revision, spec.extra) == (policy.name, "float32", "v2", policy.extra)
    assert spec.lora is None and not spec.gradient_checkpointing


def test_reference_and_score_cache_keys_see_revision_and_dtype(monkeypatch):
    import amrlhf.modules.reference as reference
    from amrlhf.modules import CachedReference
    from amrlhf.scorers import CachedScorer, RewardModelScorer, ScoringContext

    monkeypatch.setattr(reference, "run_data", lambda module: "the run's data")  # a module outside a fit

    def cache_meta(cached, arg) -> dict:
        metas = []
        monkeypatch.setattr(cached.cache, "fill", lambda data, meta, *args, **kwargs: metas.append(meta))
        cached.setup(arg)
        return metas[0]

    def reference_meta(**policy):
        cached = CachedReference()
        return cache_meta(cached, DPOModule(ModelSpec("local:tiny-llama", **policy), reference=cached))

    def scorer_meta(**scorer):
        cached = CachedScorer(RewardModelScorer(ModelSpec("local:tiny-llama", **scorer)))
        return cache_meta(cached, ScoringContext(tokenizer=None, run_data=lambda: "the run's data"))

    for meta in (reference_meta, scorer_meta):
        assert meta() == meta()
        assert meta() != meta(revision="v2")
        assert meta() != meta(dtype="bfloat16")
        assert meta(revision="v2") != meta(revision="v3")


def test_a_score_cache_key_is_the_same_before_and_after_its_scorer_is_set_up(monkeypatch, tokenizer):
    """Set-up gives a scorer run-time state (its logits chunk, its models), kept in private attributes: not
    part of the score cache's key, or a scorer set up once (e.g. for held-out scoring) would miss its cache."""
    from amrlhf.scorers import CachedScorer, ScoringContext, SurprisalScorer

    metas = []
    cached = CachedScorer(SurprisalScorer(ModelSpec("local:tiny-llama"), tolerance=1.0))
    monkeypatch.setattr(cached.cache, "fill", lambda data, meta, *args, **kwargs: metas.append(meta))
    ctx = ScoringContext(tokenizer=tokenizer, logits_chunk=7, run_data=lambda: None)
    cached.setup(ctx)
    cached.source.setup(ctx)
    assert cached.source._logits_chunk == 7 and cached.source._models
    cached.setup(ctx)
    assert metas[0] == metas[1] and metas[0]["params"] == {"tolerance": 1.0, "max_entropy": 1.5}


def test_frozen_models_default_to_the_policy_dtype_on_cuda(monkeypatch):
    """`dtype: auto` on CUDA: frozen models (a reference, scorers) load in float32 like the trained policy,
    not in bf16 (at step 0 the reference must compute what the policy computes); bf16 only when asked."""
    from amrlhf.models import load_causal_lm, load_reward_model

    def dtypes(model) -> set:
        return {p.dtype for p in model.parameters()}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    auto = ModelSpec("local:tiny-llama")
    assert dtypes(load_causal_lm(auto)) == {torch.float32}
    assert dtypes(load_causal_lm(auto, trainable=False)) == {torch.float32}
    assert dtypes(load_reward_model(auto, trainable=False)) == {torch.float32}
    reference = FrozenReference()
    reference.setup(DPOModule(auto, reference=reference))
    assert dtypes(reference._model[0]) == {torch.float32}
    bf16 = ModelSpec("local:tiny-llama", dtype="bfloat16")
    assert dtypes(load_causal_lm(bf16, trainable=False)) == {torch.bfloat16}  # the explicit opt-in


def test_cached_reference_is_computed_under_the_trainer_precision(tmp_path):
    """Under bf16-mixed the policy's step runs in autocast: the cached reference log-probs are computed in the
    same autocast (so at step 0 they are the policy's own), and a cache made at another precision is not reused."""
    from amrlhf.models import load_causal_lm
    from amrlhf.models.forward import lean_forward
    from amrlhf.modules import CachedReference

    def fit(precision: str):
        dm = PreferenceDataModule("local:tiny-arith/prefs_train", tokenizer="local:tiny-llama", max_length=64,
                                  batch_size=4, limit_train=8)
        module = DPOModule(ModelSpec("local:tiny-llama"), reference=CachedReference(cache=str(tmp_path)),
                           segmenter=SampleWiseSegmenter(), lr=1e-3)
        L.Trainer(accelerator="cpu", precision=precision, max_steps=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False).fit(module, dm)
        return module, dm

    module, dm = fit("bf16-mixed")
    batch = next(iter(dm.train_dataloader()))
    base = load_causal_lm(ModelSpec("local:tiny-llama")).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = lean_forward(base, batch).logps.float()
    resp = batch["response_mask"].bool()
    torch.testing.assert_close(module.reference.logps(module, batch, "train")[resp], expected[resp])
    fit("32-true")
    assert len(list(tmp_path.glob("*.pt"))) == 2  # one cache per precision

def test_dropout_is_off_in_trained_policies(tmp_path, tokenizer):
    """A checkpoint whose config has dropout 0.1 (attention, and LoRA dropout 0.1): train-mode and eval-mode
    log-probs are equal, as PPO's ratio (old log-probs in eval mode) and DPO's eval-mode reference assume;
    `disable_dropout: false` keeps the checkpoint's dropout (and then they differ)."""
    import json
    import shutil

    from forward_oracle import response_logps

    from amrlhf.models import LoraSpec, load_causal_lm
    from amrlhf.paths import home

    folder = tmp_path / "dropout-llama"
    shutil.copytree(home() / "models" / "tiny-llama", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    batch = _batch(tokenizer)

    def train_eval_gap(spec: ModelSpec) -> float:
        model = load_causal_lm(spec)
        assert model.training
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # trained adapters (fresh ones output 0, dropout or not)
                p.data.normal_(0, 0.5)
        with torch.no_grad():
            train = response_logps(model, batch)[0]
            eval_ = response_logps(model.eval(), batch)[0]
        return (train - eval_).abs().max().item()

    assert train_eval_gap(ModelSpec(str(folder))) == 0.0
    assert train_eval_gap(ModelSpec(str(folder), lora=LoraSpec(r=4, dropout=0.1))) == 0.0
    assert train_eval_gap(ModelSpec(str(folder), disable_dropout=False)) > 1e-3
    assert train_eval_gap(ModelSpec("local:tiny-llama", lora=LoraSpec(r=4, dropout=0.1), disable_dropout=False)) > 1e-3


def test_soft_weights_of_all_ones_are_plain_dpo_bit_for_bit(tokenizer):
    from amrlhf.scorers import TargetTokenReward
    from amrlhf.segmenters import RankWeightSegmenter

    batch = _batch(tokenizer)
    scorer = TargetTokenReward("1")  # token scores that vary along a response: each digit 1's running share
    scorer.token_id = tokenizer("1", add_special_tokens=False)["input_ids"][-1]
    l1, g1, p1 = _run(DPOModule, None, batch, reference=FrozenReference())
    l2, g2, p2 = _run(DPOModule, RankWeightSegmenter(lo=1.0, hi=1.0), batch, reference=FrozenReference(),
                      scorer=scorer, score_calibration_batches=0)
    assert all(torch.equal(a, b) for a, b in zip(l1, l2, strict=True))
    assert all(torch.equal(g1[n], g2[n]) for n in g1)
    assert all(torch.equal(p1[n], p2[n]) for n in p1)
    l3, _, _ = _run(DPOModule, RankWeightSegmenter(), batch, reference=FrozenReference(),
                    scorer=scorer, score_calibration_batches=0)
    assert not torch.equal(l1[-1], l3[-1])  # weights in [0.7, 1.3] change the update


def test_token_reward_model_reads_each_response_token_at_its_own_position_by_hand():
    """s_t is the head's output at token y_t's own position (out[:, 1:], aligned with the labels): a 2-token
    response whose 2nd token is flawed, head outputs 2 and -1 there, gives (softplus(-2) + softplus(-1)) / 2."""
    import math
    from types import SimpleNamespace

    from amrlhf.errors import AmrlhfError
    from amrlhf.modules import TokenRewardModule

    class Head(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=torch.tensor([[[9.0], [7.0], [2.0], [-1.0]]]))  # positions 0..3

    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4),
             "response_mask": torch.tensor([[0.0, 1.0, 1.0]]), "token_flawed": torch.tensor([[0.0, 0.0, 1.0]]),
             "index": torch.arange(1)}
    m = TokenRewardModule(model=ModelSpec("local:tiny-llama"))
    m.policy = Head()
    loss, stats = m.model_step(batch)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    assert loss.item() == pytest.approx((sp(-2.0) + sp(-1.0)) / 2, rel=1e-6)
    assert stats["rm/token_accuracy"].item() == 1.0 and stats["rm/flaw_recall"].item() == 1.0
    with pytest.raises(AmrlhfError, match="span_labels"):
        m.model_step({k: v for k, v in batch.items() if k != "token_flawed"})
