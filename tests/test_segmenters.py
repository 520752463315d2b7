import pytest
import torch
from torch.testing import assert_close

from amrlhf.segmenters import PivotSegmenter, SampleWiseSegmenter, SegmentInputs, segment_stats


def batch():
    resp = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.float32)
    return resp, torch.tensor([1, -1]), torch.zeros(2, 7, dtype=torch.long)


def test_sample_wise_keeps_exactly_the_response():
    resp, labels, ids = batch()
    seg = SampleWiseSegmenter().segment(SegmentInputs(response_mask=resp, labels=labels, input_ids=ids))
    assert isinstance(SampleWiseSegmenter(), PivotSegmenter)
    assert torch.equal(seg.mask, resp)
    assert seg.sigma.tolist() == [[0, 0, 1, 1, 1, 0], [0, -1, -1, 0, 0, 0]]
    assert not seg.pivot.any() and not seg.fell_back.any()
    assert torch.equal(seg.segment_id, resp.long())
    st = segment_stats(seg, resp, labels)
    assert st["segments/kept_frac_chosen"].item() == 1.0 and st["segments/kept_frac_rejected"].item() == 1.0
    assert st["segments/pivots_per_response"].item() == 0.0
    assert st["segments/mean_segment_len"].item() == pytest.approx(2.5)  # (3 + 2) / 2


def test_misaligned_inputs_are_refused():
    resp, labels, ids = batch()
    with pytest.raises(ValueError, match="aligned"):
        SampleWiseSegmenter().segment(SegmentInputs(response_mask=resp, labels=labels, input_ids=ids[:, :-1]))
    with pytest.raises(ValueError, match=r"\+1"):
        SampleWiseSegmenter().segment(SegmentInputs(response_mask=resp, labels=torch.tensor([1, 0]), input_ids=ids))


def test_one_sided_masks_the_rejected_side_only_by_hand():
    from amrlhf.modules.masking import Masker
    from amrlhf.scorers import TokenScores
    from amrlhf.segmenters import AdaptivePivotSegmenter, ConstantBaseline

    # both rows: score +1 then -1 then -1 over three response tokens (raw, zero baseline, delta 0.3)
    resp = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.float32)
    scores = torch.tensor([[0.0, 1.0, -1.0, -1.0], [0.0, 1.0, -1.0, -1.0]])
    labels, ids = torch.tensor([1, -1]), torch.zeros(2, 5, dtype=torch.long)
    batch = {"response_mask": resp, "labels": labels, "input_ids": ids}
    inner = AdaptivePivotSegmenter(delta=0.3, baseline=ConstantBaseline(0.0))
    both = inner.segment(SegmentInputs(response_mask=resp, labels=labels, input_ids=ids, scores=scores))
    assert both.mask.tolist() == [[0, 1, 0, 0], [0, 0, 1, 1]]  # sigma = +1, -1, -1 on each row
    signals = TokenScores(scores=scores)
    assert torch.equal(Masker(inner).segment(batch, signals).mask, both.mask)  # side: both (default)
    seg = Masker(inner, side="rejected").segment(batch, signals)
    assert seg.mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]  # the chosen row keeps every token
    assert seg.sigma.tolist() == [[0, 1, 1, 1], [0, 1, -1, -1]]
    assert seg.pivot.tolist() == [[False] * 4, both.pivot[1].tolist()]
    chosen = Masker(inner, side="chosen").mask(batch, "train", signals=signals)
    assert chosen.mask.tolist() == [[0, 1, 0, 0], [0, 1, 1, 1]]


