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
from amrlhf.scorers import DatasetScorer, ImplicitRewardScorer, check_same_tokenizer


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
    module = SimpleNamespace(device=torch.device("cpu"), _trainer=None, policy_spec=ModelSpec("local:tiny-llama"))
    scorer.setup(module)
    with torch.no_grad():
        for p in scorer._models["policy"].parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = scorer.score(module, batch, "train")
    from amrlhf.models.forward import response_logps

    d = response_logps(scorer._models["policy"], batch)[0] - response_logps(scorer._models["ref"], batch)[0]
    resp = batch["response_mask"]
    row, cols = 0, resp[0].nonzero().squeeze(1).tolist()
    running = 0.0
    for t in cols:
        running += d[row, t].item()
        assert out.scores[row, t].item() == pytest.approx(0.5 * running, rel=1e-4, abs=1e-6)
    assert (out.scores[~resp.bool()] == 0).all() and (out.prompt_scores == 0).all()


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
    out = DatasetScorer(tokenizer="local:tiny-llama").score(None, batch, "train")
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
