"""The token-level view of what a segmenter keeps and masks: one HTML page, chosen and rejected
side by side, per-token scores in tooltips, pivot tokens outlined, kept spans green, masked grey; soft weights
(any weight other than 0 or 1) shaded by weight, pale below 1 and dark above, with the weight in the tooltip."""

from __future__ import annotations

import html
import logging
import tempfile
from pathlib import Path

import lightning as L
import torch

from amrlhf.segmenters import Segmentation
from amrlhf.tracking import RunWriter

log = logging.getLogger(__name__)

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}
table{border-collapse:collapse;width:100%} td{vertical-align:top;padding:.5em;border-top:1px solid #ddd;width:50%}
.tok{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px;line-height:1.9;padding:1px 0}
.keep{background:#c8efc8}.mask{background:#e4e4e4;color:#777}.pivot{outline:2px solid #d33;outline-offset:-1px}
.prompt{color:#555;font-size:12px;white-space:pre-wrap;max-height:6em;overflow:auto}
.meta{color:#555;font-size:12px}.fb{color:#b60}
"""


def _shade(w: float) -> str:
    """A green whose depth follows the weight: 0.5 and below pale, 1 the kept green, 1.5 and above dark."""
    alpha = min(max((w - 0.5) / 1.0, 0.0), 1.0) * 0.85 + 0.15
    return f' style="background:rgba(46,160,67,{alpha:.2f})"'


def _row_html(tokens: list[str], weights: list[float], pivot: list[bool], scores: list[float | None],
              soft: bool) -> str:
    parts = []
    for tok, w, p, s in zip(tokens, weights, pivot, scores, strict=True):
        cls = "tok " + ("keep" if w > 0 else "mask") + (" pivot" if p else "")
        tip = ([] if s is None else [f"score {s:.3f}"]) + ([f"weight {w:.3f}"] if soft else []) + \
            (["pivot"] if p else [])
        title = f' title="{", ".join(tip)}"' if tip else ""
        style = _shade(w) if soft and w > 0 else ""
        parts.append(f'<span class="{cls}"{title}{style}>{html.escape(tok)}</span>')
    return "".join(parts)


def render_page(title: str, header: str, pairs: list[dict]) -> str:
    """pairs: [{"prompt": str, "chosen": row, "rejected": row}] with row = {"tokens", "weights", "pivot",
    "scores", "fell_back", "kept_frac"}; weights other than 0 and 1 anywhere make the page show soft weights."""
    soft = any(w not in (0.0, 1.0) for pair in pairs for side in ("chosen", "rejected") if pair.get(side)
               for w in pair[side]["weights"])
    body = [f"<h2>{html.escape(title)}</h2><p class='meta'>{html.escape(header)}</p>",
            ("<p class='meta'>soft token weights: " + "".join(f"<span class='tok keep'{_shade(w)}>{w:.1f}</span> "
                                                               for w in (0.5, 0.7, 1.0, 1.3, 1.5))
             + "<span class='tok mask'>0</span>; hover a token for its score and weight.</p>") if soft else
            "<p class='meta'><span class='tok keep'>kept</span> <span class='tok mask'>masked</span> "
            "<span class='tok keep pivot'>pivot token</span>; hover a token for its score.</p>",
            "<table><tr><th>chosen (label +1)</th><th>rejected (label -1)</th></tr>"]
    for i, pair in enumerate(pairs):
        body.append(f"<tr><td colspan=2><div class='prompt'><b>#{i}</b> {html.escape(pair['prompt'])}</div></td></tr><tr>")
        for side in ("chosen", "rejected"):
            row = pair.get(side)
            if row is None:
                body.append("<td></td>")
                continue
            fb = " <span class='fb'>fallback</span>" if row["fell_back"] else ""
            ws = row["weights"]
            spread = f", weights {min(ws):.2f}-{max(ws):.2f}, mean {sum(ws) / len(ws):.2f}" if soft and ws else ""
            body.append(f"<td><div class='meta'>kept {row['kept_frac']:.0%}{spread}{fb}</div>"
                        f"{_row_html(row['tokens'], ws, row['pivot'], row['scores'], soft)}</td>")
        body.append("</tr>")
    body.append("</table>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>" \
           f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"


def pairs_for_page(tokenizer, batch: dict, seg: Segmentation, scores: torch.Tensor | None) -> list[dict]:
    """Per-pair rows of response tokens from one collated batch and its Segmentation."""
    B = batch["index"].shape[0]
    n_resp = batch["input_ids"].shape[0] // B
    resp = batch["response_mask"].bool()
    out = []
    for j in range(B):
        pair = {}
        for k, side in zip(range(n_resp), ("chosen", "rejected"), strict=False):
            row = k * B + j
            pos = resp[row].nonzero().squeeze(1).tolist()
            ids = batch["input_ids"][row, 1:][pos].tolist()
            first = pos[0] if pos else 0
            if "prompt" not in pair:
                pair["prompt"] = tokenizer.decode(batch["input_ids"][row, : first + 1].tolist())[-600:]
            pair[side] = {
                "tokens": [tokenizer.decode([t]) for t in ids],
                "weights": seg.mask[row, pos].float().tolist(),
                "pivot": seg.pivot[row, pos].tolist(),
                "scores": scores[row, pos].tolist() if scores is not None else [None] * len(pos),
                "fell_back": bool(seg.fell_back[row]),
                "kept_frac": float((seg.mask[row, pos] > 0).float().mean()) if pos else 0.0,
            }
        out.append(pair)
    return out


def describe(masker) -> str:
    """The masker's segmenter, its plain settings and baseline, and the side it decides on (when one only)."""
    segmenter = masker.segmenter
    fields = {k: v for k, v in vars(segmenter).items() if isinstance(v, int | float | str | bool)}
    base = getattr(segmenter, "baseline", None)
    extra = f", baseline={type(base).__name__}" if base is not None else ""
    side = f"; {masker.side} responses only (the others keep every token)" if masker.side != "both" else ""
    return f"{type(segmenter).__name__}({', '.join(f'{k}={v}' for k, v in fields.items())}{extra}){side}"


class SegmentsView(L.Callback):
    """Logs the HTML view of a few fixed examples to MLflow (`segments/step_XXXXXX.html`) at the
    start of training and every `every_n_steps`; the `segments/*` statistics are logged by the module."""

    def __init__(self, examples: int = 4, every_n_steps: int = 100, split: str = "val"):
        self.examples, self.every, self.split = examples, every_n_steps, split

    def _log(self, trainer, module) -> None:
        if module.segmenter is None or not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        use_val = self.split == "val" and bool(dm.val_data)
        split = "val" if use_val else "train"
        data = (dm.val_data if use_val else dm.train_data)[: self.examples]
        batch = {k: v.to(module.device) for k, v in dm.collator()(data).items()}
        with torch.no_grad():
            masked = module.masker.mask(batch, split, observe=False)
        page = render_page(f"segments at step {trainer.global_step}", describe(module.masker),
                           pairs_for_page(dm.tokenizer, batch, masked.segmentation, masked.scores))
        logger = next((lg for lg in trainer.loggers if hasattr(lg, "run_id")), None)
        if logger is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"step_{trainer.global_step:06d}.html"
            path.write_text(page, encoding="utf-8")
            RunWriter(client=logger.experiment).files(logger.run_id, [path], artifact_path="segments")

    def on_train_start(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0 and trainer.global_step > 0:
            self._log(trainer, pl_module)
