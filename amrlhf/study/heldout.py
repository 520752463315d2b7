"""What a study measures on its held-out split, per item so deltas can be paired across items:
preference (implicit reward against the base), greedy generations graded by a checker, teacher-forced
accuracy on marked spans of the right answer (e.g. every step's result), and where a method's masks fall
against the known wrong spans (mask localisation)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import re
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from amrlhf.data import Collator, encode_examples, read_examples
from amrlhf.data.records import iter_rows
from amrlhf.data.tokenize import response_offsets
from amrlhf.errors import AmrlhfError
from amrlhf.evaluation.localization import (
    Localization,
    diff_token_mask,
    flagged_wrong,
    span_of_token,
    truth_tensor,
)
from amrlhf.evaluation.preference import pair_logps, per_pair
from amrlhf.models.forward import lean_forward
from amrlhf.modules.context import scoring_context
from amrlhf.sampling import left_pad, own_generation_config

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
class Marked:
    """Teacher-forced accuracy on marked spans of the chosen (right) response. `spans` is a class_path +
    init_args whose `spans(row) -> [(start, end), ...]` marks character spans of the row's chosen text (e.g.
    `amrlhf.data.arithmetic.ResultSpans`: every step's result). Per item, given the right prefix:
    `marked_acc`, the share of its spans whose every token is the policy's greedy (argmax) choice, and
    `marked_logp`, the mean log-prob of the marked tokens. It asks whether the policy still computes the
    right thing where it matters, free of whether it writes the format (greedy generations may not)."""

    spans: dict
    limit: int | None = None


class RegexSpans:
    """Marks what `pattern` matches (its capture `group`, 0 = the whole match) in a row's chosen text: a generic
    `Marked.spans` component."""

    def __init__(self, pattern: str, group: int = 0):
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise AmrlhfError(f"RegexSpans: pattern {pattern!r} does not compile: {exc}") from None
        self.group = group

    def spans(self, row: dict) -> list[tuple[int, int]]:
        return [m.span(self.group) for m in self.pattern.finditer(row["chosen"])]


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
    marked: Marked | None = None
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


def row_id(row: dict) -> str:
    """A held-out row's content hash (the same row in any file or order gets the same hash)."""
    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def row_ids(rows: list[dict]) -> list[str]:
    """Each held-out item's identity: its content hash, and `#k` for the k-th repeat of identical rows, so
    per-item values are paired by item (never by position) and repeated rows stay distinct items."""
    seen: dict[str, int] = {}
    out = []
    for row in rows:
        h = row_id(row)
        seen[h] = seen.get(h, 0) + 1
        out.append(h if seen[h] == 1 else f"{h}#{seen[h] - 1}")
    return out


def data_sha256(source: str) -> str:
    """A hash of every row of a data source, in order: a study's fingerprint notices an edited or swapped file."""
    h = hashlib.sha256()
    for _, _, row in iter_rows(source):
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def item_ids(spec: Heldout, items) -> list[str]:
    """The identities of encoded held-out items (`row_ids` of the raw rows)."""
    ids = row_ids(spec.rows)
    return [ids[e.index] for e in items]


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


def base_preference_items(base_lp, spec: Heldout) -> dict[str, list[float]]:
    """The untrained policy scored against itself: its implicit-reward accuracy is 0.5 (all ties) and margin 0 by
    construction; its length-normalised accuracy, and the length-only rule (shorter answer chosen), a floor."""
    return {k: v.tolist() for k, v in per_pair(base_lp, base_lp, spec.beta).items()}


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, desc: str) -> list[str]:
    """Greedy continuations (decoded, special tokens removed). The generation config is built here
    alone; the checkpoint's generation_config is blanked for the call (transformers would fill unset
    fields from it)."""
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


def generation_items(model, tokenizer, data, spec: Heldout, desc: str) \
        -> tuple[dict[str, list[float]], list[str], list[str]]:
    """-> per-item grades, the generated texts, the items' identities (`row_id`)."""
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
    return out, texts, item_ids(spec, items)


