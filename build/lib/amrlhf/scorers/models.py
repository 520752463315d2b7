"""Scorers backed by frozen models: reward-model prefix scores, implicit reward of a frozen
trained policy against its reference, and the reference's next-token entropy."""

from __future__ import annotations

import torch
from torch import Tensor

from amrlhf.models import ModelSpec, load_causal_lm, load_reward_model, load_tokenizer
from amrlhf.models.forward import DEFAULT_LOGITS_CHUNK, lean_forward
from amrlhf.scorers.base import TokenScores, check_same_tokenizer
from amrlhf.segmenters.rules import first_response_index, last_response_index


def _frozen(model, device):
    return model.eval().requires_grad_(False).to(device)


def _policy_tokenizer(module):
    dm = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    return dm.tokenizer if dm is not None and dm.tokenizer is not None else load_tokenizer(module.policy_spec.name)


def _logits_chunk(module) -> int | None:
    return getattr(module, "logits_chunk", DEFAULT_LOGITS_CHUNK)


def prefix_scores(model, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """A reward model's head read after every token -> (token scores [N, T-1] aligned with input_ids[:, 1:],
    prompt scores s_0 [N], sequence scores [N] at the last response token)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    scores = out[:, 1:]
    resp = batch["response_mask"]
    first, last = first_response_index(resp), last_response_index(resp)  # aligned indices
    rows = torch.arange(resp.shape[0], device=resp.device)
    prompt = out[rows, first]  # out[:, first] is the last prompt token (aligned index first = its position)
    return scores, prompt, scores[rows, last]


@torch.no_grad()
def next_token_entropy(model, batch: dict, chunk_size: int | None = DEFAULT_LOGITS_CHUNK) -> Tensor:
    """H of the model's prediction of each token, [N, T-1] aligned with input_ids[:, 1:] (every position,
    prompt included), float32; the logits computed `chunk_size` tokens at a time (lean_forward)."""
    return lean_forward(model, batch, entropy=True, chunk_size=chunk_size, all_positions=True).entropy


class RewardModelScorer:
    """s_t = r_phi(x, y_<=t): the reward model's head read at every position in ONE forward pass;
    s_0 = its output at the last prompt token. `entropy_from` adds the next-token entropy of a
    causal LM (for EntropySegmenter)."""

    def __init__(self, model: ModelSpec, entropy_from: ModelSpec | None = None):
        self.spec, self.entropy_spec = model, entropy_from
        self._models: dict = {}  # not registered: never checkpointed

    def setup(self, module) -> None:
        if self._models:
            return
        check_same_tokenizer(self.spec.name, load_tokenizer(self.spec.tokenizer or self.spec.name),
                             _policy_tokenizer(module))
        self._models["rm"] = _frozen(load_reward_model(self.spec, trainable=False), module.device)
        if self.entropy_spec is not None:
            self._models["lm"] = _frozen(load_causal_lm(self.entropy_spec, trainable=False), module.device)

    @torch.no_grad()
    def score(self, module, batch: dict, split: str) -> TokenScores:
        scores, prompt, _ = prefix_scores(self._models["rm"], batch)
        ent = next_token_entropy(self._models["lm"], batch, _logits_chunk(module)) if "lm" in self._models else None
        return TokenScores(scores.float(), prompt.float(), ent)


class ImplicitRewardScorer:
    """s_t = beta * sum_{k<=t} (log pi_T(y_k) - log pi_ref(y_k)) over response tokens, s_0 = 0, for
    a FROZEN previously trained policy pi_T (never the policy being trained: at step 0 it equals
    its reference and every score would be 0)."""

    def __init__(self, policy: ModelSpec, reference: ModelSpec, beta: float = 0.1):
        self.policy_spec, self.ref_spec, self.beta = policy, reference, beta
        self._models: dict = {}

    def setup(self, module) -> None:
        if self._models:
            return
        check_same_tokenizer(self.policy_spec.name, load_tokenizer(self.policy_spec.name), _policy_tokenizer(module))
        self._models["policy"] = _frozen(load_causal_lm(self.policy_spec, trainable=False), module.device)
        self._models["ref"] = _frozen(load_causal_lm(self.ref_spec, trainable=False), module.device)

    @torch.no_grad()
    def score(self, module, batch: dict, split: str) -> TokenScores:
        resp = batch["response_mask"]
        chunk = _logits_chunk(module)
        d = (lean_forward(self._models["policy"], batch, chunk_size=chunk).logps
             - lean_forward(self._models["ref"], batch, chunk_size=chunk).logps)
        scores = self.beta * (d * resp).cumsum(-1)
        return TokenScores(scores * resp, torch.zeros(resp.shape[0], device=resp.device))
