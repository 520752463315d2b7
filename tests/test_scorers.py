"""Token scorers: alignment of prefix scores, implicit reward, dataset scores, caching, and
refusal of a scorer whose tokenizer differs from the policy's."""

import json
from types import SimpleNamespace

import pytest
import torch

from amrlhf.data import Collator, encode_examples, read_examples
from amrlhf.errors import AmrlhfError, DataError
from amrlhf.models import ModelSpec, load_reward_model, load_tokenizer
from amrlhf.modules import prefix_scores
from amrlhf.scorers import DatasetScorer, ImplicitRewardScorer, ScoringContext, check_same_tokenizer


def _batch(tokenizer, n=2):
    enc, _ = encode_examples(read_examples("local:tiny-arith/prefs_train", "preference", n), tokenizer, 64)
    return enc, Collator(tokenizer.pad_token_id)(enc)


def test_prefix_scores_are_the_head_read_after_each_token(tokenizer):
    torch.manual_seed(0)
    rm = load_reward_model(ModelSpec("local:tiny-llama")).eval()
    enc, batch = _batch(tokenizer)
    with torch.no_grad():
        scores, prompt, seq = prefix_scores(rm, batch)
        item = enc[0]
        ids = item.prompt_ids + item.responses[0]
        for t in range(len(item.prompt_ids) - 1, len(ids) - 1):
            alone = rm(input_ids=torch.tensor([ids[: t + 2]])).logits[0, -1, 0]
            torch.testing.assert_close(scores[0, t], alone, rtol=1e-4, atol=1e-5)  # s after reading token t+1
        s0 = rm(input_ids=torch.tensor([item.prompt_ids])).logits[0, -1, 0]
        torch.testing.assert_close(prompt[0], s0, rtol=1e-4, atol=1e-5)
        last = rm(input_ids=torch.tensor([ids])).logits[0, -1, 0]
        torch.testing.assert_close(seq[0], last, rtol=1e-4, atol=1e-5)


def test_implicit_reward_is_beta_times_cumulative_log_ratio(tokenizer):
    _, batch = _batch(tokenizer)
    scorer = ImplicitRewardScorer(ModelSpec("local:tiny-llama"), ModelSpec("local:tiny-llama"), beta=0.5)
    scorer.setup(ScoringContext(tokenizer=tokenizer))
    with torch.no_grad():
        for p in scorer._models["policy"].parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = scorer.score(batch, "train")
    from forward_oracle import response_logps

    d = response_logps(scorer._models["policy"], batch)[0] - response_logps(scorer._models["ref"], batch)[0]
    resp = batch["response_mask"]
    row, cols = 0, resp[0].nonzero().squeeze(1).tolist()
    running = 0.0
    for t in cols:
        running += d[row, t].item()
        assert out.scores[row, t].item() == pytest.approx(0.5 * running, rel=1e-4, abs=1e-6)
    assert (out.scores[~resp.bool()] == 0).all() and (out.prompt_scores == 0).all()


def test_every_frozen_model_of_a_scorer_is_checked_against_the_policy_tokenizer(tmp_path, tokenizer):
    """FrozenModelScorer.add checks each model it loads: a RewardModelScorer's entropy model and an
    ImplicitRewardScorer's reference too (before, only the first model was checked and a mismatched second
    one gave token values misaligned with the policy's tokens)."""
    from amrlhf.scorers import RewardModelScorer

    other = load_tokenizer("local:tiny-llama")
    other.add_tokens(["<extra-token>"])
    other.save_pretrained(tmp_path / "other")
    mismatched = ModelSpec("local:tiny-llama", tokenizer=str(tmp_path / "other"))
    ctx = ScoringContext(tokenizer=tokenizer)
    for scorer in (RewardModelScorer(ModelSpec("local:tiny-llama"), entropy_from=mismatched),
                   ImplicitRewardScorer(ModelSpec("local:tiny-llama"), mismatched)):
        with pytest.raises(AmrlhfError, match="different tokenizer than the policy"):
            scorer.setup(ctx)
    fine = ImplicitRewardScorer(ModelSpec("local:tiny-llama"), ModelSpec("local:tiny-llama"))
    fine.setup(ScoringContext(tokenizer=tokenizer, logits_chunk=7))
    assert sorted(fine._models) == ["policy", "ref"] and fine._logits_chunk == 7