def marked_rows(tokenizer, data, spec: Heldout) -> list[tuple]:
    """The held-out items `marked_items` scores, with each response token's span (-1: none): those with at least
    one marked token that lines up with the tokens (the others are counted and logged)."""
    finder, where = instantiate(spec.marked.spans), spec.marked.spans["class_path"]
    items = data[: spec.marked.limit] if spec.marked.limit else data
    owned = []
    for e in items:
        ex, row = spec.examples[e.index], spec.rows[e.index]
        try:
            spans = [(int(a), int(b)) for a, b in finder.spans(row)]
        except Exception as exc:
            raise AmrlhfError(f"{spec.data}: row {e.index + 1}: {where} failed: {exc.__class__.__name__}: {exc}") \
                from None
        offsets = response_offsets(tokenizer, ex, e.responses[0], "chosen")
        owner = span_of_token(offsets, spans, len(ex.chosen)) if offsets is not None else []
        if any(k >= 0 for k in owner):
            owned.append((e, owner))
    if len(owned) < len(items):
        log.warning("marked spans: %d of %d held-out rows have no marked token that lines up and are left out",
                    len(items) - len(owned), len(items))
    return owned


@torch.no_grad()
def marked_items(model, tokenizer, data, spec: Heldout, desc: str) -> tuple[dict[str, list[float]], list[str]]:
    """Per held-out item (those with at least one marked token; the others are counted and logged):
    `marked_acc` and `marked_logp` (see `Marked`), and the items' identities (`row_id`)."""
    owned = marked_rows(tokenizer, data, spec)
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    collate, out = Collator(tokenizer.pad_token_id), {"marked_acc": [], "marked_logp": []}
    for start in tqdm(range(0, len(owned), spec.batch_size), desc=desc):
        chunk = owned[start:start + spec.batch_size]
        batch = collate([dataclasses.replace(e, responses=[e.responses[0]]) for e, _ in chunk])
        batch = {k: v.to(device) for k, v in batch.items()}
        f = lean_forward(model, batch, logits_stats=True)
        for i, (_, owner) in enumerate(chunk):
            pos = batch["response_mask"][i].bool().nonzero().squeeze(1)[: len(owner)]
            hits, logps = f.hits[i, pos].cpu().tolist(), f.logps[i, pos].float().cpu().tolist()
            right: dict[int, bool] = {}
            for k, hit in zip(owner, hits, strict=False):
                if k >= 0:
                    right[k] = right.get(k, True) and hit == 1.0
            marked = [lp for k, lp in zip(owner, logps, strict=False) if k >= 0]
            out["marked_acc"].append(sum(right.values()) / len(right))
            out["marked_logp"].append(sum(marked) / len(marked))
    model.train(was_training)
    return out, item_ids(spec, [e for e, _ in owned])


@torch.no_grad()
def localisation(module, tokenizer, data, spec: Heldout) -> dict[str, float] | None:
    """Micro precision / recall / F1 of the rejected tokens a method's segmenter flags (sigma = -1)
    against the tokens inside the known wrong spans; sample-wise flags every token. None when the
    module has no segmenter."""
    if module.segmenter is None or not spec.spans:
        return None
    masker = module.masker.uncached()  # a CachedScorer holds train/val scores only: score afresh
    fresh = masker is not module.masker
    if fresh:
        masker.setup(scoring_context(module))
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
        s = masker.mask(batch, "eval", observe=False).segmentation
        rej = list(range(len(rows), 2 * len(rows)))
        resp = batch["response_mask"][rej].cpu()
        cell.tokens += int(resp.sum())
        cell.add(flagged_wrong(s.sigma[rej].cpu(), resp), truth_tensor([truths[i] for i in rows], batch, rej),
                 s.fell_back[rej].cpu())
    if fresh:
        masker.release()
    return cell.row()
