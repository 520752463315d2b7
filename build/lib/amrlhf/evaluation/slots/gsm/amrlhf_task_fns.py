"""lm-eval `!function` hooks of the `gsm` slot (loaded by lm-eval from beside the rendered task YAML)."""

from amrlhf.evaluation.gsm_style import extract_answer


def gsm_answers(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Filter: each generation -> its normalised final number (or '[no answer]')."""
    return [[extract_answer(r) for r in resp] for resp, _ in zip(resps, docs, strict=True)]