def test_a_scorer_with_another_tokenizer_is_refused(tmp_path, tokenizer):
    other = load_tokenizer("local:tiny-llama")
    other.add_tokens(["<extra-token>"])
    with pytest.raises(AmrlhfError, match="different tokenizer than the policy"):
        check_same_tokenizer("other", other, tokenizer)
    check_same_tokenizer("same", load_tokenizer("local:tiny-llama"), tokenizer)  # no error


def test_dataset_token_scores_align_and_length_mismatch_is_an_error(tmp_path, tokenizer):
    row = {"prompt": "What is 1 plus 2?", "chosen": "1 plus 2 is 3.", "rejected": "1 plus 2 is 4."}
    ids_c = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                           {"role": "assistant", "content": row["chosen"]}], tokenize=False)
    n_c = len(encode_examples([read_examples_row(tmp_path, row)], tokenizer, 64)[0][0].responses[0])
    assert ids_c  # a chat template is in use
    good = {**row, "chosen_token_scores": list(range(n_c)), "rejected_token_scores": [0.5] * n_c,
            "prompt_score": -1.0}
    path = tmp_path / "scores.jsonl"
    path.write_text(json.dumps(good) + "\n")
    enc, _ = encode_examples(read_examples(str(path), "preference", token_scores=True), tokenizer, 64)
    batch = Collator(tokenizer.pad_token_id)(enc)
    resp = batch["response_mask"].bool()
    assert batch["token_scores"][0][resp[0]].tolist() == [float(i) for i in range(n_c)]
    assert batch["prompt_scores"].tolist() == [-1.0, -1.0]
    out = DatasetScorer(tokenizer="local:tiny-llama").score(batch, "train")
    assert torch.equal(out.scores, batch["token_scores"])
    bad = {**good, "rejected_token_scores": [0.5] * (n_c + 2)}
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r":1: field 'rejected_token_scores' has .* scores for .* response tokens"):
        encode_examples(read_examples(str(path), "preference", token_scores=True), tokenizer, 64)
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="chosen_token_scores"):
        read_examples(str(path), "preference", token_scores=True)


def read_examples_row(tmp_path, row):
    p = tmp_path / "one.jsonl"
    p.write_text(json.dumps(row) + "\n")
    return read_examples(str(p), "preference")[0]


def test_a_lora_reward_model_trains_its_scalar_head():
    from amrlhf.models import LoraSpec

    rm = load_reward_model(ModelSpec("local:tiny-llama", lora=LoraSpec(r=4)))
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)


def test_confident_surprise_and_worst_so_far_by_hand():
    from amrlhf.scorers.surprisal import confident_surprise, worst_so_far

    logps = torch.tensor([[-0.1, -3.0, -6.0, -5.0, -0.5]])
    entropy = torch.tensor([[0.5, 0.4, 2.5, 1.0, 0.3]])
    resp = torch.tensor([[0, 1, 1, 1, 1]])
    # c = log p + H on response tokens: [0, -2.6, -3.5, -4.0, -0.2]; with max_entropy 1.5 the third is not counted
    c_all = confident_surprise(logps, entropy, resp, None)
    torch.testing.assert_close(c_all, torch.tensor([[0.0, -2.6, -3.5, -4.0, -0.2]]))
    c_conf = confident_surprise(logps, entropy, resp, 1.5)
    torch.testing.assert_close(c_conf, torch.tensor([[0.0, -2.6, 0.0, -4.0, -0.2]]))
    # s_t = 2 + min(0, worst so far); 0 outside the response
    torch.testing.assert_close(worst_so_far(c_all, resp, 2.0), torch.tensor([[0.0, -0.6, -1.5, -2.0, -2.0]]))
    torch.testing.assert_close(worst_so_far(c_conf, resp, 2.0), torch.tensor([[0.0, -0.6, -0.6, -2.0, -2.0]]))
    # a token more likely than expected does not lift the score above the tolerance
    up = worst_so_far(torch.tensor([[0.0, 1.0, 0.5, -1.0]]), torch.tensor([[0, 1, 1, 1]]), 2.0)
    torch.testing.assert_close(up, torch.tensor([[0.0, 2.0, 2.0, 1.0]]))


