"""A letters model for the on-policy learning tests (PPO, GRPO): a tiny random Llama over a 29-token
vocabulary (a-z, pad, eos, unk), so that a target letter is sampled often enough to give a signal; and
a callback that records each rollout's metrics. The `letters` fixture (conftest.py) builds it."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import lightning as L


def build_letters_model(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *string.ascii_lowercase])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_letter_prompts(path: Path, n: int = 64, seed: int = 0) -> Path:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvw"  # never the target letters x, y, z
    with open(path, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"prompt": " ".join(rng.choice(letters) for _ in range(3))}) + "\n")
    return path


class Curve(L.Callback):
    """The rollout-level metrics of each training batch."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})
