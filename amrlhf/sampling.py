"""Generation for rejection sampling, PPO and GRPO: no Lightning in here.

Prompts are left-padded and sampled with the KV cache by our own decode loop (`decode`: transformers'
`generate` step for step, each prompt prefilled once for its n samples), stopped at EOS; each response keeps its EOS
(the model generated it, so it is a response token) and nothing after it. A response cut by
max_new_tokens has no EOS (PPO can penalise that); the collated rows' masks come from lengths,
so truncation never leaves a pad or prompt token inside the response mask.

The sampling distribution is `Sampling`'s alone (temperature, top-p, top-k; nothing else): nothing of
a checkpoint's own `generation_config` (repetition_penalty, no_repeat_ngram_size, min_new_tokens, ...)
applies (the loop never reads it), so PPO's log-probs are those of the distribution the responses were drawn from.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from amrlhf.data.collate import pad_rows
from amrlhf.errors import ConfigError
from amrlhf.losses.reductions import first_response_index


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    prompts_per_call: int = 0  # per-prompt-seeded groups: prompts per batched generate call (0: all of them)

    def __post_init__(self):
        """Refused when built (before any training): settings no rollout can sample with. Temperature 0 (greedy)
        is refused too: every answer of a group would be the same, so group-relative methods get no signal."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ConfigError(f"sampling.temperature must be > 0 (sampling draws from the policy; 0 would be greedy, "
                              f"the same answer for every sample of a prompt), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k must be >= 0 (0: no top-k filtering), got {self.top_k!r}")
        if isinstance(self.prompts_per_call, bool) or not isinstance(self.prompts_per_call, int) \
                or self.prompts_per_call < 0:
            raise ConfigError(f"sampling.prompts_per_call must be an integer >= 0 (0: every prompt in one call), "
                              f"got {self.prompts_per_call!r}")


@contextlib.contextmanager
def own_generation_config(model):
    """transformers fills whatever a passed GenerationConfig leaves unset (None) from the model's own
    `generation_config`, the checkpoint's: blank it for the call (on every wrapped model), then put it
    back."""
    holders = [m for m in model.modules()
               if isinstance(getattr(m, "generation_config", None), GenerationConfig)]
    saved = [m.generation_config for m in holders]
    for m in holders:
        m.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for m, config in zip(holders, saved, strict=True):
            m.generation_config = config


def prompts_of(batch: dict) -> list[list[int]]:
    """The prompt token ids of each row of a collated batch (the tokens before its response)."""
    first = first_response_index(batch["response_mask"])
    return [batch["input_ids"][i, : int(f) + 1].tolist() for i, f in enumerate(first)]


def left_padded_prompts(batch: dict) -> list[list[int]]:
    """The prompts of a PromptCollator batch (`prompt_ids` left-padded, `prompt_mask`)."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"], strict=True)]


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None):
    """Run a block with the global RNG (CPU, and the CUDA device if any) seeded with `seed`, then put
    the previous state back. Sampling that depends only on (run seed, step) resumes exactly
    whatever else drew random numbers in between."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def collate_groups(prompts: list[list[int]], groups: list[list[list[int]]], *, eos_id: int, pad_id: int
                   ) -> tuple[dict[str, Tensor], Tensor]:
    """[prompt][sample] responses -> (the rows collated prompt-major: rows g*n .. g*n+n-1 answer prompt g
    (a GRPO group), right-padded, masks per docs/method.md; ended_with_eos [N] bool)."""
    pairs = [(p, r) for p, group in zip(prompts, groups, strict=True) for r in group]
    batch = pad_rows(pairs, pad_id)
    ended = torch.tensor([r[-1] == eos_id for _, r in pairs], dtype=torch.bool)
    return batch, ended


def sample_responses(model, prompts: list[list[int]], sampling: Sampling, *, eos_id: int, pad_id: int,
                     max_length: int | None = None, n: int = 1) -> tuple[dict[str, Tensor], Tensor]:
    """n sampled responses per prompt from the global RNG, one batched `generate` for the batch (seed it
    with `seeded`). -> (batch with input_ids / attention_mask / response_mask, ended_with_eos [N] bool)."""
    groups = generate(model, prompts, n, sampling, eos_id=eos_id, pad_id=pad_id, max_length=max_length)
    return collate_groups(prompts, groups, eos_id=eos_id, pad_id=pad_id)


def sample_groups(model, prompts: list[list[int]], seeds: list[int], sampling: Sampling, *, eos_id: int,
                  pad_id: int, n: int, device: torch.device | None = None, batched: bool = True
                  ) -> tuple[dict[str, Tensor], Tensor]:
    """n responses per prompt, each prompt's group drawn from a stream of its own (`seeds`, one per
    prompt): a group depends on its seed and its prompt only, not on the other prompts of the batch or their
    order; sample k is the group's k-th row. `batched` (the default): the prompts in batched `generate` calls
    (`sampling.prompts_per_call` at a time, all by default; KV cache, left padding), each group's tokens drawn
    from its own generator (`TokenSampler`); False: one call per prompt with the global RNG seeded (the same
    draws in fp32; the reference the tests compare with)."""
    if batched:
        step = sampling.prompts_per_call or len(prompts)
        groups = []
        for start in range(0, len(prompts), step):  # fewer rows per call: a smaller KV cache at its peak
            groups += generate(model, prompts[start:start + step], n, sampling, eos_id=eos_id, pad_id=pad_id,
                               seeds=seeds[start:start + step])
        return collate_groups(prompts, groups, eos_id=eos_id, pad_id=pad_id)
    groups = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        with seeded(seed, device):
            groups.append(generate(model, [prompt], n, sampling, eos_id=eos_id, pad_id=pad_id)[0])
    return collate_groups(prompts, groups, eos_id=eos_id, pad_id=pad_id)


