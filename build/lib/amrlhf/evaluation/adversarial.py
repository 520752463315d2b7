"""Trick questions with one verifiable answer, generated deterministically from a seed: decimal
comparison ("Which is bigger, 9.8 or 9.11?"), letter counting, relative-day logic, and equal-mass
riddles. Rows: {"question", "answer", "kind"}."""

from __future__ import annotations

import random

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
OFFSETS = {"yesterday": -1, "tomorrow": 1, "the day after tomorrow": 2, "the day before yesterday": -2}
WORDS = ["strawberry", "bookkeeper", "mississippi", "committee", "banana", "parallel", "successful",
         "assessment", "raspberry", "balloon", "coffee", "programming", "millennium", "occurrence", "tattoo"]
MASSES = [("feathers", "steel"), ("cotton", "iron"), ("popcorn", "bricks"), ("paper", "lead")]
UNITS = ["kilogram", "pound", "ton"]


def decimals(rng: random.Random) -> dict:
    n = rng.randint(1, 20)
    d1 = rng.randint(2, 9)
    e = rng.randint(10, 10 * d1 - 1)  # two decimals that "look" bigger but are smaller
    a, b = f"{n}.{d1}", f"{n}.{e:02d}"
    first, second = (a, b) if rng.random() < 0.5 else (b, a)
    return {"question": f"Which is bigger, {first} or {second}? Answer with the number only.", "answer": a,
            "kind": "decimal_compare"}


def letters(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted({c for c in word if word.count(c) >= 2}))
    return {"question": f'How many times does the letter "{letter}" appear in the word "{word}"? '
                        "Answer with a number only.", "answer": str(word.count(letter)), "kind": "letter_count"}


def days(rng: random.Random) -> dict:
    today = rng.randrange(7)
    p1, p2 = rng.sample(list(OFFSETS), 2)
    answer = DAYS[(today + OFFSETS[p1] + OFFSETS[p2]) % 7]
    return {"question": f"If today is {DAYS[today]}, what day is {p2} of {p1}? Answer with the day only.",
            "answer": answer, "kind": "relative_day"}


def masses(rng: random.Random) -> dict:
    light, heavy = rng.choice(MASSES)
    unit = rng.choice(UNITS)
    a, b = (light, heavy) if rng.random() < 0.5 else (heavy, light)
    return {"question": f"Which is heavier, a {unit} of {a} or a {unit} of {b}? Answer '{a}', '{b}' or 'equal'.",
            "answer": "equal", "kind": "equal_mass"}


GENERATORS = (decimals, letters, days, masses)


def adversarial_rows(n: int = 200, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [GENERATORS[i % len(GENERATORS)](rng) for i in range(n)]
