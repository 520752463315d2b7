"""`amrlhf export CKPT OUT`: a Lightning checkpoint to a Hugging Face folder.

Full fine-tunes are saved as a complete model; LoRA runs as a peft adapter folder, or with
`merge=True` merged into the base weights. The tokenizer is saved beside the weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from amrlhf.errors import AmrlhfError
from amrlhf.models import LoraSpec, ModelSpec, load_causal_lm, load_reward_model, load_tokenizer

log = logging.getLogger(__name__)


def read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise AmrlhfError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise AmrlhfError(f"{path}: not a readable checkpoint ({exc.__class__.__name__})") from None
    if "amrlhf" not in ckpt:
        raise AmrlhfError(f"{path}: not an amrlhf checkpoint (no 'amrlhf' section)")
    return ckpt


def policy_from_checkpoint(path: Path):
    """-> (policy model with the checkpoint's weights, ModelSpec)."""
    ckpt = read_checkpoint(path)
    meta = ckpt["amrlhf"]
    spec_dict = dict(meta["policy"])
    lora = spec_dict.pop("lora")
    spec = ModelSpec(**spec_dict, lora=LoraSpec(**lora) if lora else None)
    loader = load_reward_model if meta["module"].endswith("RewardModule") else load_causal_lm
    model = loader(spec)
    state = {k[len("policy."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("policy.")}
    missing, unexpected = model.load_state_dict(state, strict=spec.lora is None)
    if unexpected:
        raise AmrlhfError(f"{path}: weights do not match {spec.name} (unexpected: {unexpected[:3]})")
    return model, spec


def export(ckpt: Path, out: Path, merge: bool = False) -> Path:
    model, spec = policy_from_checkpoint(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    if spec.lora is not None and merge:
        model = model.merge_and_unload()
    model.save_pretrained(out)
    load_tokenizer(spec.tokenizer or spec.name).save_pretrained(out)
    kind = "LoRA adapter" if spec.lora is not None and not merge else "model"
    log.info("exported %s of %s to %s", kind, ckpt, out)
    return out
