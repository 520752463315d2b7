"""Scorers backed by frozen models: reward-model prefix scores, implicit reward of a frozen
trained policy against its reference, the contrastive log-likelihood ratio of two fine-tuned models, and
the reference's next-token entropy."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from amrlhf.errors import ConfigError
from amrlhf.losses.reductions import first_response_index, last_response_index
from amrlhf.models import ModelSpec, load_causal_lm, load_reward_model, load_tokenizer
from amrlhf.models.forward import DEFAULT_LOGITS_CHUNK, lean_forward
from amrlhf.scorers.base import TokenScores, check_same_tokenizer


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


class ContrastiveScorer:
    """Contrastive estimation of critical tokens (cDPO, arXiv 2411.19943): two FROZEN models fine-tuned from
    the policy's starting point, `positive` on right answers and `negative` on wrong ones (on a split disjoint
    from the pairs the policy trains on: recipes/sft/smollm2_arith_contrastive_*.yaml). Per response token

        d_t = log p_pos(y_t | x, y_<t) - log p_neg(y_t | x, y_<t)

    and the score fed to the segmenter is `scale` x d_t (`form: level`, the default): each token's own
    evidence, low where the negative model predicts the token better than the positive one, which is what
    marks the token critical. `form: running` gives the cumulative sum instead (s_t = scale x sum_{k<=t} d_k,
    the form of ImplicitRewardScorer); a segmenter reading it with `signal: increment` sees d_t again. The
    level form is the default because the running sum drifts with length: after one strongly negative
    token every later token's score is low, so a hysteresis on it masks from the first error to the end
    (what docs/studies.md shows for a running surprise on right answers). s_0 = 0."""

    def __init__(self, positive: ModelSpec, negative: ModelSpec, form: Literal["level", "running"] = "level",
                 scale: float = 1.0):
        if form not in ("level", "running"):
            raise ConfigError(f"ContrastiveScorer: form must be level or running, got {form!r}")
        self.positive_spec, self.negative_spec, self.form, self.scale = positive, negative, form, scale
        self._models: dict = {}

    def setup(self, module) -> None:
        if self._models:
            return
        policy_tok = _policy_tokenizer(module)
        for key, spec in (("pos", self.positive_spec), ("neg", self.negative_spec)):
            check_same_tokenizer(spec.name, load_tokenizer(spec.tokenizer or spec.name), policy_tok)
            self._models[key] = _frozen(load_causal_lm(spec, trainable=False), module.device)

    @torch.no_grad()
    def score(self, module, batch: dict, split: str) -> TokenScores:
        resp = batch["response_mask"]
        chunk = _logits_chunk(module)
        d = (lean_forward(self._models["pos"], batch, chunk_size=chunk).logps
             - lean_forward(self._models["neg"], batch, chunk_size=chunk).logps).float() * resp
        scores = self.scale * (d.cumsum(-1) if self.form == "running" else d)
        return TokenScores(scores * resp, torch.zeros(resp.shape[0], device=resp.device))

