"""Reading rows (JSONL file, prepared `local:` asset, or hub dataset) into validated examples.

A malformed row is a `DataError` naming the file, the line and the field. Rows are never
dropped silently: what is filtered later (length) is counted and reported.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from amrlhf.assets import resolve_local
from amrlhf.errors import AmrlhfError, DataError
from amrlhf.paths import is_local_id

log = logging.getLogger(__name__)

Messages = list[dict]


@dataclass
class Example:
    """One prompt with one or two responses. `prompt` is plain text or chat messages;
    responses are plain text (the content of the final assistant turn)."""

    source: str
    line: int
    prompt: str | Messages
    chosen: str | None  # None for a prompt-only row (PPO)
    rejected: str | None = None
    token_scores: dict[str, list[float]] | None = None  # per response token, from the data set
    prompt_score: float | None = None
    fields: dict | None = None  # a prompt row's own fields (reference answers for verifiable rewards)
    spans: dict[str, list[tuple[int, int]]] | None = None  # {side: flawed character spans} (token-level labels)


def iter_rows(source: str) -> Iterator[tuple[str, int, dict]]:
    """Yield (source name, line/row number from 1, row dict)."""
    if is_local_id(source):
        yield from _iter_jsonl(resolve_local(source, "data"))
        return
    path = Path(source).expanduser()
    if path.suffix in {".jsonl", ".json"} or path.exists():
        if not path.is_file():
            raise AmrlhfError(f"data file not found: {source}")
        yield from _iter_jsonl(path)
        return
    yield from _iter_hub(source)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, int, dict]]:
    name = str(path)
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(name, number, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(name, number, None, f"not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(name, number, None, f"expected a JSON object, got {type(row).__name__}")
            yield name, number, row


def _iter_hub(spec: str) -> Iterator[tuple[str, int, dict]]:
    """`org/name[:split]` through `datasets.load_dataset`."""
    import datasets

    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # datasets raises many types for "not found / offline"
        raise AmrlhfError(
            f"could not load dataset '{spec}' ({exc.__class__.__name__}: {str(exc).splitlines()[0]}); "
            "offline, use a JSONL file or a prepared `local:` asset"
        ) from exc
    for i, row in enumerate(ds, start=1):
        yield spec, i, dict(row)


def _text(row: dict, key: str, src: str, line: int, *, required: bool = True) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise DataError(src, line, key, "missing")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise DataError(src, line, key, f"expected text, got {type(value).__name__}")
    return value


def _messages(value, src: str, line: int, key: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise DataError(src, line, key, "expected a non-empty list of {role, content} messages")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise DataError(src, line, f"{key}[{i}]", "expected a message {\"role\": str, \"content\": str}")
    return value


def _response(row: dict, key: str, src: str, line: int) -> tuple[Messages | None, str]:
    """A response is text, or messages whose LAST turn is the assistant's response;
    earlier turns (if any) are the prompt."""
    if key not in row or row[key] is None:
        raise DataError(src, line, key, "missing")
    value = row[key]
    if isinstance(value, str):
        text, history = value, None
    else:
        msgs = _messages(value, src, line, key)
        if msgs[-1]["role"] != "assistant":
            raise DataError(src, line, key, f"the last message must be the assistant's, got '{msgs[-1]['role']}'")
        text, history = msgs[-1]["content"], msgs[:-1] or None
    if not text.strip():
        raise DataError(src, line, key, "empty response")
    return history, text


def _prompt(row: dict, history: Messages | None, src: str, line: int) -> str | Messages:
    if "prompt" in row and row["prompt"] is not None:
        value = row["prompt"]
        if isinstance(value, str):
            if not value.strip():
                raise DataError(src, line, "prompt", "empty prompt")
            return value
        return _messages(value, src, line, "prompt")
    if history:
        return history
    raise DataError(src, line, "prompt", "missing (and the responses carry no earlier turns)")


def preference_example(src: str, line: int, row: dict) -> Example:
    hist_c, chosen = _response(row, "chosen", src, line)
    hist_r, rejected = _response(row, "rejected", src, line)
    if hist_c != hist_r:
        raise DataError(src, line, "rejected", "the conversation before the last turn differs from 'chosen'")
    return Example(src, line, _prompt(row, hist_c, src, line), chosen, rejected)


def sft_example(src: str, line: int, row: dict, completion_field: str | None = None) -> Example:
    """`prompt` + `completion`, or `messages`; with `completion_field` (e.g. `chosen` or `rejected` of a
    preference row), that field is the response trained on, after `prompt` (or its own earlier turns)."""
    if completion_field is not None:
        hist, completion = _response(row, completion_field, src, line)
        return Example(src, line, _prompt(row, hist, src, line), completion)
    if "messages" in row:
        hist, completion = _response(row, "messages", src, line)
        if not hist:
            raise DataError(src, line, "messages", "needs at least one turn before the assistant's")
        return Example(src, line, hist, completion)
    _, completion = _response(row, "completion", src, line)
    return Example(src, line, _prompt(row, None, src, line), completion)


def prompt_example(src: str, line: int, row: dict, template: str | None = None) -> Example:
    """A prompt to answer (PPO, GRPO): `prompt` (text or messages), or `messages` (the turns before a
    final assistant turn, or all of them), or the earlier turns of a chat `chosen`; with `template`, the
    prompt is `template.format(**row)` (e.g. "{question}" for rows without a `prompt`). Responses are
    ignored; the row's fields are kept (a verifiable reward reads its reference answer there)."""
    if template is not None:
        try:
            return Example(src, line, template.format(**row), None, fields=row)
        except KeyError as exc:
            raise DataError(src, line, exc.args[0], f"missing: data.prompt_template {template!r} needs it") from None
        except (IndexError, ValueError, AttributeError) as exc:
            raise AmrlhfError(f"data.prompt_template {template!r} is not a format string over row fields: {exc}"
                              ) from None
    if row.get("prompt") is None:
        for key in ("messages", "chosen"):
            if isinstance(row.get(key), list):
                msgs = _messages(row[key], src, line, key)
                turns = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
                if turns:
                    return Example(src, line, turns, None, fields=row)
    return Example(src, line, _prompt(row, None, src, line), None, fields=row)