def test_surprisal_scorer_reads_the_frozen_model_and_the_figure_preset_flags_from_the_surprise(tokenizer):
    from amrlhf.models.forward import lean_forward
    from amrlhf.scorers import SurprisalScorer
    from amrlhf.segmenters import AdaptivePivotSegmenter, ConstantBaseline, SegmentInputs

    _, batch = _batch(tokenizer)
    scorer = SurprisalScorer(ModelSpec("local:tiny-llama"), tolerance=1.0, max_entropy=None)
    scorer.setup(ScoringContext(tokenizer=tokenizer))
    out = scorer.score(batch, "train")
    f = lean_forward(scorer._models["lm"], batch, entropy=True)
    resp = batch["response_mask"]
    row, cols = 0, resp[0].nonzero().squeeze(1).tolist()
    worst = 0.0
    for t in cols:  # worked out token by token
        worst = min(worst, f.logps[row, t].item() + f.entropy[row, t].item())
        assert out.scores[row, t].item() == pytest.approx(1.0 + worst, abs=1e-5)
    assert (out.scores[~resp.bool()] == 0).all() and (out.prompt_scores == 1.0).all()
    seg = AdaptivePivotSegmenter(delta=0.3, baseline=ConstantBaseline(0.0))
    labels = torch.tensor([-1] * resp.shape[0])
    sigma = seg.segment(SegmentInputs(response_mask=resp, labels=labels, input_ids=batch["input_ids"], **out.as_kwargs())).sigma
    s = out.scores[row, cols]
    first_bad = int((s < -0.3).nonzero()[0]) if (s < -0.3).any() else len(cols)
    flagged = (sigma[row, cols] == -1).tolist()
    above = [t for t in range(first_bad) if s[t] > 0.3]
    assert above, "the tiny model should start with a score above the band"
    assert not any(flagged[above[0]:first_bad])  # kept from the first score above the band to the first surprise
    assert all(flagged[first_bad:])  # from the first surprise beyond tolerance + delta on, every token is flagged


def test_surprisal_scorer_refuses_a_negative_tolerance():
    from amrlhf.errors import ConfigError
    from amrlhf.scorers import SurprisalScorer

    with pytest.raises(ConfigError, match="tolerance must be >= 0"):
        SurprisalScorer(ModelSpec("local:tiny-llama"), tolerance=-1.0)
    with pytest.raises(ConfigError, match="max_entropy must be > 0"):
        SurprisalScorer(ModelSpec("local:tiny-llama"), max_entropy=0.0)


def test_contrastive_scores_by_hand(monkeypatch):
    """Two response tokens after a one-token prompt. The positive model gives them log-probs -0.1 and -2.0,
    the negative one -1.0 and -0.5: d = (0.9, -1.5), so the level form is (0.9, -1.5) and the running form
    (0.9, -0.6); the prompt position scores 0. The second token is the critical one (the negative model
    predicts it better)."""

    import amrlhf.scorers.models as models
    from amrlhf.errors import ConfigError
    from amrlhf.scorers import ContrastiveScorer

    logps = {"pos": torch.tensor([[0.0, -0.1, -2.0]]), "neg": torch.tensor([[0.0, -1.0, -0.5]])}
    monkeypatch.setattr(models, "lean_forward", lambda model, batch, chunk_size=None: SimpleNamespace(
        logps=logps[model]))
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "response_mask": torch.tensor([[0.0, 1.0, 1.0]])}
    for form, expected in (("level", [0.0, 0.9, -1.5]), ("running", [0.0, 0.9, -0.6])):
        scorer = ContrastiveScorer(ModelSpec("a"), ModelSpec("b"), form=form, scale=2.0)
        scorer._models = {"pos": "pos", "neg": "neg"}
        out = scorer.score(batch, "train")
        assert torch.allclose(out.scores, 2.0 * torch.tensor([expected])) and out.prompt_scores.tolist() == [0.0]
    with pytest.raises(ConfigError, match="form must be level or running"):
        ContrastiveScorer(ModelSpec("a"), ModelSpec("b"), form="sum")
