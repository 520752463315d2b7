"""The adaptive pivot segmenter and the baselines, one hand-worked test per rule of docs/method.md,
plus vectorised-vs-slow-loop checks on random batches."""

import random

import pytest
import torch

from amrlhf.segmenters import (
    AdaptivePivotSegmenter,
    ConstantBaseline,
    EntropySegmenter,
    PivotSegmenter,
    PromptScoreBaseline,
    RunningMeanBaseline,
    SegmentInputs,
    StepWiseSegmenter,
    TokenWiseSegmenter,
)

RESP = torch.tensor([[0, 1, 1, 1, 1, 1]], dtype=torch.float32)  # aligned position 0 is the prompt
IDS = torch.zeros(1, 7, dtype=torch.long)


def seg(s, scores, label=1, resp=RESP, ids=IDS, **kw):
    return s.segment(SegmentInputs(response_mask=resp, labels=torch.tensor([label] * resp.shape[0]), input_ids=ids,
                     scores=torch.tensor(scores, dtype=torch.float32), **kw))


def const(**kw):
    return AdaptivePivotSegmenter(delta=0.25, baseline=ConstantBaseline(0.0), **kw)


def test_every_segmenter_satisfies_the_protocol():
    for s in (const(), TokenWiseSegmenter(), StepWiseSegmenter(delimiter_ids=[1]), EntropySegmenter()):
        assert isinstance(s, PivotSegmenter)


def test_hysteresis_holds_in_band_and_flips_outside_it():
    # u on the response: 0.5 (+), 0.2 (in band: hold +), -0.1 (hold +), -0.5 (-), 0.1 (hold -)
    out = seg(const(), [[9.0, 0.5, 0.2, -0.1, -0.5, 0.1]])
    assert out.sigma.tolist() == [[0, 1, 1, 1, -1, -1]]
    assert out.mask.tolist() == [[0, 1, 1, 1, 0, 0]]
    assert out.pivot.tolist() == [[False, False, False, False, True, False]]
    assert out.segment_id.tolist() == [[0, 1, 1, 1, 2, 2]]
    rejected = seg(const(), [[9.0, 0.5, 0.2, -0.1, -0.5, 0.1]], label=-1)
    assert rejected.mask.tolist() == [[0, 0, 0, 0, 1, 1]]  # in a rejected answer only the wrong span is kept


def test_a_value_exactly_at_delta_is_in_band():
    out = seg(const(), [[0.0, 0.5, 0.25, -0.25, -0.5, 0.0]])
    assert out.sigma.tolist() == [[0, 1, 1, 1, -1, -1]]