def _score_list(row: dict, key: str, src: str, line: int) -> list[float]:
    value = row.get(key)
    if not isinstance(value, list) or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in value):
        raise DataError(src, line, key, "expected a list of numbers (one per response token)")
    return [float(x) for x in value]


def attach_token_scores(ex: Example, row: dict) -> Example:
    """Per-token scores shipped in the row: `<response>_token_scores`, optional `prompt_score`."""
    names = ["chosen"] + (["rejected"] if ex.rejected is not None else [])
    ex.token_scores = {n: _score_list(row, f"{n}_token_scores", ex.source, ex.line) for n in names}
    if row.get("prompt_score") is not None:
        if not isinstance(row["prompt_score"], int | float):
            raise DataError(ex.source, ex.line, "prompt_score", "expected a number")
        ex.prompt_score = float(row["prompt_score"])
    return ex


def attach_spans(ex: Example, row: dict, span_fields: dict[str, str]) -> Example:
    """Flawed character spans per response side, read from the row fields `span_fields` names ({side: field},
    e.g. {"rejected": "rejected_spans"}); every [start, end) must lie inside that side's text. A side not
    named has no flawed span."""
    ex.spans = {}
    for side, key in span_fields.items():
        text = getattr(ex, side, None)
        if side not in ("chosen", "rejected") or text is None:
            raise DataError(ex.source, ex.line, key, f"names spans of '{side}', which this row has no text for")
        value = row.get(key)
        if not isinstance(value, list) or not all(
                isinstance(sp, list | tuple) and len(sp) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                     for x in sp) for sp in value):
            raise DataError(ex.source, ex.line, key, "expected a list of [start, end] character offsets")
        for a, b in value:
            if not 0 <= a < b <= len(text):
                raise DataError(ex.source, ex.line, key, f"span [{a}, {b}] is not inside the {len(text)}-character "
                                f"'{side}' text")
        ex.spans[side] = [(a, b) for a, b in value]
    return ex


def read_examples(source: str, kind: str, limit: int | None = None, token_scores: bool = False,
                  prompt_template: str | None = None, completion_field: str | None = None,
                  span_fields: dict[str, str] | None = None, skip: int = 0) -> list[Example]:
    """Read and validate every row (up to `limit`, after the first `skip` rows, which are not read);
    kind is 'preference', 'sft' or 'prompt'.
    With `token_scores`, rows must carry per-token scores (see `attach_token_scores`); `prompt_template`
    (prompt rows only) builds each prompt from the row's fields; `completion_field` (sft rows only) names
    the field trained on; `span_fields` ({side: field}) reads flawed character spans (`attach_spans`)."""
    parse = {"preference": preference_example, "sft": sft_example, "prompt": prompt_example}[kind]
    if completion_field is not None:
        if kind != "sft":
            raise AmrlhfError("completion_field applies to SFT rows only")
        def parse(src, line, row):  # noqa: E306
            return sft_example(src, line, row, completion_field)
    if prompt_template is not None:
        if kind != "prompt":
            raise AmrlhfError("prompt_template applies to prompt rows only")
        def parse(src, line, row):  # noqa: E306
            return prompt_example(src, line, row, prompt_template)
    out, skipped = [], 0
    for src, line, row in iter_rows(source):
        if skipped < skip:
            skipped += 1
            continue
        if limit is not None and len(out) >= limit:
            break
        ex = parse(src, line, row)
        ex = attach_token_scores(ex, row) if token_scores else ex
        out.append(attach_spans(ex, row, span_fields) if span_fields else ex)
    if not out:
        if skip:
            raise AmrlhfError(f"{source}: data.skip_train={skip} passes over all of its {skipped} rows")
        raise AmrlhfError(f"no rows in {source}")
    if skip and limit is not None and len(out) < limit:
        log.warning("%s: %d rows after the first %d (skip_train), fewer than limit_train=%d", source, len(out), skip,
                    limit)
    log.info("read %d %s rows from %s%s", len(out), kind, source, f" after its first {skip}" if skip else "")
    return out
