"""Generation for rejection sampling, PPO and GRPO: no Lightning in here.

Prompts are left-padded, sampled with the KV cache, stopped at EOS; each response keeps its EOS
(the model generated it, so it is a response token) and nothing after it. A response cut by
max_new_tokens has no EOS (PPO can penalise that); the collated rows' masks come from lengths,
so truncation never leaves a pad or prompt token inside the response mask.

The sampling distribution is `Sampling`'s alone (temperature, top-p, top-k; nothing else): nothing of
a checkpoint's own `generation_config` (repetition_penalty, no_repeat_ngram_size, min_new_tokens, ...)
applies, so PPO's log-probs are those of the distribution the responses were drawn from.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessor,
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


def generation_config(sampling: Sampling, *, n: int, max_new_tokens: int, eos_id: int, pad_id: int
                      ) -> GenerationConfig:
    """The complete generation config of a rollout: every field that shapes the distribution set from
    `sampling` or to its neutral value."""
    return GenerationConfig(
        do_sample=True, num_return_sequences=n, max_new_tokens=max_new_tokens, min_new_tokens=0,
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, typical_p=1.0,
        min_p=0.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True)


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
    """n sampled responses per prompt from the global RNG, one `generate` call for the batch (seed it
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
    from its own generator (`GroupSampler`); False: one call per prompt with the global RNG seeded (the same
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


class GroupSampler(LogitsProcessor):
    """Samples inside a batched `generate`, each group of n rows from its own generator: the sampling warpers
    transformers would apply (temperature, top-k, top-p, in its order), the softmax, then one
    `torch.multinomial` per group on that group's rows, exactly the draw transformers makes for a batch of one
    prompt from a seeded global RNG. The chosen token gets score 0 and every other -inf, so generate's greedy
    step (do_sample off) takes it; padding, EOS and the cache stay transformers' own."""

    def __init__(self, sampling: Sampling, seeds: list[int], n: int, device: torch.device):
        warpers = []
        if sampling.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            warpers.append(TopKLogitsWarper(top_k=sampling.top_k, min_tokens_to_keep=1))
        if sampling.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=sampling.top_p, min_tokens_to_keep=1))
        self.warpers, self.n = LogitsProcessorList(warpers), n
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        probs = torch.softmax(self.warpers(input_ids, scores), dim=-1)
        n = self.n
        picks = torch.cat([torch.multinomial(probs[g * n:(g + 1) * n], num_samples=1, generator=gen)
                           for g, gen in enumerate(self.generators)])
        return torch.full_like(scores, float("-inf")).scatter_(1, picks, 0.0)


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
def generate(model, prompts: list[list[int]], n: int, sampling: Sampling, *, eos_id: int, pad_id: int,
             max_length: int | None = None, seeds: list[int] | None = None) -> list[list[list[int]]]:
    """n sampled responses per prompt -> [prompt][sample] token ids, trimmed after the first EOS. Drawn from
    the global RNG, or with `seeds` (one per prompt) each prompt's from a generator of its own."""
    device = next(model.parameters()).device
    ids, attn = left_pad(prompts, pad_id)
    width = ids.shape[1]
    new = sampling.max_new_tokens if max_length is None else min(sampling.max_new_tokens, max_length - width)
    if new < 1:
        raise ValueError(f"prompts of {width} tokens leave no room to generate under max_length={max_length}")
    config = generation_config(sampling, n=n, max_new_tokens=new, eos_id=eos_id, pad_id=pad_id)
    processors = None
    if seeds is not None:  # the sampling is GroupSampler's: generate only takes the token it chose
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        config.do_sample, config.temperature, config.top_p, config.top_k, config.min_p = False, None, None, None, None
        config.num_return_sequences = 1  # greedy decoding takes one row per input: the rows are repeated here,
        ids, attn = ids.repeat_interleave(n, 0), attn.repeat_interleave(n, 0)  # as sampling's expansion does
        processors = LogitsProcessorList([GroupSampler(sampling, seeds, n, device)])
    was_training = model.training
    model.eval()
    with own_generation_config(model):
        out: Tensor = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                     generation_config=config, logits_processor=processors)
    model.train(was_training)
    gen = out[:, width:].tolist()
    result: list[list[list[int]]] = []
    for i in range(len(prompts)):
        samples = []
        for seq in gen[i * n:(i + 1) * n]:
            cut = seq.index(eos_id) + 1 if eos_id in seq else len(seq)
            samples.append(seq[:cut] or [eos_id])
        result.append(samples)
    return result
