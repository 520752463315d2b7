"""What a study measures on its held-out split, per item so deltas can be paired across items:
preference (implicit reward against the base), greedy generations graded by a checker, and where a
method's masks fall against the known wrong spans (mask localisation)."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from amrlhf.data import Collator, encode_examples, read_examples
from amrlhf.data.records import iter_rows
from amrlhf.errors import AmrlhfError
from amrlhf.evaluation.localization import Localization, diff_token_mask, flagged_wrong, truth_tensor
from amrlhf.evaluation.preference import pair_logps, per_pair

log = logging.getLogger(__name__)
PREF_KEYS = ("implicit_acc", "implicit_margin", "lognorm_acc")


@dataclass
class Generation:
    """Greedy generations on the first `limit` held-out prompts, graded by `grader` (a class_path +
    init_args whose `grade(row, response) -> {metric: value}`)."""

    grader: dict
    limit: int = 100
    max_new_tokens: int = 128
    batch_size: int = 16


@dataclass
class Heldout:
    data: str
    limit: int | None = None
    max_length: int = 512
    batch_size: int = 4
    beta: float = 0.1
    spans: str | None = None  # row field with the rejected response's wrong character spans
    spans_through_end: bool = True  # a span reaching the text's end covers the end-of-turn token too
    generate: Generation | None = None
    rows: list = field(default_factory=list, repr=False)  # raw rows, filled by `load`
    examples: list = field(default_factory=list, repr=False)  # validated examples, filled by `load`

    def load(self, tokenizer):
        """-> encoded pairs (rows dropped for length are counted and logged)."""
        examples = read_examples(self.data, "preference", self.limit)
        raw = []
        for _, _, row in iter_rows(self.data):
            if len(raw) >= len(examples):
                break
            raw.append(row)
        self.rows = raw
        encoded, rep = encode_examples(examples, tokenizer, self.max_length)
        log.info(rep.describe(f"held-out ({self.data})", self.max_length))
        self.examples = examples
        return encoded


def instantiate(spec: dict):
    """{class_path, init_args} -> an instance (the study's injected components)."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise AmrlhfError(f"expected {{class_path: ..., init_args: {{...}}}}, got {spec!r}")
    module, _, name = spec["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise AmrlhfError(f"class_path '{spec['class_path']}' cannot be imported") from None
    return cls(**(spec.get("init_args") or {}))


def preference_items(policy, base_lp, data, pad_id: int, spec: Heldout, desc: str) -> dict[str, list[float]]:
    lp = pair_logps(policy, data, pad_id, spec.batch_size, desc=desc)
    return {k: v.tolist() for k, v in per_pair(base_lp, lp, spec.beta).items() if k in PREF_KEYS}


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, desc: str) -> list[str]:
    """Greedy continuations (decoded, special tokens removed). The generation config is built here
    alone; the checkpoint's generation_config is blanked for the call (transformers would fill unset
    fields from it)."""
    from transformers import GenerationConfig

    from amrlhf.rollout import left_pad, own_generation_config

    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    was_training = model.training
    model.eval()
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc):
        ids, attn = left_pad(prompts[start:start + batch_size], pad)
        width = ids.shape[1]
        with own_generation_config(model):
            gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=config)
        for seq in gen[:, width:].tolist():
            seq = seq[: seq.index(eos) + 1] if eos in seq else seq
            out.append(tokenizer.decode(seq, skip_special_tokens=True))
    model.train(was_training)
    return out


def generation_items(model, tokenizer, data, spec: Heldout, desc: str) -> tuple[dict[str, list[float]], list[str]]:
    gen = spec.generate
    grader = instantiate(gen.grader)
    items = data[: gen.limit]
    texts = greedy(model, tokenizer, [e.prompt_ids for e in items], gen.max_new_tokens, gen.batch_size, desc)
    out: dict[str, list[float]] = {}
    for e, text in zip(items, texts, strict=True):
        row = spec.rows[e.index]
        try:
            grades = grader.grade(row, text)
        except Exception as exc:
            raise AmrlhfError(f"{spec.data}: row {e.index + 1}: grader {gen.grader['class_path']} failed: "
                              f"{exc.__class__.__name__}: {exc}") from None
        for k, v in grades.items():
            out.setdefault(k, []).append(float(v))
    return out, texts


@torch.no_grad()
def localisation(module, tokenizer, data, spec: Heldout) -> dict[str, float] | None:
    """Micro precision / recall / F1 of the rejected tokens a method's segmenter flags (sigma = -1)
    against the tokens inside the known wrong spans; sample-wise flags every token. None when the
    module has no segmenter."""
    seg, scorer = module.segmenter, module.scorer
    if seg is None or not spec.spans:
        return None
    source = getattr(scorer, "source", scorer)  # a CachedScorer holds train/val scores only: score afresh
    if source is not None and source is not scorer:
        source.setup(module)
    truths = []
    for e in data:
        ex, row = spec.examples[e.index], spec.rows[e.index]
        if spec.spans not in row:
            raise AmrlhfError(f"{spec.data}: row {e.index + 1}: field '{spec.spans}' missing (held-out spans)")
        truths.append(diff_token_mask(tokenizer, ex, row[spec.spans], e.responses[1], spec.spans_through_end))
    keep = [i for i, t in enumerate(truths) if t is not None and any(t)]
    if len(keep) < len(data):
        log.warning("localisation: %d of %d held-out rows have no usable span and are left out", len(data) - len(keep),
                    len(data))
    collate, cell = Collator(tokenizer.pad_token_id), Localization()
    device = module.device
    for start in range(0, len(keep), spec.batch_size):
        rows = keep[start:start + spec.batch_size]
        batch = {k: v.to(device) for k, v in collate([data[i] for i in rows]).items()}
        kwargs = source.score(module, batch, "eval").as_kwargs() if source is not None else {}
        s = seg.segment(response_mask=batch["response_mask"], labels=batch["labels"], input_ids=batch["input_ids"],
                        **kwargs)
        rej = list(range(len(rows), 2 * len(rows)))
        resp = batch["response_mask"][rej].cpu()
        cell.tokens += int(resp.sum())
        cell.add(flagged_wrong(s.sigma[rej].cpu(), resp), truth_tensor([truths[i] for i in rows], batch, rej),
                 s.fell_back[rej].cpu())
    if source is not None and source is not scorer and hasattr(source, "_models"):
        source._models.clear()
    return cell.row()
