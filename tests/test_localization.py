import torch

from amrlhf.assets import diff_spans
from amrlhf.data import encode_examples
from amrlhf.data.records import Example
from amrlhf.evaluation.localization import Localization, diff_token_mask, flagged_wrong


def test_diff_spans_mark_substitutions_and_deletions():
    assert diff_spans("a scramble for two", "a bid for two") == [[2, 5]]
    wrong = "made up radio income"
    (span,) = diff_spans("made up half of radio income", wrong)
    assert wrong[span[0]:span[1]] == "radio"  # a deletion marks the word after the gap


def test_diff_token_mask_flags_tokens_overlapping_the_span(tokenizer):
    ex = Example("x.jsonl", 1, "What is 3 plus 4?", "3 plus 4 is 7.", "3 plus 4 is 8.")
    (enc,), _ = encode_examples([ex], tokenizer, 64)
    truth = diff_token_mask(tokenizer, ex, diff_spans(ex.chosen, ex.rejected), enc.responses[1])
    pieces = [tokenizer.decode([t]) for t in enc.responses[1]]
    flagged = "".join(p for p, t in zip(pieces, truth, strict=True) if t)
    assert "8" in flagged and "plus" not in flagged and "<|im_end|>" not in flagged


def test_localization_counts_hand_values():
    loc = Localization(tokens=3)
    loc.add(torch.tensor([[True, False, True]]), torch.tensor([[True, True, False]]), torch.tensor([False]))
    r = loc.row()
    assert (r["precision"], r["recall"], r["f1"]) == (0.5, 0.5, 0.5)
    assert r["flagged_frac"] == 2 / 3 and r["fallback_frac"] == 0.0
    assert flagged_wrong(torch.tensor([[0, -1, 1]]), torch.tensor([[0.0, 1.0, 1.0]])).tolist() == [[False, True, False]]
