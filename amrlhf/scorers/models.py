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
from amrlhf.scorers.base import ScoringContext, TokenScores, check_same_tokenizer


class FrozenModelScorer:
    """Base of the scorers backed by frozen models. `setup` loads them once (`load`, which a subclass writes
    with `add`), each on the context's device after its tokenizer is checked against the policy's; they live
    in `_models`, never registered, so never checkpointed, and freed by `scorers.base.release_models`. The
    context's logits chunk is kept for the scorer's lean forwards (private: not part of a score cache's key)."""

    _logits_chunk: int | None = DEFAULT_LOGITS_CHUNK

    def __init__(self) -> None:
        self._models: dict = {}

    def setup(self, ctx: ScoringContext) -> None:
        self._logits_chunk = ctx.logits_chunk
        if not self._models:
            self.load(ctx)

    def load(self, ctx: ScoringContext) -> None:
        raise NotImplementedError

    def add(self, ctx: ScoringContext, key: str, spec: ModelSpec, loader=load_causal_lm) -> None:
        check_same_tokenizer(spec.name, load_tokenizer(spec.tokenizer or spec.name), ctx.tokenizer)
        self._models[key] = loader(spec, trainable=False).eval().requires_grad_(False).to(ctx.device)


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


class RewardModelScorer(FrozenModelScorer):
    """s_t = r_phi(x, y_<=t): the reward model's head read at every position in ONE forward pass;
    s_0 = its output at the last prompt token. `entropy_from` adds the next-token entropy of a
    causal LM (for EntropySegmenter)."""

    def __init__(self, model: ModelSpec, entropy_from: ModelSpec | None = None):
        super().__init__()
        self.spec, self.entropy_spec = model, entropy_from

    def load(self, ctx: ScoringContext) -> None:
        self.add(ctx, "rm", self.spec, load_reward_model)
        if self.entropy_spec is not None:
            self.add(ctx, "lm", self.entropy_spec)

    @torch.no_grad()
    def score(self, batch: dict, split: str) -> TokenScores:
        scores, prompt, _ = prefix_scores(self._models["rm"], batch)
        ent = next_token_entropy(self._models["lm"], batch, self._logits_chunk) if "lm" in self._models else None
        return TokenScores(scores.float(), prompt.float(), ent)


class ImplicitRewardScorer(FrozenModelScorer):
    """s_t = beta * sum_{k<=t} (log pi_T(y_k) - log pi_ref(y_k)) over response tokens, s_0 = 0, for
    a FROZEN previously trained policy pi_T (never the policy being trained: at step 0 it equals
    its reference and every score would be 0)."""

    def __init__(self, policy: ModelSpec, reference: ModelSpec, beta: float = 0.1):
        super().__init__()
        self.policy_spec, self.ref_spec, self.beta = policy, reference, beta

    def load(self, ctx: ScoringContext) -> None:
        self.add(ctx, "policy", self.policy_spec)
        self.add(ctx, "ref", self.ref_spec)

    @torch.no_grad()
    def score(self, batch: dict, split: str) -> TokenScores:
        resp = batch["response_mask"]
        chunk = self._logits_chunk
        d = (lean_forward(self._models["policy"], batch, chunk_size=chunk).logps
             - lean_forward(self._models["ref"], batch, chunk_size=chunk).logps)
        scores = self.beta * (d * resp).cumsum(-1)
        return TokenScores(scores * resp, torch.zeros(resp.shape[0], device=resp.device))


class ContrastiveScorer(FrozenModelScorer):
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
        super().__init__()
        self.positive_spec, self.negative_spec, self.form, self.scale = positive, negative, form, scale

    def load(self, ctx: ScoringContext) -> None:
        self.add(ctx, "pos", self.positive_spec)
        self.add(ctx, "neg", self.negative_spec)

    @torch.no_grad()
    def score(self, batch: dict, split: str) -> TokenScores:
        resp = batch["response_mask"]
        chunk = self._logits_chunk
        d = (lean_forward(self._models["pos"], batch, chunk_size=chunk).logps
             - lean_forward(self._models["neg"], batch, chunk_size=chunk).logps).float() * resp
        scores = self.scale * (d.cumsum(-1) if self.form == "running" else d)
        return TokenScores(scores * resp, torch.zeros(resp.shape[0], device=resp.device))

