"""Right-padding collation with masks aligned to `input_ids[:, 1:]` (docs/method.md, conventions)."""

from __future__ import annotations

import torch

from amrlhf.data.tokenize import Encoded


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """rows of (prompt_ids, response_ids) -> input_ids [N, T], attention_mask [N, T],
    response_mask [N, T-1] (1 exactly where the predicted token is a response token)."""
    lengths = [len(p) + len(r) for p, r in rows]
    T = max(lengths)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), T), dtype=torch.long)
    response = torch.zeros((len(rows), T - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(rows):
        input_ids[i, : lengths[i]] = torch.tensor(p + r, dtype=torch.long)
        attention[i, : lengths[i]] = 1
        response[i, len(p) - 1 : lengths[i] - 1] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response}


class Collator:
    """Batches `Encoded` items. Each item's k-th response goes to block k of the batch:
    [chosen_1..chosen_B, rejected_1..rejected_B] for preferences (one forward pass), with
    labels +1 / -1; SFT batches are [completion_1..completion_B] with labels +1. Items with dataset token
    scores add `token_scores`, items with flawed-span labels `token_flawed` (both [N, T-1], aligned)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        n_resp = len(items[0].responses)
        rows = [(it.prompt_ids, it.responses[k]) for k in range(n_resp) for it in items]
        batch = pad_rows(rows, self.pad_id)
        sign = torch.tensor([1 if k == 0 else -1 for k in range(n_resp) for _ in items], dtype=torch.long)
        batch["labels"] = sign
        batch["index"] = torch.tensor([it.index for it in items], dtype=torch.long)
        batch["response_lengths"] = batch["response_mask"].sum(-1).long()
        if items[0].scores is not None:
            batch["token_scores"] = self._per_token(items, n_resp, batch, lambda it: it.scores)
            if items[0].prompt_score is not None:
                batch["prompt_scores"] = torch.tensor([it.prompt_score for _ in range(n_resp) for it in items])
        if items[0].flawed is not None:
            batch["token_flawed"] = self._per_token(items, n_resp, batch, lambda it: it.flawed)
        return batch

    @staticmethod
    def _per_token(items: list[Encoded], n_resp: int, batch: dict, values) -> torch.Tensor:
        """Per-response-token values of each item (`values(item)[k]` for its k-th response) placed at the
        response positions of the aligned [N, T-1] layout, 0 elsewhere."""
        out = torch.zeros_like(batch["response_mask"])
        for row, (k, it) in enumerate((k, it) for k in range(n_resp) for it in items):
            start = len(it.prompt_ids) - 1
            out[row, start:start + len(values(it)[k])] = torch.tensor(values(it)[k])
        return out


class PromptCollator:
    """Prompt-only batches (PPO, GRPO): `prompt_ids` [B, P] LEFT-padded (ready to generate from),
    `prompt_mask` [B, P], `index`, and `rows` (each prompt's {"source", "line", "prompt", "fields"}: what a
    verifiable reward checks against, and where an error points)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        width = max(len(it.prompt_ids) for it in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, it in enumerate(items):
            ids[i, width - len(it.prompt_ids):] = torch.tensor(it.prompt_ids, dtype=torch.long)
            mask[i, width - len(it.prompt_ids):] = 1
        return {"prompt_ids": ids, "prompt_mask": mask,
                "index": torch.tensor([it.index for it in items], dtype=torch.long),
                "rows": [it.row or {} for it in items]}
