import pytest
import torch

from amrlhf.segmenters import PivotSegmenter, SampleWiseSegmenter, segment_stats


def batch():
    resp = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.float32)
    return resp, torch.tensor([1, -1]), torch.zeros(2, 7, dtype=torch.long)


def test_sample_wise_keeps_exactly_the_response():
    resp, labels, ids = batch()
    seg = SampleWiseSegmenter().segment(response_mask=resp, labels=labels, input_ids=ids)
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
        SampleWiseSegmenter().segment(response_mask=resp, labels=labels, input_ids=ids[:, :-1])
    with pytest.raises(ValueError, match=r"\+1"):
        SampleWiseSegmenter().segment(response_mask=resp, labels=torch.tensor([1, 0]), input_ids=ids)