def test_the_side_is_the_maskers_and_is_checked():
    """The side policy is one of the masker's fields, copied to its uncached twin and set from a module's
    `mask_side`; a side without a segmenter, or an unknown side, is refused before anything runs, and cannot be
    made later through the module."""
    from amrlhf.errors import ConfigError
    from amrlhf.models import ModelSpec
    from amrlhf.modules import DPOModule, GRPOModule, PPOModule, SFTModule
    from amrlhf.modules.masking import Masker
    from amrlhf.rewards import NumberAnswerReward, VerifiableReward
    from amrlhf.scorers import CachedScorer, SurprisalScorer
    from amrlhf.segmenters import AdaptivePivotSegmenter

    masker = Masker(AdaptivePivotSegmenter(), CachedScorer(SurprisalScorer(ModelSpec("local:tiny-llama"))),
                    side="rejected")
    assert masker.uncached().side == "rejected" and isinstance(masker.uncached().scorer, SurprisalScorer)
    spec = ModelSpec("local:tiny-llama")
    assert DPOModule(spec, segmenter=AdaptivePivotSegmenter(), mask_side="rejected").masker.side == "rejected"
    assert SFTModule(spec, segmenter=AdaptivePivotSegmenter(), mask_side="chosen").masker.side == "chosen"
    for cls in (GRPOModule, PPOModule):
        on_policy = cls(spec, reward=VerifiableReward([NumberAnswerReward()]), segmenter=AdaptivePivotSegmenter(), mask_side="rejected")
        assert on_policy.masker.side == "rejected"
    assert DPOModule(spec).masker.side == "both"
    with pytest.raises(ConfigError, match="needs a segmenter"):
        DPOModule(spec, mask_side="rejected")
    one_sided = DPOModule(spec, segmenter=AdaptivePivotSegmenter(), mask_side="rejected")
    with pytest.raises(AttributeError):  # the module's view of its masker is read-only: no side without a segmenter
        one_sided.segmenter = None
    with pytest.raises(AttributeError):
        one_sided.scorer = None
    with pytest.raises(ConfigError, match="mask_side must be one of"):
        Masker(AdaptivePivotSegmenter(), side="left")


def test_one_side_takes_every_field_of_the_other_rows_from_sample_wise_and_observes_all_rows():
    """on_one_side: mask, sigma, pivot, segment_id of the off-side rows are the sample-wise ones and a fallback
    there is not reported; a running baseline still learns from every row's scores."""
    from amrlhf.modules.masking import Masker
    from amrlhf.scorers import TokenScores
    from amrlhf.segmenters import AdaptivePivotSegmenter, RunningMeanBaseline, Segmentation, on_one_side

    resp = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([1, -1])
    inner = Segmentation(mask=torch.zeros(2, 3), sigma=torch.full((2, 3), -1), pivot=torch.ones(2, 3, dtype=torch.bool),
                         segment_id=torch.tensor([[0, 1, 2], [0, 1, 2]]), fell_back=torch.tensor([True, True]))
    whole = SampleWiseSegmenter().segment(SegmentInputs(resp, labels, torch.zeros(2, 4, dtype=torch.long)))
    one = on_one_side(inner, whole, labels, "rejected")
    for field in ("mask", "sigma", "pivot", "segment_id"):
        assert torch.equal(getattr(one, field)[0], getattr(whole, field)[0]), field  # the chosen row: sample-wise
        assert torch.equal(getattr(one, field)[1], getattr(inner, field)[1]), field  # the rejected row: inner
    assert one.fell_back.tolist() == [False, True]
    assert on_one_side(inner, whole, labels, "both") is inner
    seg = AdaptivePivotSegmenter(baseline=RunningMeanBaseline(momentum=0.5))
    scores = torch.tensor([[4.0, 4.0, 4.0], [0.0, 0.0, 0.0]])  # chosen row mean 4, rejected row 0
    batch = {"response_mask": resp, "labels": labels, "input_ids": torch.zeros(2, 4, dtype=torch.long)}
    Masker(seg, side="rejected").mask(batch, "train", signals=TokenScores(scores=scores))
    assert seg.baseline.mean == pytest.approx(2.0)  # both rows' tokens: (3 * 4 + 3 * 0) / 6


