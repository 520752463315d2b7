"""Shared-prefix packing: rows that begin with the same tokens (a preference pair's prompt, and any common
start of its two responses) are run through the decoder as ONE packed sequence, so the prefix is computed
once, forward and backward.

A group of rows r_1..r_k with a common prefix of c columns becomes one packed row

    [ prefix (columns 0..c-1) | row 1 from column c | ... | row k from column c ]

Every packed token keeps its original column as its position id, and a 4D attention mask lets a token see
exactly what it saw in its own row: earlier valid tokens of the prefix, and earlier valid tokens of its own
suffix (never another row's). The decoder's output at each (row, column) is then read back from the packed
sequence by one index. Values at a row's padding are not meaningful (as in the padded batch); a packed
padding token attends to itself only, so everything stays finite.

The result equals the padded batch's up to float32 summation order (tests/test_shared_prefix.py). What it
saves is the prefix's repeats and the padding: for DPO, 2 x (prompt + longest response) positions per pair
become prompt + chosen + rejected. Attention then runs over the packed length, with a dense mask, so
packing is used only where it runs fewer positions than the padded batch. docs/performance.md.

A group is packed whole while its packed length stays within twice the padded row length (always, for a
pair); a larger group (GRPO's G responses to one prompt) is split into runs that fit (`bounded`).

Pure functions of token ids and masks; `lean_forward(..., share_prefix=True)` uses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Packing:
    """input_ids, position_ids [G, L]; allowed [G, 1, L, L] (query may attend key); index [N, T]: where
    each (row, column) of the padded batch is in the flattened packed sequence (g * L + l)."""

    input_ids: Tensor
    position_ids: Tensor
    allowed: Tensor
    index: Tensor

    @property
    def positions(self) -> int:
        return self.input_ids.numel()


def item_groups(batch: dict) -> list[list[int]] | None:
    """Rows that share a prompt. A preference batch holds block k of item i at row k * B + i (the Collator's
    layout, B = len(batch["index"])); a rollout has one `index` per row, equal within a prompt's group (its
    rows in any order, as in a shuffled mini-batch). None where no two rows share an item (nothing to share)."""
    index = batch.get("index")
    if index is None:
        return None
    n, b = batch["input_ids"].shape[0], index.shape[0]
    if b == n:
        by_item: dict[int, list[int]] = {}
        for row, item in enumerate(index.tolist()):
            by_item.setdefault(item, []).append(row)
        groups = list(by_item.values())
        return groups if len(groups) < n else None
    if b == 0 or n % b:
        return None
    return [[k * b + i for k in range(n // b)] for i in range(b)]


def bounded(ids: Tensor, mask: Tensor, rows: list[int], max_length: int) -> list[list[int]]:
    """A group split, in order, into runs whose packed length (their common prefix once, then each row's
    rest) is at most `max_length` (a run of one row may be longer): a group of many long responses would
    otherwise pack into one sequence whose attention costs more than it saves."""
    runs, current = [], []
    for r in rows:
        trial = current + [r]
        c = common_prefix(ids, mask, trial)
        if current and c + sum(row_end(mask[x]) - c for x in trial) > max_length:
            runs.append(current)
            trial = [r]
        current = trial
    return runs + [current]


def common_prefix(ids: Tensor, mask: Tensor, rows: list[int]) -> int:
    """Columns from 0 on where the rows have the same tokens and the same attention mask, no further than
    the shortest row's last valid column + 1."""
    sub_ids, sub_mask = ids[rows], mask[rows]
    same = (sub_ids == sub_ids[:1]).all(0) & (sub_mask == sub_mask[:1]).all(0)
    differs = (~same).nonzero()
    c = int(differs[0]) if differs.numel() else ids.shape[1]
    return min(c, min(row_end(mask[r]) for r in rows))


def row_end(mask_row: Tensor) -> int:
    """One past the last valid column of a row (0 for an empty row)."""
    valid = mask_row.nonzero()
    return int(valid[-1]) + 1 if valid.numel() else 0


def pack(ids: Tensor, mask: Tensor, groups: list[list[int]]) -> Packing:
    """The packed batch for `groups` (a partition of the rows of ids / mask [N, T])."""
    N, T = ids.shape
    seqs = []  # per group: (tokens, positions, valid, segment), one list each
    col_maps: dict[int, list[int]] = {}
    for rows in groups:
        c = common_prefix(ids, mask, rows)
        seq: tuple[list, list, list, list] = ([], [], [], [])
        _extend(seq, ids, mask, rows[0], 0, c, 0)
        for k, r in enumerate(rows, start=1):
            offset, end = len(seq[0]), row_end(mask[r])
            _extend(seq, ids, mask, r, c, end, k)
            # columns < c read the prefix; c..end-1 this row's suffix; padding reads packed position 0
            col_maps[r] = list(range(c)) + list(range(offset, offset + end - c)) + [0] * (T - max(end, c))
        seqs.append(seq)
    L = max(len(s[0]) for s in seqs)
    G = len(groups)
    out_ids = torch.zeros(G, L, dtype=ids.dtype)
    out_pos = torch.zeros(G, L, dtype=torch.long)
    out_valid = torch.zeros(G, L, dtype=torch.bool)
    out_seg = torch.full((G, L), -1, dtype=torch.long)
    for g, (tokens, pos, valid, seg) in enumerate(seqs):
        n = len(tokens)
        out_ids[g, :n] = torch.tensor(tokens, dtype=ids.dtype)
        out_pos[g, :n] = torch.tensor(pos, dtype=torch.long)
        out_valid[g, :n] = torch.tensor(valid, dtype=torch.bool)
        out_seg[g, :n] = torch.tensor(seg, dtype=torch.long)
    q_pos, k_pos = out_pos[:, :, None], out_pos[:, None, :]
    q_seg, k_seg = out_seg[:, :, None], out_seg[:, None, :]
    allowed = (k_pos <= q_pos) & out_valid[:, None, :] & (q_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg))
    allowed |= torch.eye(L, dtype=torch.bool)  # no query is left with nothing to attend to
    index = torch.zeros(N, T, dtype=torch.long)
    for g, rows in enumerate(groups):
        for r in rows:
            index[r] = g * L + torch.tensor(col_maps[r], dtype=torch.long)
    dev = ids.device
    return Packing(out_ids.to(dev), out_pos.to(dev), allowed[:, None].to(dev), index.to(dev))


def _extend(seq: tuple[list, list, list, list], ids: Tensor, mask: Tensor, row: int, start: int, stop: int,
            segment: int) -> None:
    """Append columns start..stop-1 of a row to a packed sequence, with their positions (the columns),
    validity and segment (0: the shared prefix, k: the group's k-th row)."""
    tokens, pos, valid, seg = seq
    tokens.extend(ids[row, start:stop].tolist())
    pos.extend(range(start, stop))
    valid.extend(mask[row, start:stop].bool().tolist())
    seg.extend([segment] * (stop - start))


def attention_mask_for(allowed: Tensor, implementation: str, dtype: torch.dtype) -> Tensor | None:
    """The 4D mask in the form the model's attention takes: boolean for SDPA, additive (0 / dtype min) for
    eager; None for any other implementation (flash-attention kernels take no 4D mask)."""
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return None
