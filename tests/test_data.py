"""Data: validation errors name file, line and field; masks align with input_ids[:, 1:]."""

import json
import logging

import pytest
import torch

from amrlhf.data import Collator, encode_examples, read_examples
from amrlhf.errors import AmrlhfError, DataError


def write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))
    return str(p)


GOOD = {"prompt": "What is 1 plus 2?", "chosen": "1 plus 2 is 3.", "rejected": "1 plus 2 is 4."}


def test_missing_field_names_file_line_field(tmp_path):
    path = write(tmp_path, [GOOD, {"prompt": "x", "chosen": "y"}])
    with pytest.raises(DataError) as err:
        read_examples(path, "preference")
    assert (err.value.line, err.value.field) == (2, "rejected")
    assert f"{path}:2" in str(err.value) and "'rejected'" in str(err.value)


def test_empty_response_is_an_error(tmp_path):
    path = write(tmp_path, [{**GOOD, "chosen": "   "}])
    with pytest.raises(DataError, match=r":1: field 'chosen' empty response"):
        read_examples(path, "preference")


def test_non_utf8_line_is_an_error_with_its_line(tmp_path):
    path = write(tmp_path, [GOOD, b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'])
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid UTF-8"):
        read_examples(path, "preference")


def test_invalid_json_is_an_error(tmp_path):
    path = write(tmp_path, [b"{not json}\n"])
    with pytest.raises(DataError, match=r":1: not valid JSON"):
        read_examples(path, "preference")


def test_unknown_asset_id_and_missing_file(tmp_path):
    with pytest.raises(AmrlhfError, match="unknown asset id 'local:nope/train'"):
        read_examples("local:nope/train", "preference")
    with pytest.raises(AmrlhfError, match="data file not found"):
        read_examples(str(tmp_path / "absent.jsonl"), "preference")


def test_chat_messages_response_is_last_assistant_turn(tmp_path, tokenizer):
    conv = [{"role": "user", "content": "What is 1 plus 2?"}]
    row = {"chosen": conv + [{"role": "assistant", "content": "3."}],
           "rejected": conv + [{"role": "assistant", "content": "4."}]}
    (ex,) = read_examples(write(tmp_path, [row]), "preference")
    assert ex.prompt == conv and (ex.chosen, ex.rejected) == ("3.", "4.")
    bad = {"chosen": conv + [{"role": "user", "content": "3."}], "rejected": row["rejected"]}
    with pytest.raises(DataError, match="last message must be the assistant"):
        read_examples(write(tmp_path, [bad], "bad.jsonl"), "preference")


def test_prompt_longer_than_max_length_is_dropped_and_counted(tmp_path, tokenizer):
    long = {**GOOD, "prompt": "What is 1 plus 2? " * 40}
    exs = read_examples(write(tmp_path, [GOOD, long, GOOD]), "preference")
    enc, rep = encode_examples(exs, tokenizer, max_length=48)
    assert (rep.rows, rep.kept, rep.dropped_prompt_too_long) == (3, 2, 1)
    assert "1 dropped" in rep.describe("train", 48)


def test_long_response_is_truncated_and_counted(tmp_path, tokenizer):
    exs = read_examples(write(tmp_path, [{**GOOD, "chosen": "3 " * 80}]), "preference")
    enc, rep = encode_examples(exs, tokenizer, max_length=40)
    assert rep.truncated == 1 and rep.kept == 1
    assert len(enc[0].prompt_ids) + len(enc[0].responses[0]) == 40


def test_response_mask_aligned_with_shifted_input_ids(tmp_path, tokenizer):
    exs = read_examples(write(tmp_path, [GOOD, {**GOOD, "rejected": "1 plus 2 is 45678."}]), "preference")
    enc, _ = encode_examples(exs, tokenizer, max_length=64)
    batch = Collator(tokenizer.pad_token_id)(enc)
    assert batch["labels"].tolist() == [1, 1, -1, -1]
    for row, (k, item) in enumerate([(0, enc[0]), (0, enc[1]), (1, enc[0]), (1, enc[1])]):
        resp = item.responses[k]
        targets = batch["input_ids"][row, 1:][batch["response_mask"][row].bool()]
        assert targets.tolist() == resp  # the masked positions predict exactly the response tokens
    # the response ends with the end-of-turn token, which counts as a response token
    assert enc[0].responses[0][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # padding is never a response token, even though pad tokens are appended
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]
    pad_rows = batch["attention_mask"][:, 1:] == 0
    assert not batch["response_mask"][pad_rows].any()


def test_pad_equal_to_eos_does_not_break_masks(tmp_path, tokenizer):
    exs = read_examples(write(tmp_path, [GOOD, {**GOOD, "chosen": "3."}]), "preference")
    enc, _ = encode_examples(exs, tokenizer, max_length=64)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    a = Collator(tokenizer.pad_token_id)(enc)
    b = Collator(eos)(enc)  # pad id == eos id
    assert torch.equal(a["response_mask"], b["response_mask"])


def test_resumed_sampler_skips_only_within_the_epoch_it_was_saved_in():
    from amrlhf.data.sampler import ResumableSampler

    def epoch_order(epoch):
        s = ResumableSampler(8, seed=0, shuffle=True)
        s.set_epoch(epoch)
        return list(s)

    s = ResumableSampler(8, seed=0, shuffle=True)
    s.resume(0, 4)  # saved mid-epoch 0: the rest of epoch 0, then epoch 1 whole
    assert list(s) == epoch_order(0)[4:]
    s.set_epoch(1)
    assert list(s) == epoch_order(1)
    s = ResumableSampler(8, seed=0, shuffle=True)
    s.resume(0, 8)  # saved at epoch 0's last batch: Lightning goes on with epoch 1, nothing skipped
    s.set_epoch(1)
    assert list(s) == epoch_order(1)


def test_seeds_do_not_share_data_orders_across_epochs():
    """Seed s's epoch 1 must not replay seed s+1's epoch 0 (the old `seed + epoch` rule did), epoch 0 keeps
    the order it always had (the generator seeded with the seed itself), and resume stays exact."""
    import torch

    from amrlhf.data.sampler import ResumableSampler

    def order(seed, epoch):
        s = ResumableSampler(64, seed=seed, shuffle=True)
        s.set_epoch(epoch)
        return list(s)

    assert order(3, 0) == torch.randperm(64, generator=torch.Generator().manual_seed(3)).tolist()
    orders = {(s, e): tuple(order(s, e)) for s in range(6) for e in range(4)}
    assert len(set(orders.values())) == len(orders)  # 24 (seed, epoch) pairs, 24 different permutations
    s = ResumableSampler(64, seed=3, shuffle=True)
    s.resume(1, 10)
    assert list(s) == order(3, 1)[10:]


def test_sft_rows_can_train_on_one_side_of_preference_rows(tokenizer):
    """completion_field: the chosen or the rejected answer of a preference row is the SFT response (the two
    models of a ContrastiveScorer); a missing field names the file, line and field."""
    from amrlhf.data import SFTDataModule

    pairs = read_examples("local:tiny-arith/prefs_train", "preference", 3)
    for side, pick in (("chosen", lambda e: e.chosen), ("rejected", lambda e: e.rejected)):
        got = read_examples("local:tiny-arith/prefs_train", "sft", 3, completion_field=side)
        assert [(g.prompt, g.chosen) for g in got] == [(p.prompt, pick(p)) for p in pairs]
    dm = SFTDataModule("local:tiny-arith/prefs_train", tokenizer="local:tiny-llama", limit_train=3,
                       completion_field="rejected")
    dm.setup()
    assert len(dm.train_data) == 3
    with pytest.raises(DataError, match="nope"):
        read_examples("local:tiny-arith/prefs_train", "sft", 1, completion_field="nope")
    with pytest.raises(AmrlhfError, match="completion_field applies to SFT rows only"):
        read_examples("local:tiny-arith/prefs_train", "preference", 1, completion_field="chosen")


def test_span_labels_mark_the_tokens_a_flawed_span_overlaps_by_hand():
    """1 where a token's characters overlap a span; the end-of-turn tokens after the text only when a span runs
    to the text's end."""
    from amrlhf.data.tokenize import span_token_labels

    offsets = [(0, 4), (4, 7), (7, 9), (9, 9), (9, 9)]  # 'abcd' 'efg' 'hi', then two end-of-turn tokens
    assert span_token_labels(offsets, [(5, 6)], 9) == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert span_token_labels(offsets, [(5, 9)], 9) == [0.0, 1.0, 1.0, 1.0, 1.0]  # to the end: the tail too
    assert span_token_labels(offsets, [(3, 5), (8, 9)], 9) == [1.0, 1.0, 1.0, 1.0, 1.0]
    assert span_token_labels(offsets, [], 9) == [0.0] * 5


def test_span_labels_travel_into_the_batch_aligned_with_the_response(tmp_path, tokenizer):
    """The wrong number of a rejected answer becomes `token_flawed` = 1 at exactly its tokens (in the aligned
    [N, T-1] layout), the chosen side (no field named) all 0; bad spans name file, line and field."""
    from amrlhf.data import PreferenceDataModule

    row = {**GOOD, "rejected_spans": [[12, 13]]}  # "1 plus 2 is 4.": the '4'
    path = write(tmp_path, [row])
    dm = PreferenceDataModule(path, tokenizer="local:tiny-llama", span_labels={"rejected": "rejected_spans"})
    dm.setup()
    batch = dm.collator()(dm.train_data)
    flawed, resp = batch["token_flawed"], batch["response_mask"]
    assert flawed[0].sum() == 0 and (flawed[1] <= resp[1]).all() and flawed[1].sum() >= 1
    ids = batch["input_ids"][1, 1:][flawed[1].bool()].tolist()
    assert tokenizer.decode(ids).strip() == "4"
    for bad, msg in (([[12, 99]], "not inside"), ("12-13", "list of \\[start, end\\]"), ([[3, 3]], "not inside")):
        p = write(tmp_path, [row, {**GOOD, "rejected_spans": bad}], name="bad.jsonl")
        with pytest.raises(DataError, match=msg) as err:
            read_examples(p, "preference", span_fields={"rejected": "rejected_spans"})
        assert (err.value.line, err.value.field) == (2, "rejected_spans")
    with pytest.raises(DataError, match="expected a list") as err:  # a row without the field is not skipped
        read_examples(write(tmp_path, [row, GOOD], name="missing.jsonl"), "preference",
                      span_fields={"rejected": "rejected_spans"})
    assert err.value.line == 2
    with pytest.raises(AmrlhfError, match="span_labels"):
        PreferenceDataModule(path, span_labels={"prompt": "x"})


def test_the_ledger_task_plants_one_carried_error_where_its_span_starts():
    """arith_ledger (the out-of-distribution task): a rejected answer equals its chosen answer up to the planted
    wrong number, which its span starts at and which differs from the right one; the chosen answer's steps are
    right and end on the true count; the wording shares no step format with arith_steps."""
    import re

    from amrlhf.data import arithmetic, ledger

    rows = ledger.generate("heldout", 60)
    assert len({r["prompt"] for r in rows}) == 60 and {r["rejected_error_step"] for r in rows} >= {1, 2, 3}
    for r in rows:
        at = r["rejected_spans"][0][0]
        assert r["rejected_spans"][0][1] == len(r["rejected"]) and r["rejected"][:at] == r["chosen"][:at]
        wrong, right = (int(re.match(r"\d+", t[at:])[0]) for t in (r["rejected"], r["chosen"]))
        assert abs(wrong - right) in (2, 10)
        steps = re.findall(r"(\d+) (plus|minus|times|divided by) (\d+) (?:makes|gives) (\d+)", r["chosen"])
        assert steps and all(ledger.apply(int(a), {v: k for k, v in ledger.WORDS.items()}[op], int(b)) == int(c)
                             for a, op, b, c in steps)
        assert r["chosen"].endswith(f"ends with {r['answer']} " + r["chosen"].split()[-1])
        wrong_steps = re.findall(r"(\d+) (plus|minus|times|divided by) (\d+) (?:makes|gives) (\d+)", r["rejected"])
        k = r["rejected_error_step"] - 1
        assert [s[:3] for s in wrong_steps[:k]] == [s[:3] for s in steps[:k]]  # right up to the planted step
        assert all(int(a) == int(c_prev) for (a, *_), (*_, c_prev) in zip(wrong_steps[1:], wrong_steps[:-1], strict=True))
        assert not arithmetic.equations(r["chosen"]) and "Step 1:" not in r["chosen"]
    assert ledger.generate("heldout", 5) == rows[:5] and ledger.generate("val", 5) != rows[:5]


def test_skip_train_reads_a_slice_of_the_file_and_a_slice_past_the_end_is_an_error(tmp_path, tokenizer, caplog):
    """skip_train passes over the first rows, limit_train counts from there: rows 3-4 of 6 (a scorer's fits on
    rows no DPO run reads); skipping everything is an error naming the file and the skip; a bad skip is refused."""
    from amrlhf.data import PreferenceDataModule, PromptDataModule, SFTDataModule
    from amrlhf.errors import ConfigError

    rows = [{**GOOD, "chosen": f"1 plus 2 is 3 ({i})."} for i in range(6)]
    path = write(tmp_path, rows)
    got = read_examples(path, "preference", 2, skip=3)
    assert [e.chosen for e in got] == ["1 plus 2 is 3 (3).", "1 plus 2 is 3 (4)."]
    assert len(read_examples(path, "preference", None, skip=4)) == 2
    dm = SFTDataModule(path, tokenizer="local:tiny-llama", limit_train=2, skip_train=3, completion_field="chosen")
    dm.setup()
    assert len(dm.train_data) == 2
    sft = read_examples(path, "sft", 2, skip=3, completion_field="chosen")
    assert [e.responses for e in dm.train_data] == [e.responses for e in encode_examples(sft, tokenizer, 512)[0]]
    with pytest.raises(AmrlhfError, match=r"d\.jsonl: data\.skip_train=7 passes over all of its 6 rows"):
        read_examples(path, "preference", None, skip=7)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="skip_train must be an integer >= 0"):
            PreferenceDataModule(path, skip_train=bad)
    for cls, extra in ((PreferenceDataModule, {}), (SFTDataModule, {"completion_field": "rejected"}),
                       (PromptDataModule, {})):
        dm = cls(path, tokenizer="local:tiny-llama", limit_train=2, skip_train=3, **extra)
        dm.setup()
        assert dm.skip_train == 3 and len(dm.train_data) == 2, cls.__name__
    with caplog.at_level(logging.WARNING, logger="amrlhf.data.records"):
        assert len(read_examples(path, "preference", 5, skip=4)) == 2
    assert "2 rows after the first 4 (skip_train), fewer than limit_train=5" in caplog.text
