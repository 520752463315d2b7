"""lm-eval `!function` hooks of the `humaneval` slot (loaded by lm-eval from beside the rendered task YAML)."""

from amrlhf.evaluation.humaneval import score


def keep_all(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Filter: keep every generated sample of a document (pass@k needs all n of them)."""
    return [list(resp) for resp, _ in zip(resps, docs, strict=True)]


def humaneval_results(doc: dict, results: list) -> dict[str, float]:
    """Per document: run each completion in the sandbox (refused without the opt-in), -> pass@1."""
    completions = results[0] if isinstance(results[0], list) else list(results)
    return score(doc, completions)
