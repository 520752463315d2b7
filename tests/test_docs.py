"""The worked example in docs/segmenters.md runs as written."""

import re

import torch
from conftest import ROOT

from amrlhf.segmenters import PivotSegmenter


def test_the_documented_custom_segmenter_works():
    text = (ROOT / "docs" / "segmenters.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    ns: dict = {}
    exec(compile(code, "docs/segmenters.md", "exec"), ns)
    seg = ns["PrefixSegmenter"](k=2)
    assert isinstance(seg, PivotSegmenter)
    resp = torch.tensor([[0, 1, 1, 1, 1]], dtype=torch.float32)
    out = seg.segment(response_mask=resp, labels=torch.tensor([1]), input_ids=torch.zeros(1, 6, dtype=torch.long))
    assert out.mask.tolist() == [[0, 1, 1, 0, 0]] and out.pivot.tolist() == [[False, False, False, True, False]]
