"""Reward components: each checks one thing about a response and returns a float.

A component is called as `component.check(prompt, response, fields) -> float`: `prompt` is the row's prompt
as given (text or chat messages), `response` the decoded response (special tokens removed), `fields`
the prompt row's own fields (its reference answer). Each has a `name` (the `rewards/<name>/*` metrics).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from amrlhf.data.arithmetic import check_solution, step_verdicts
from amrlhf.errors import ConfigError
from amrlhf.evaluation.gsm_style import NO_ANSWER, extract_answer


def _field(fields: dict, key: str, component: str):
    if key not in fields:
        raise KeyError(f"the prompt row has no field '{key}' ({component} compares against it)")
    return fields[key]


class NumberAnswerReward:
    """1.0 when the response's final number (after `#### `, else the last number written; '1,200' and
    '1200.0' are 1200) equals the reference's, else 0.0. The reference is the row's `field`, read the
    same way (a bare number like gsm_style's `target`, or a worked answer ending in one)."""

    def __init__(self, field: str = "target", name: str = "number_answer"):
        self.field, self.name = field, name

    def check(self, prompt, response: str, fields: dict) -> float:
        expected = extract_answer(str(_field(fields, self.field, self.name)))
        if expected == NO_ANSWER:
            raise ValueError(f"field '{self.field}' holds no number: {str(fields[self.field])[:80]!r}")
        return float(extract_answer(response) == expected)


class ArithmeticAnswerReward:
    """arith_steps: 1.0 when the solution's answer (after `answer is`, else the last number) is the
    row's `answer`, else 0.0."""

    name = "arith_answer"

    def check(self, prompt, response: str, fields: dict) -> float:
        return float(bool(check_solution(response, int(_field(fields, "answer", self.name))).correct))


class ArithmeticStepsReward:
    """arith_steps, per-step correctness as one number: the share of the response's equations whose
    result is the true running total (a process verifier that knows the problem; `Check:` remarks
    count for their own arithmetic); 0.0 for a response without equations. The per-token version
    (each step's verdict at its tokens) is `amrlhf.scorers.ArithmeticStepScorer`."""

    name = "arith_steps"

    def check(self, prompt, response: str, fields: dict) -> float:
        verdicts = step_verdicts(response, int(_field(fields, "start", self.name)))
        return sum(v > 0 for _, v in verdicts) / len(verdicts) if verdicts else 0.0


class RegexReward:
    """A format reward: 1.0 when the response contains a match of `pattern` (Python `re.search`; with
    `full: true` the whole stripped response must match), else 0.0."""

    def __init__(self, pattern: str, full: bool = False, name: str = "format"):
        try:
            self.regex = re.compile(pattern, re.DOTALL)
        except re.error as exc:
            raise ConfigError(f"RegexReward: pattern {pattern!r} is not a regular expression: {exc}") from None
        self.full, self.name = full, name

    def check(self, prompt, response: str, fields: dict) -> float:
        found = self.regex.fullmatch(response.strip()) if self.full else self.regex.search(response)
        return float(found is not None)


class FunctionReward:
    """Any Python function as a reward component: `function: my_package.rewards.length_ok` in a recipe
    (an import path), called as f(prompt, response) -> float, or f(prompt, response, fields) with
    `with_fields: true`."""

    def __init__(self, function: Callable[..., float], with_fields: bool = False, name: str | None = None):
        if not callable(function):
            raise ConfigError(f"FunctionReward: {function!r} is not callable")
        self.function, self.with_fields = function, with_fields
        self.name = name or getattr(function, "__name__", "function")

    def check(self, prompt, response: str, fields: dict) -> float:
        if self.with_fields:
            return self.function(prompt, response, fields)
        return self.function(prompt, response)