def test_first_token_rule_label_and_sign():
    scores = [[0.0, 0.1, 0.1, 0.1, 0.1, 0.1]]  # all in band
    assert seg(const(), scores, label=1).sigma.tolist() == [[0, 1, 1, 1, 1, 1]]
    assert seg(const(), scores, label=-1).sigma.tolist() == [[0, -1, -1, -1, -1, -1]]
    assert seg(const(first_token="sign"), scores, label=-1).sigma.tolist() == [[0, 1, 1, 1, 1, 1]]
    zero = [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    assert seg(const(first_token="sign"), zero, label=-1).sigma.tolist() == [[0, 1, 1, 1, 1, 1]]  # 0 -> +1
    neg = [[0.0, -0.1, 0.0, 0.0, 0.0, 0.0]]
    assert seg(const(first_token="sign"), neg, label=1).sigma.tolist() == [[0, -1, -1, -1, -1, -1]]


def test_fully_masked_falls_back_to_ones_or_drop():
    scores = [[5.0, -1.0, -1.0, -1.0, -1.0, -1.0]]
    ones = seg(const(), scores, label=1)
    assert ones.mask.tolist() == RESP.tolist() and ones.fell_back.tolist() == [True]
    drop = seg(const(fallback="drop"), scores, label=1)
    assert drop.mask.sum() == 0 and drop.fell_back.tolist() == [True]
    kept_one = [[5.0, 1.0, -1.0, -1.0, -1.0, -1.0]]  # 1 of 5 kept
    assert not seg(const(), kept_one).fell_back.any()
    low = seg(const(min_kept_frac=0.5, fallback="drop"), kept_one)
    assert low.fell_back.tolist() == [True] and low.mask.sum() == 0


def test_one_token_response():
    resp = torch.tensor([[0, 0, 0, 0, 0, 1]], dtype=torch.float32)
    out = seg(const(), [[0.0, 0.0, 0.0, 0.0, 0.0, -1.0]], label=-1, resp=resp)
    assert out.mask.tolist() == [[0, 0, 0, 0, 0, 1]] and not out.fell_back.any()
    fb = seg(const(), [[0.0, 0.0, 0.0, 0.0, 0.0, -1.0]], label=1, resp=resp)
    assert fb.mask.tolist() == [[0, 0, 0, 0, 0, 1]] and fb.fell_back.tolist() == [True]


def test_padding_and_prompt_are_never_kept():
    resp = torch.tensor([[0, 0, 1, 1, 0, 0]], dtype=torch.float32)  # prompt, response, padding
    out = seg(const(), [[9.0, 9.0, 1.0, 1.0, 9.0, -9.0]], resp=resp)
    off = ~resp.bool()
    assert out.mask[off].sum() == 0 and (out.sigma[off] == 0).all() and (out.segment_id[off] == 0).all()
    assert not out.pivot[off].any()


def test_level_vs_increment_sees_a_wrong_span_after_a_strong_start():
    scores = [[0.0, 1.0, 1.0, 1.0, 0.0, 0.0]]
    prompt = torch.tensor([0.0])
    level = AdaptivePivotSegmenter(delta=0.25, signal="level", baseline=PromptScoreBaseline())
    inc = AdaptivePivotSegmenter(delta=0.25, signal="increment")
    assert seg(level, scores, prompt_scores=prompt).mask.tolist() == [[0, 1, 1, 1, 1, 1]]  # never below s_0
    # increments 1, 0, 0, -1, 0: the drop at the 4th token is a pivot
    assert seg(inc, scores, prompt_scores=prompt).mask.tolist() == [[0, 1, 1, 1, 0, 0]]


def test_delta_is_in_units_of_the_measured_scale():
    scores = [[0.0, 0.5, 0.5, -0.5, -0.5, -0.5]]
    assert seg(const(), scores).pivot.any()
    calm = const()
    calm.calibrate(4.0)  # |u| / 4 = 0.125 <= 0.25: everything in band
    assert not seg(calm, scores).pivot.any()


def test_prompt_score_baseline_and_running_mean_state():
    out = seg(AdaptivePivotSegmenter(delta=0.25), [[0.0, 2.5, 2.5, 1.0, 1.0, 2.5]], prompt_scores=torch.tensor([2.0]))
    assert out.sigma.tolist() == [[0, 1, 1, -1, -1, 1]]  # u = s - s_0 = 0.5, 0.5, -1, -1, 0.5
    rm = RunningMeanBaseline(momentum=0.5)
    rm.update(torch.tensor([[0.0, 2.0, 4.0]]), torch.tensor([[0.0, 1.0, 1.0]]))
    assert rm.mean == 3.0
    rm.update(torch.tensor([[1.0]]), torch.tensor([[1.0]]))
    assert rm.mean == 2.0  # 0.5 * 3 + 0.5 * 1
    s = AdaptivePivotSegmenter(baseline=RunningMeanBaseline())
    s.baseline.load_state_dict(rm.state_dict())
    s.calibrate(2.0)
    restored = AdaptivePivotSegmenter(baseline=RunningMeanBaseline())
    restored.load_state_dict(s.state_dict())
    assert restored.baseline.mean == 2.0 and restored.scale == 2.0


def test_token_wise_no_hysteresis_zero_agrees():
    out = seg(TokenWiseSegmenter(baseline=ConstantBaseline(0.0)), [[0.0, 0.5, -0.1, 0.0, 0.2, -3.0]])
    assert out.sigma.tolist() == [[0, 1, -1, 1, 1, -1]]
    assert out.mask.tolist() == [[0, 1, 0, 1, 1, 0]]
    assert out.pivot.nonzero()[:, 1].tolist() == [2, 3, 5]


def test_step_wise_segments_end_at_delimiters_sign_from_last_token_or_sum():
    ids = torch.tensor([[0, 0, 1, 5, 2, 3, 5]])  # response tokens 1 5 | 2 3 5  (5 = delimiter)
    scores = [[9.0, -1.0, 0.5, 2.0, 3.0, -0.5]]
    lvl = StepWiseSegmenter(delimiter_ids=[5], baseline=ConstantBaseline(0.0))
    out = seg(lvl, scores, ids=ids)
    assert out.segment_id.tolist() == [[0, 1, 1, 2, 2, 2]]
    assert out.sigma.tolist() == [[0, 1, 1, -1, -1, -1]]  # last tokens: 0.5 (+), -0.5 (-)
    assert out.mask.tolist() == [[0, 1, 1, 0, 0, 0]]
    inc = StepWiseSegmenter(delimiter_ids=[5], signal="increment")
    # increments (s_0 = 4): -5, 1.5 | 1.5, 1, -3.5  -> sums -3.5 (-), -1 (-)
    out = seg(inc, scores, ids=ids, prompt_scores=torch.tensor([4.0]))
    assert out.sigma.tolist() == [[0, -1, -1, -1, -1, -1]] and out.fell_back.tolist() == [True]


def test_step_wise_setup_reads_delimiters_from_the_tokenizer(tokenizer):
    s = StepWiseSegmenter()
    s.setup(tokenizer)
    assert tokenizer.convert_tokens_to_ids(".") in s.delimiter_ids.tolist()
    assert tokenizer.convert_tokens_to_ids("1") not in s.delimiter_ids.tolist()


def test_entropy_segments_start_where_entropy_is_high():
    ent = torch.tensor([[0.0, 0.5, 3.0, 0.1, 2.5, 0.2]])
    out = seg(EntropySegmenter(threshold=2.0, baseline=ConstantBaseline(0.0)), [[0.0, 1.0, 1.0, -1.0, 1.0, 1.0]],
              ref_entropy=ent)
    assert out.segment_id.tolist() == [[0, 1, 2, 2, 3, 3]]
    assert out.sigma.tolist() == [[0, 1, -1, -1, 1, 1]]


def slow_adaptive(u, resp, label, delta, first_token):
    """docs/method.md read literally, one token at a time (delta compared at float32, as the tensors are)."""
    delta = float(torch.tensor(delta, dtype=torch.float32))
    sigma, prev, started = [0] * len(u), None, False
    for t, (x, r) in enumerate(zip(u, resp, strict=True)):
        if not r:
            continue
        if x > delta:
            cur = 1
        elif x < -delta:
            cur = -1
        elif not started:
            cur = label if first_token == "label" else (-1 if x < 0 else 1)
        else:
            cur = prev
        sigma[t], prev, started = cur, cur, True
    return sigma


@pytest.mark.parametrize("signal", ["level", "increment"])
@pytest.mark.parametrize("first_token", ["label", "sign"])
def test_vectorised_equals_slow_loop(signal, first_token):
    rng = random.Random(signal + first_token)
    B, n = 16, 24
    resp = torch.zeros(B, n)
    for b in range(B):
        start = rng.randint(1, n - 2)
        resp[b, start:rng.randint(start + 1, n)] = 1
    scores = torch.randn(B, n, generator=torch.Generator().manual_seed(3)).round(decimals=1)
    prompt = torch.randn(B, generator=torch.Generator().manual_seed(4)).round(decimals=1)
    labels = torch.tensor([rng.choice([1, -1]) for _ in range(B)])
    s = AdaptivePivotSegmenter(delta=0.3, signal=signal, first_token=first_token)
    out = s.segment(SegmentInputs(response_mask=resp, labels=labels, input_ids=torch.zeros(B, n + 1, dtype=torch.long),
                    scores=scores, prompt_scores=prompt))
    for b in range(B):
        r = resp[b].bool().tolist()
        first = r.index(True)
        if signal == "level":
            u = [(scores[b, t] - prompt[b]).item() for t in range(n)]
        else:
            u = [(scores[b, t] - (prompt[b] if t == first else scores[b, t - 1])).item() for t in range(n)]
        expected = slow_adaptive(u, r, labels[b].item(), 0.3, first_token)
        assert out.sigma[b].tolist() == expected, b
        keep = [int(e == labels[b].item()) for e in expected]
        if sum(keep) == 0:
            keep = [int(x) for x in r]
        assert out.mask[b].long().tolist() == keep
