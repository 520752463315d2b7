"""lm-eval `!function` hooks of the project's offline tasks. lm-eval loads `!function NAME.fn` from
NAME.py beside the task YAML, so amrlhf copies this file next to the rendered YAMLs; the logic lives
in the package (amrlhf.evaluation.*)."""

from amrlhf.evaluation.gsm_style import extract_answer
from amrlhf.evaluation.humaneval import score


def gsm_answers(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Filter: each generation -> its normalised final number (or '[no answer]')."""
    return [[extract_answer(r) for r in resp] for resp, _ in zip(resps, docs, strict=True)]


def keep_all(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Filter: keep every generated sample of a document (pass@k needs all n of them)."""
    return [list(resp) for resp, _ in zip(resps, docs, strict=True)]


def humaneval_results(doc: dict, results: list) -> dict[str, float]:
    """Per document: run each completion in the sandbox (refused without the opt-in), -> pass@1."""
    completions = results[0] if isinstance(results[0], list) else list(results)
    return score(doc, completions)
