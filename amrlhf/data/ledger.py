"""A second controlled arithmetic task, for out-of-distribution checks of scorers trained on `arith_steps`:
stock-ledger problems whose wording, operations and step format all differ from `amrlhf.data.arithmetic`.

A problem is a shop's stock changed by 3-4 events: a delivery (add), sales (take away), half the stock sent
to another branch (divide by 2, only on an even count) or a bulk order (multiply by 4 or 5). A solution is
written in words, with no `=` sign and no `Step k:` lines: either running sentences ("We start with 40 jars.
After the delivery, 40 plus 15 makes 55. ...") or a tally ("- delivery: 40 plus 15 gives 55"), then
"So the shop ends with N jars."

- `chosen`: every step right.
- `rejected`: the same solution (same style) with one planted error at a random step (its result off by
  -10, -2, 2 or 10), carried forward, so the final count is wrong too. The later steps compute from the wrong
  value; where two halvings follow the error, the first leaves an odd wrong value and the second rounds it
  down (about 2% of rows): a second slip, inside the same wrong span.
  `rejected_spans`: the characters from the wrong number to the end of the response (as in `arith_steps`);
  `rejected_error_step`: which step (1-based). `chosen_flaw_spans` is empty: no minor flaws here.

Row i of a split is drawn from Random(hash(seed, "ledger", split, i)), so splits never share draws.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

SHOPS = ("bakery", "hardware store", "bookshop", "florist", "pharmacy", "toy shop", "grocer", "tea house")
GOODS = ("jars", "boxes", "crates", "bottles", "bags", "parcels", "tins", "rolls")
SPLITS = {"train": 2000, "val": 200, "heldout": 300}
WORDS = {"+": "plus", "-": "minus", "/": "divided by", "*": "times"}
OFFSETS = (-10, -2, 2, 10)


def _rng(seed: int, split: str, i: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}/ledger/{split}/{i}".encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


def apply(value: int, op: str, b: int) -> int:
    return {"+": value + b, "-": value - b, "*": value * b, "/": value // b}[op]


def make_problem(rng: random.Random) -> tuple[str, str, int, list[tuple[str, int, str]]]:
    """-> (question, goods, start, [(op, operand, event name), ...]); the count stays within 1..1000 and a
    halving always meets an even true count."""
    shop, goods = rng.choice(SHOPS), rng.choice(GOODS)
    total = start = 2 * rng.randint(10, 60)
    events, sentences = [], [f"A {shop} opens the week with {start} {goods} in stock."]
    for _ in range(rng.randint(3, 4)):
        choices = ["+", "-"] + (["/"] if total % 2 == 0 and total >= 40 else []) + (["*"] if total <= 150 else [])
        op = rng.choice(choices)
        if op == "+":
            b = 2 * rng.randint(3, 40)
            sentences.append(f"A delivery brings {b} more {goods}.")
            name = "the delivery"
        elif op == "-":
            b = 2 * rng.randint(1, min(total // 2 - 6, 30)) if total > 16 else 2
            sentences.append(f"Customers buy {b} {goods}.")
            name = "the sales"
        elif op == "/":
            b = 2
            sentences.append("Half of the stock is sent to another branch.")
            name = "sending half away"
        else:
            b = rng.choice([4, 5])
            sentences.append(f"A bulk order multiplies the stock by {b}.")
            name = "the bulk order"
        total = apply(total, op, b)
        events.append((op, b, name))
    question = " ".join(sentences) + f" How many {goods} does the {shop} have at the end?"
    return question, goods, start, events


def render(start: int, goods: str, events: list[tuple[str, int, str]], style: int,
           error: tuple[int, int] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Write the solution; error = (step index, offset): that step's result is off by `offset`, later steps carry
    it. -> (text, [(start, end) of each step's result number])."""
    text, spans, value = (f"We start with {start} {goods}." if style == 0 else f"Opening stock: {start}"), [], start
    for k, (op, b, name) in enumerate(events):
        result = apply(value, op, b) + (error[1] if error and error[0] == k else 0)
        if style == 0:
            lead = f" After {name}, {value} {WORDS[op]} {b} makes "
        else:
            lead = f"\n- {name.removeprefix('the ')}: {value} {WORDS[op]} {b} gives "
        text += lead
        spans.append((len(text), len(text) + len(str(result))))
        text += str(result) + ("." if style == 0 else "")
        value = result
    text += f"{' ' if style == 0 else chr(10)}So the shop ends with {value} {goods}."
    return text, spans


def make_row(rng: random.Random) -> dict:
    question, goods, start, events = make_problem(rng)
    answer = start
    for op, b, _ in events:
        answer = apply(answer, op, b)
    style, k, offset = rng.randrange(2), rng.randrange(len(events)), rng.choice(OFFSETS)
    chosen, _ = render(start, goods, events, style)
    rejected, spans = render(start, goods, events, style, error=(k, offset))
    return {
        "prompt": f"Work it out in words, one event at a time, then give the final count.\n{question}",
        "chosen": chosen, "rejected": rejected, "answer": answer, "start": start,
        "rejected_error_step": k + 1, "rejected_error_number": list(spans[k]),
        "rejected_spans": [[spans[k][0], len(rejected)]], "chosen_flaw_spans": [],
    }


def generate(split: str, n: int, seed: int = 0) -> list[dict]:
    return [make_row(_rng(seed, split, i)) for i in range(n)]


def build(out: Path, seed: int = 0) -> dict:
    """`amrlhf prepare arith_ledger`: train / val / heldout JSONL with spans."""
    counts = {}
    for split, n in SPLITS.items():
        rows = generate(split, n, seed)
        with open(out / f"{split}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        counts[split] = len(rows)
    return {"source": "generated (amrlhf.data.ledger)", "seed": seed, "rows": counts, "licence": "project's own"}
