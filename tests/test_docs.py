"""The worked examples in docs/segmenters.md and docs/extending.md run as written."""

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT

from amrlhf.segmenters import PivotSegmenter, SegmentInputs


def test_the_documented_custom_segmenter_works():
    text = (ROOT / "docs" / "segmenters.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    ns: dict = {}
    exec(compile(code, "docs/segmenters.md", "exec"), ns)
    seg = ns["PrefixSegmenter"](k=2)
    assert isinstance(seg, PivotSegmenter)
    resp = torch.tensor([[0, 1, 1, 1, 1]], dtype=torch.float32)
    out = seg.segment(SegmentInputs(response_mask=resp, labels=torch.tensor([1]), input_ids=torch.zeros(1, 6, dtype=torch.long)))
    assert out.mask.tolist() == [[0, 1, 1, 0, 0]] and out.pivot.tolist() == [[False, False, False, True, False]]


# ---------------------------------------------------------------- docs/extending.md
# Each code block there starts with a comment naming its file; the blocks are written to those paths under a
# temporary folder (the package's own paths stay untouched) and run from there.

EXTENDING = ROOT / "docs" / "extending.md"


def _blocks(lang: str) -> list[tuple[str, str]]:
    """(the path the block's first-line comment names, or '' if none, the code) of each `lang` block."""
    out = []
    for code in re.findall(rf"```{lang}\n(.*?)```", EXTENDING.read_text(), re.S):
        first = code.splitlines()[0]
        out.append((first[2:].split(" (")[0].strip() if first.startswith("# ") and "/" in first else "", code))
    return out


def _named(lang: str, path: str) -> str:
    found = [code for name, code in _blocks(lang) if name == path]
    assert len(found) == 1, f"docs/extending.md: one {lang} block for {path}, found {len(found)}"
    return found[0]


def _yaml_with(class_path: str) -> dict:
    """The mapping holding `class_path` in the one documented YAML block that names it."""
    import yaml

    def find(node):
        if isinstance(node, dict):
            if node.get("class_path") == class_path:
                return node
            node = list(node.values())
        if isinstance(node, list):
            for value in node:
                if (hit := find(value)) is not None:
                    return hit
        return None

    hits = [find(yaml.safe_load(code)) for _, code in _blocks("yaml") if class_path in code]
    assert len(hits) == 1 and hits[0] is not None, f"docs/extending.md: one YAML block naming {class_path}"
    return hits[0]


def _parse(protocol, spec: dict):
    """What the recipe's `class_path` block becomes when a module's argument of type `protocol | None` reads it
    (jsonargparse checks the class against the Protocol by signature)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--component", type=protocol | None)
    cfg = parser.parse_object({"component": spec})
    return (getattr(parser, "instantiate", None) or parser.instantiate_classes)(cfg).component


@pytest.fixture(scope="module")
def my_project(tmp_path_factory):
    """The `my_project/...` blocks written as an importable package."""
    root = tmp_path_factory.mktemp("extending")
    for name, code in _blocks("python"):
        if name.startswith("my_project/"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(code)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for mod in [m for m in sys.modules if m == "my_project" or m.startswith("my_project.")]:
        del sys.modules[mod]


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_extending_names_every_block_and_the_pages_stay_short_with_working_links():
    assert all(name for name, _ in _blocks("python")), "every python block starts with '# path/to/file.py'"
    for page in ("extending.md", "architecture.md"):
        text = (ROOT / "docs" / page).read_text()
        assert len(text) < 12_500
        for target, anchor in re.findall(r"\]\(([\w./]*\.md)?#([\w-]+)\)", text):
            headings = (ROOT / "docs" / (target or page)).read_text()
            assert anchor in {_slug(h) for h in re.findall(r"^#+ (.*)$", headings, re.M)}, f"{page}: {target}#{anchor}"


def test_the_architecture_page_lists_the_checked_layers():
    from test_architecture import LAYERS

    rows: dict[int, set[str]] = {}
    for number, names in re.findall(r"^\| (\d+) \| (.*?) \|", (ROOT / "docs" / "architecture.md").read_text(), re.M):
        rows.setdefault(int(number), set()).update(re.findall(r"`(\w+)`", names))
    assert rows == dict(enumerate(LAYERS))


def test_the_documented_scorer_scores_by_hand(my_project):
    from amrlhf.scorers import ScoringContext, TokenScorer, TokenScores
    from amrlhf.segmenters import AdaptivePivotSegmenter

    scorer = _parse(TokenScorer, _yaml_with("my_project.banned.BannedWordScorer"))
    assert type(scorer).__name__ == "BannedWordScorer" and scorer.words == [" basically", " literally"]
    tok = lambda text, add_special_tokens=True: {"input_ids": {" basically": [9], " literally": [9, 4]}[text]}  # noqa: E731
    scorer.setup(ScoringContext(tokenizer=tok))
    assert scorer.ids.tolist() == [4, 9]
    # prompt [5, 6], response a B b B with B = 9 banned; the same response as chosen (row 0) and rejected (row 1)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 9, 8, 9]] * 2),
             "response_mask": torch.tensor([[0, 1, 1, 1, 1]] * 2, dtype=torch.float32),
             "labels": torch.tensor([1, -1])}
    out = scorer.score(batch, "train")
    assert isinstance(out, TokenScores)
    assert out.scores.tolist() == [[0, 0, -1, -1, -2]] * 2 and out.prompt_scores.tolist() == [0, 0]
    seg = _parse(PivotSegmenter, _yaml_with("amrlhf.segmenters.AdaptivePivotSegmenter"))
    assert isinstance(seg, AdaptivePivotSegmenter) and seg.scale == 1.0
    s = seg.segment(SegmentInputs(response_mask=batch["response_mask"], labels=batch["labels"], input_ids=batch["input_ids"],
                    **out.as_kwargs()))
    assert s.mask.tolist() == [[0, 1, 0, 0, 0], [0, 1, 1, 1, 1]]


def test_the_documented_advantage_estimator_by_hand(my_project):
    from amrlhf.losses.advantages import AdvantageEstimator

    est = _parse(AdvantageEstimator, _yaml_with("my_project.rank_adv.GroupRank"))
    assert est.needs_groups
    # two groups of 4: rewards 1 0 0 2 (mid-ranks 2, .5, .5, 3), then all equal
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0, 3.0, 3.0, 3.0, 3.0])
    resp = torch.tensor([[0, 1, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]] * 2, dtype=torch.float32)
    adv = est.estimate(scores, torch.zeros(8, 3), resp, 4)
    want = [[0, 1 / 3, 1 / 3], [0, -2 / 3, 0], [-2 / 3, -2 / 3, -2 / 3], [0, 0, 1]] + [[0, 0, 0]] * 4
    assert torch.allclose(adv, torch.tensor(want))
    # a per-token KL penalty (kl_in: reward) enters the return: row 1's -1.5 puts it below row 2
    non_score = torch.zeros(8, 3)
    non_score[1, 1] = -1.5
    adv = est.estimate(scores, non_score, resp, 4)
    assert torch.allclose(adv[:4].sum(-1) / resp[:4].sum(-1), torch.tensor([1 / 3, -1, -1 / 3, 1]))


def test_the_documented_evaluation_slot_renders(tmp_path):
    import yaml

    from amrlhf.evaluation.slots import Slot

    src = tmp_path / "src" / "capitals"
    src.mkdir(parents=True)
    (src / "capitals_qa.yaml").write_text(_named("yaml", "amrlhf/evaluation/slots/capitals/capitals_qa.yaml"))
    (src / "amrlhf_task_fns.py").write_text(_named("python", "amrlhf/evaluation/slots/capitals/amrlhf_task_fns.py"))
    init = src / "__init__.py"
    init.write_text(_named("python", "amrlhf/evaluation/slots/capitals/__init__.py"))
    ns: dict = {"__file__": str(init), "__name__": "capitals"}
    exec(compile(init.read_text(), str(init), "exec"), ns)
    slot = ns["SLOT"]
    assert isinstance(slot, Slot) and slot.name == "capitals" and slot.task_yaml == src / "capitals_qa.yaml"
    target = slot.render(tmp_path / "out")
    assert target == tmp_path / "out" / "capitals"
    text = (target / "capitals_qa.yaml").read_text()
    assert "__DATA__" not in text
    task = yaml.safe_load(text.replace("!function ", ""))
    data = Path(task["dataset_kwargs"]["data_files"]["test"])
    assert data == target / "capitals_qa.jsonl" and task["task"] == slot.offline
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert rows[0] == {"country": "France", "capital": "Paris"} and len(rows) == 4
    assert task["filter_list"][0]["filter"][0]["filter_fn"] == "amrlhf_task_fns.stripped"
    hooks: dict = {}
    exec((target / "amrlhf_task_fns.py").read_text(), hooks)  # the copy lm-eval would load
    assert hooks["stripped"]([[" Paris", " Tokyo\n"]], [{}]) == [["Paris", "Tokyo"]]


def test_the_documented_study_measurement(tmp_path):
    """The heldout.py addition runs in that module's namespace on two hand-made items of the tiny model, against
    log-probs computed directly; the report pairs the new key by item identity and reads it lower-is-better."""
    import dataclasses

    import amrlhf.study.heldout as heldout
    from amrlhf.data.tokenize import Encoded
    from amrlhf.models import ModelSpec, load_causal_lm
    from amrlhf.study.report import higher_is_better, summarise

    ns = dict(vars(heldout))
    exec(_named("python", "amrlhf/study/heldout.py"), ns)
    model = load_causal_lm(ModelSpec(name="local:tiny-llama"), trainable=False)
    data = [Encoded(0, [1, 5, 6], [[7, 8, 2], [9, 2]]), Encoded(1, [1, 4], [[10, 11, 12, 2], [3, 2]])]
    spec = dataclasses.replace(heldout.Heldout(data="unused", batch_size=2), rows=[{"r": 0}, {"r": 1}])
    values, ids = ns["chosen_nll_items"](model, SimpleNamespace(pad_token_id=0), data, spec, "nll")
    assert ids == heldout.item_ids(spec, data) and list(values) == ["chosen_nll"]
    for e, got in zip(data, values["chosen_nll"], strict=True):
        seq = torch.tensor([e.prompt_ids + e.responses[0]])
        with torch.no_grad():
            lp = torch.log_softmax(model(seq).logits[0, :-1].float(), -1).gather(-1, seq[0, 1:, None])[:, 0]
        assert abs(got - float(-lp[len(e.prompt_ids) - 1:].mean())) < 1e-4

    key = "eval/nll/chosen_nll"
    assert not higher_is_better(key)
    study = SimpleNamespace(methods=[SimpleNamespace(name="dpo"), SimpleNamespace(name="am")], baseline="dpo",
                            seeds=[0, 1])

    def cell(method, seed, values, ids):
        return {"method": method, "seed": seed, "metrics": {key: sum(values) / len(values)}, "items": {key: values},
                "item_ids": {key: ids}}

    cells = [cell("dpo", 0, [1.0, 2.0], ["a", "b"]), cell("dpo", 1, [1.0, 3.0], ["a", "b"]),
             cell("am", 0, [0.5, 1.5], ["a", "b"]), cell("am", 1, [2.0, 0.5], ["b", "a"])]  # another order
    row = summarise(study, cells)[key]["am"]
    assert row["delta"] == pytest.approx(-0.625) and row["se_item"] == pytest.approx(0.125)
    assert row["higher_is_better"] is False and row["verdict"] == "within noise"