def test_the_on_policy_actor_mask_keeps_the_other_side_whole():
    """PPO/GRPO's actor mask goes through the masker's side: with mask_side rejected, a response of label +1
    trains every token, one of label -1 gets the segmenter's mask; `describe` names the side."""
    from amrlhf.callbacks.segments_view import describe
    from amrlhf.models import ModelSpec
    from amrlhf.modules import PPOModule
    from amrlhf.scorers import TokenScores
    from amrlhf.segmenters import AdaptivePivotSegmenter, ConstantBaseline

    resp = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    roll = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5),
            "response_mask": resp, "labels": torch.tensor([1, -1])}
    scores = TokenScores(torch.tensor([[0.0, 1.0, -1.0, -1.0], [0.0, 1.0, -1.0, -1.0]]), torch.zeros(2))
    masks = {}
    for side in ("both", "rejected"):
        module = PPOModule(ModelSpec("local:tiny-llama"), reward=None, mask_side=side, seed=0,
                           segmenter=AdaptivePivotSegmenter(delta=0.3, baseline=ConstantBaseline(0.0), scale=1.0))
        module.masker.calibrated = True  # raw scores: no scale to measure
        masks[side], _ = module.actor_mask(roll, scores, [{}, {}])
    assert masks["both"].tolist() == [[0, 1, 0, 0], [0, 0, 1, 1]]
    assert masks["rejected"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    assert describe(module.masker).endswith("; rejected responses only (the others keep every token)")


def _soft_inputs(scores):
    scores = torch.tensor(scores)
    resp = (~torch.isnan(scores)).float()
    return dict(response_mask=resp, input_ids=torch.zeros(scores.shape[0], scores.shape[1] + 1, dtype=torch.long),
                scores=torch.nan_to_num(scores))


def test_rank_weights_by_hand():
    from amrlhf.segmenters import RankWeightSegmenter

    nan = float("nan")
    inp = _soft_inputs([[0.1, 0.5, 0.3, nan], [0.1, 0.5, 0.3, nan], [1.0, 1.0, 2.0, nan], [2.0, 1.0, nan, nan],
                        [4.0, nan, nan, nan]])
    seg = RankWeightSegmenter(0.7, 1.3).segment(SegmentInputs(labels=torch.tensor([1, -1, 1, 1, -1]), **inp))
    expected = [[0.7, 1.3, 1.0, 0.0],    # chosen: ranks 0, 2, 1 of 3 -> 0.7 + 0.6 r / 2
                [1.3, 0.7, 1.0, 0.0],    # rejected: the lowest score ranks highest
                [0.85, 0.85, 1.3, 0.0],  # a tie shares its mean rank 0.5 -> 0.7 + 0.6 x 0.25
                [1.3, 0.7, 0.0, 0.0],    # two tokens: the better one 1.3, the other 0.7
                [1.0, 0.0, 0.0, 0.0]]    # one token: the middle of the band
    assert_close(seg.mask, torch.tensor(expected))
    assert seg.sigma[1].tolist() == [-1, -1, -1, 0] and not seg.pivot.any() and not seg.fell_back.any()


def test_linear_weights_by_hand():
    from amrlhf.segmenters import LinearWeightSegmenter

    nan = float("nan")
    inp = _soft_inputs([[0.0, 0.2, 1.0, nan], [0.0, 0.2, 1.0, nan]])
    seg = LinearWeightSegmenter(slope=0.5).segment(SegmentInputs(labels=torch.tensor([1, -1]), **inp))
    # mean 0.4: chosen 1 + 0.5 (s - 0.4) = 0.8, 0.9, 1.3; rejected 1 - 0.5 (s - 0.4) = 1.2, 1.1, 0.7
    assert_close(seg.mask, torch.tensor([[0.8, 0.9, 1.3, 0.0], [1.2, 1.1, 0.7, 0.0]]))
    clipped = LinearWeightSegmenter(slope=2.0).segment(SegmentInputs(labels=torch.tensor([1, -1]), **inp))
    assert_close(clipped.mask, torch.tensor([[0.7, 0.7, 1.3, 0.0], [1.3, 1.3, 0.7, 0.0]]))


def test_soft_weights_refuse_a_bad_band_and_missing_scores():
    from amrlhf.errors import ConfigError
    from amrlhf.segmenters import LinearWeightSegmenter, RankWeightSegmenter

    with pytest.raises(ConfigError, match="lo <= hi"):
        RankWeightSegmenter(1.3, 0.7)
    with pytest.raises(ConfigError, match="slope"):
        LinearWeightSegmenter(slope=-1)
    with pytest.raises(ConfigError, match="set model.init_args.scorer"):
        RankWeightSegmenter().segment(SegmentInputs(response_mask=torch.ones(1, 2), labels=torch.tensor([1]),
                                      input_ids=torch.zeros(1, 3, dtype=torch.long)))


def test_segment_stats_and_the_html_view_show_soft_weights_by_hand():
    """Weights 0.7 / 1.0 / 1.3 on a chosen response: every token kept, mean 1.0, spread sqrt(0.06) = 0.2449;
    the rejected 0/1 mask keeps 1 of 2 (mean 0.5, spread 0.5). The page shades soft weights and names them."""
    from amrlhf.callbacks.segments_view import render_page
    from amrlhf.segmenters import Segmentation

    resp, labels, _ = batch()
    mask = torch.tensor([[0, 0, 0.7, 1.0, 1.3, 0], [0, 1.0, 0, 0, 0, 0]])
    seg = Segmentation(mask=mask, sigma=labels[:, None] * resp.long(), pivot=torch.zeros_like(resp, dtype=torch.long),
                       segment_id=resp.long(), fell_back=torch.zeros(2, dtype=torch.bool))
    st = segment_stats(seg, resp, labels)
    assert st["segments/kept_frac_chosen"].item() == 1.0 and st["segments/kept_frac_rejected"].item() == 0.5
    assert st["segments/weight_mean_chosen"].item() == pytest.approx(1.0)
    assert st["segments/weight_std_chosen"].item() == pytest.approx(0.06 ** 0.5)
    assert st["segments/weight_mean_rejected"].item() == 0.5 and st["segments/weight_std_rejected"].item() == 0.5
    row = {"tokens": ["a", "b", "c"], "weights": [0.7, 1.0, 1.3], "pivot": [False] * 3, "scores": [0.1, 0.2, 0.3],
           "fell_back": False, "kept_frac": 1.0}
    page = render_page("t", "h", [{"prompt": "p", "chosen": row}])
    assert "weight 1.300" in page and "weights 0.70-1.30, mean 1.00" in page and "rgba(46,160,67" in page
    binary = render_page("t", "h", [{"prompt": "p", "chosen": {**row, "weights": [1.0, 0.0, 1.0]}}])
    assert "weight" not in binary and "rgba" not in binary and "class='tok mask'>masked" in binary


def test_hooks_come_from_the_base_class_and_do_nothing_until_overridden():
    """Every segmenter has every hook (no hasattr at the call sites); the base's do nothing, the scored
    segmenters' calibrate, and only they ask for the score scale."""
    from amrlhf.segmenters import AdaptivePivotSegmenter, RankWeightSegmenter, StepWiseSegmenter

    for seg in (SampleWiseSegmenter(), RankWeightSegmenter(), AdaptivePivotSegmenter(), StepWiseSegmenter()):
        assert isinstance(seg, PivotSegmenter)
        for hook in ("setup", "calibrate", "observe", "state_dict", "load_state_dict"):
            assert callable(getattr(seg, hook))
    plain = SampleWiseSegmenter()
    plain.calibrate(3.0), plain.observe(torch.ones(1, 2), torch.ones(1, 2)), plain.load_state_dict({})
    assert plain.state_dict() == {} and not plain.calibrated_by_scale
    scored = AdaptivePivotSegmenter()
    scored.calibrate(3.0)
    assert scored.calibrated_by_scale and scored.state_dict() == {"scale": 3.0}
    with pytest.raises(NotImplementedError, match="segment"):
        PivotSegmenter().segment(SegmentInputs(torch.ones(1, 2), torch.tensor([1]), torch.zeros(1, 3, dtype=torch.long)))


def test_the_masker_owns_scorer_segmenter_and_calibration():
    """The one path to a mask: no segmenter keeps the response; the scale is the std of the scores it is given
    and travels in state_dict; a cached scorer is swapped for its source when scoring data outside the run."""
    from types import SimpleNamespace

    from amrlhf.modules.masking import Masker
    from amrlhf.scorers import CachedScorer, TokenScores
    from amrlhf.segmenters import AdaptivePivotSegmenter

    resp, labels, ids = batch()
    batch_ = {"response_mask": resp, "labels": labels, "input_ids": ids}
    assert torch.equal(Masker().mask(batch_, "train").mask, resp)
    seg = AdaptivePivotSegmenter(delta=0.5)
    masker = Masker(seg, scorer=SimpleNamespace(score=None), calibration_batches=1)
    assert masker.needs_scale and not masker.calibrated
    stats = masker.calibrate(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert seg.scale == pytest.approx(1.2909944) and masker.calibrated and stats["segments/score_mean"] == 2.5
    fresh = Masker(AdaptivePivotSegmenter(delta=0.5))
    fresh.load_state_dict(masker.state_dict())
    assert fresh.segmenter.scale == seg.scale and fresh.calibrated
    scores = torch.tensor([[0, 0, 3.0, -3.0, 3.0, 0], [0, 3.0, -3.0, 0, 0, 0]])
    out = masker.mask(batch_, "train", signals=TokenScores(scores, torch.zeros(2)))
    assert out.mask.tolist()[0] == [0, 0, 1, 0, 1, 0] and out.scores is scores  # 3 / 1.29 > 0.5: sigma flips
    source = SimpleNamespace()
    cached = Masker(seg, CachedScorer(source))
    assert cached.uncached().scorer is source and cached.uncached().segmenter is seg and masker.uncached() is masker


def test_the_random_control_mask_depends_on_the_row_only_and_keeps_its_share():
    """RandomTokenSegmenter: a row's mask is the same alone or in a padded batch; dropped tokens take the
    opposite sign of the label; keep=1 is sample-wise; about `keep` of many tokens are kept; one-sided, the
    chosen rows keep everything."""
    from amrlhf.errors import ConfigError
    from amrlhf.modules.masking import Masker
    from amrlhf.segmenters import RandomTokenSegmenter
    from amrlhf.segmenters.random import row_seed

    torch.manual_seed(0)
    ids = torch.randint(5, 100, (3, 41))
    resp = torch.zeros(3, 40)
    resp[0, 4:30], resp[1, 2:40], resp[2, 10:20] = 1, 1, 1
    labels = torch.tensor([-1, 1, -1])
    seg = RandomTokenSegmenter(keep=0.6, seed=3)
    s = seg.segment(SegmentInputs(resp, labels, ids))
    row = seg.segment(SegmentInputs(resp[:1, :30], labels[:1], ids[:1, :31]))  # alone, without the padding
    assert torch.equal(s.mask[0, :30], row.mask[0]) and torch.equal(s.sigma[0, :30], row.sigma[0])
    g = torch.Generator().manual_seed(row_seed(3, ids[0, 1:][resp[0].bool()].tolist()))
    expected = (torch.rand(26, generator=g) < 0.6).float()
    assert torch.equal(s.mask[0, 4:30], expected) and s.mask[0, :4].sum() == 0 and s.mask[0, 30:].sum() == 0
    assert torch.equal(s.sigma[0, 4:30], torch.where(expected.bool(), -1, 1))  # kept = the label's sign
    assert not torch.equal(RandomTokenSegmenter(0.6, seed=4).segment(SegmentInputs(resp, labels, ids)).mask, s.mask)
    whole = SampleWiseSegmenter().segment(SegmentInputs(resp, labels, ids))
    assert torch.equal(RandomTokenSegmenter(keep=1.0).segment(SegmentInputs(resp, labels, ids)).mask, whole.mask)
    one = Masker(seg, side="rejected").segment({"response_mask": resp, "labels": labels, "input_ids": ids}, None)
    assert torch.equal(one.mask[1], resp[1]) and torch.equal(one.mask[0], s.mask[0])
    many = torch.ones(1, 4000)
    share = RandomTokenSegmenter(0.6).segment(SegmentInputs(many, torch.tensor([-1]), torch.randint(5, 100, (1, 4001))))
    assert 0.57 < share.mask.mean().item() < 0.63
    with pytest.raises(ConfigError, match="keep must be in"):
        RandomTokenSegmenter(keep=0.0)