class TokenSampler:
    """Draws the next token of every row: the sampling warpers transformers' `generate` applies (temperature,
    top-k, top-p, in its order), the softmax, then `torch.multinomial`, the draw transformers makes. Without
    seeds: over all rows from the global RNG (seed it with `seeded`), as transformers does for a batch; with seeds
    (one per group of n rows): one draw per group from the group's own generator, exactly the draw transformers
    makes for a batch of one prompt from a seeded global RNG."""

    def __init__(self, sampling: Sampling, n: int, device: torch.device, seeds: list[int] | None = None):
        warpers = []
        if sampling.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            warpers.append(TopKLogitsWarper(top_k=sampling.top_k, min_tokens_to_keep=1))
        if sampling.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=sampling.top_p, min_tokens_to_keep=1))
        self.warpers, self.n = LogitsProcessorList(warpers), n
        self.generators = None if seeds is None else [torch.Generator(device=device).manual_seed(int(s))
                                                      for s in seeds]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """(the rows' tokens so far [R, T], fp32 scores [R, V]) -> the drawn tokens [R]."""
        probs = torch.softmax(self.warpers(input_ids, scores), dim=-1)
        if self.generators is None:
            return torch.multinomial(probs, num_samples=1).squeeze(1)
        n = self.n
        return torch.cat([torch.multinomial(probs[g * n:(g + 1) * n], num_samples=1, generator=gen)
                          for g, gen in enumerate(self.generators)]).squeeze(1)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Prompts -> (input_ids, attention_mask) [N, longest], left-padded, ready to generate from."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    return ids, attn


@torch.no_grad()
def decode(model, ids: Tensor, attn: Tensor, n: int, new_tokens: int, sampler: TokenSampler, *, eos_id: int,
           pad_id: int) -> Tensor:
    """Sampled continuations of left-padded prompts, n rows per prompt -> [prompts x n, steps] token ids (pad after
    a row's EOS; steps <= new_tokens, fewer when every row has ended).

    The decode loop of transformers' `generate` (the same forward calls: position ids from the attention mask,
    the last position's logits in fp32, a finished row fed pad), with one difference in the work, none in the
    result: each prompt is prefilled once and its KV cache and last logits repeated for its n rows, where
    `generate` prefills every row. Tested on CPU in fp32: the same tokens as `generate` from the same RNG state.
    On a GPU, in bf16 above all, the prefill's other batch shape can move the logits in their last bits."""
    device = next(model.parameters()).device
    ids, attn = ids.to(device), attn.to(device)
    pos = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    key = "cache" if "cache" in out else "past_key_values"  # transformers 5 renamed it
    cache = out.get(key)
    if cache is None:
        raise ConfigError(f"{type(model).__name__} returned no KV cache with use_cache=True: sampling needs one")
    cache.reorder_cache(torch.arange(ids.shape[0], device=device).repeat_interleave(n))  # every layer kind's state
    logits = out.logits[:, -1].to(dtype=torch.float32).repeat_interleave(n, 0)
    del out
    seq, attn, pos = ids.repeat_interleave(n, 0), attn.repeat_interleave(n, 0), pos[:, -1:].repeat_interleave(n, 0)
    unfinished = torch.ones(seq.shape[0], dtype=torch.bool, device=seq.device)
    for step in range(new_tokens):
        tokens = sampler(seq, logits).where(unfinished, pad_id)
        seq = torch.cat([seq, tokens[:, None]], dim=-1)
        unfinished &= tokens != eos_id
        if step + 1 == new_tokens or not unfinished.any():
            break
        attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=-1)
        pos = pos + 1
        out = model(input_ids=tokens[:, None], attention_mask=attn, position_ids=pos, use_cache=True,
                    logits_to_keep=1, **{key: cache})
        cache, logits = out[key], out.logits[:, -1].to(dtype=torch.float32)
        del out
    return seq[:, ids.shape[1]:]


@torch.no_grad()
def generate(model, prompts: list[list[int]], n: int, sampling: Sampling, *, eos_id: int, pad_id: int,
             max_length: int | None = None, seeds: list[int] | None = None) -> list[list[list[int]]]:
    """n sampled responses per prompt -> [prompt][sample] token ids, trimmed after the first EOS. Drawn from
    the global RNG, or with `seeds` (one per prompt) each prompt's from a generator of its own."""
    ids, attn = left_pad(prompts, pad_id)
    width = ids.shape[1]
    new = sampling.max_new_tokens if max_length is None else min(sampling.max_new_tokens, max_length - width)
    if new < 1:
        raise ValueError(f"prompts of {width} tokens leave no room to generate under max_length={max_length}")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    sampler = TokenSampler(sampling, n, next(model.parameters()).device, seeds)
    was_training = model.training
    model.eval()
    try:
        gen = decode(model, ids, attn, n, new, sampler, eos_id=eos_id, pad_id=pad_id).tolist()
    finally:
        model.train(was_training)
    result: list[list[list[int]]] = []
    for i in range(len(prompts)):
        samples = []
        for seq in gen[i * n:(i + 1) * n]:
            cut = seq.index(eos_id) + 1 if eos_id in seq else len(seq)
            samples.append(seq[:cut] or [eos_id])
        result.append(samples)
    return result
