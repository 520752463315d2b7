"""One forward pass to per-token log-probs, computing logits only where they are needed.

The vocabulary projection dominates a small model's cost and memory (SmolLM2: 49k x 576); prompt positions
need none of it. Two paths compute the same per-token values:

- `lean_forward` (every caller's): the decoder gives the final
  (normed) hidden state, and the output embedding is applied to `chunk_size` predicted tokens at a time
  (rows x positions, flattened), each chunk reduced at once to what the caller needs (log-prob of the
  target, entropy, logit mean, argmax hit) in float32. With gradients each chunk runs under
  `torch.utils.checkpoint` (non-reentrant): its logits are recomputed in the backward pass instead of kept,
  so no [rows, positions, vocabulary] tensor ever exists, forward or backward; the extra memory is about
  chunk_size x V floats (a few copies) whatever the batch. `chunk_size` None or 0: the unchunked path.
- the unchunked path (`_unchunked`): the model's own forward with `logits_to_keep`
  = K, K reaching back to the earliest response token of the batch: logits [N, K, V], kept for backward.

The lean path is taken only for causal LMs whose logits are known to be `lm_head(decoder(x).last_hidden_state)`
(`LEAN_CAUSAL_LMS`: Llama, SmolLM2/3, Mistral, Qwen2/3, Phi-3, Gemma, OLMo-2), with Gemma 2 / 3's final
logit soft-capping applied as their forward applies it (`SOFTCAPPED_CAUSAL_LMS`), also inside peft LoRA
(adapters on the decoder and, if targeted, on the head). Any other model (a forward that post-processes
logits differently: Cohere's logit_scale, Granite's logits_scaling, a custom subclass; peft prompt learning)
falls back to the unchunked path, with one log line per model class. docs/performance.md: the trade-off and
the measured agreement of the two paths.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from amrlhf.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_LOGITS_CHUNK = 512
"""Predicted tokens (rows x positions) per vocabulary-projection chunk. SmolLM2 (V = 49152, float32): one
[512, V] buffer is 96 MiB; a chunk's forward + backward adds ~0.3 GiB (0.4 with entropy) whatever the batch,
where the unchunked path adds ~0.6 MiB per predicted token (~1 with entropy): ~2.4 GiB (3.8) for 8 rows x 512
positions. M = 512 keeps the projection GEMM efficient; the recompute costs one more head forward at any
chunk size. docs/performance.md."""

LEAN_CAUSAL_LMS = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
    "GemmaForCausalLM", "SmolLM3ForCausalLM", "Olmo2ForCausalLM",
})
"""Causal LMs whose forward is logits = lm_head(model(...).last_hidden_state), nothing after (checked in
transformers' source and by tests/test_chunked_logprobs.py on tiny random models of each)."""
SOFTCAPPED_CAUSAL_LMS = frozenset({"Gemma2ForCausalLM", "Gemma3ForCausalLM"})
"""The same, then logits = tanh(logits / c) * c with c = config.final_logit_softcapping (when not None)."""

_fallback_logged: set[str] = set()


@dataclass
class ForwardOut:
    """What one forward pass gives, every per-token tensor [N, T-1] aligned with input_ids[:, 1:] (position t
    describes token t+1, predicted at position t) and zero before the first predicted token (the earliest
    response token of the batch, or token 1 with `all_positions`).

    logps: log pi(token), float32, with the graph when gradients are on.
    entropy: entropy of the prediction of each token (nats), float32, with the graph (an entropy bonus).
    logit_mean: mean raw logit over the vocabulary of each prediction, float32, detached.
    hits: 1.0 where the argmax of the prediction is the token, float32, detached.
    hidden: the final (normed) hidden state [N, T, H] at every position, what lm_head reads (a value head).
    """

    logps: Tensor
    entropy: Tensor | None = None
    logit_mean: Tensor | None = None
    hits: Tensor | None = None
    hidden: Tensor | None = None


def check_logits_chunk(chunk_size: int | None) -> None:
    """Refuse a negative chunk size where it is given (None and 0 mean the unchunked path)."""
    if chunk_size is not None and chunk_size < 0:
        raise ConfigError(f"logits_chunk must be >= 0 (0 or null: unchunked logits), got {chunk_size}")


def first_predicted(response_mask: Tensor) -> int:
    """Index in the [N, T-1] layout of the earliest response token of the batch (T-2, the last, when none):
    the first position whose logits are needed."""
    has = response_mask.bool().any(0)
    return int(has.float().argmax()) if bool(has.any()) else response_mask.shape[1] - 1


def lean_forward(model, batch: dict, *, hidden: bool = False, entropy: bool = False, logits_stats: bool = False,
                 chunk_size: int | None = DEFAULT_LOGITS_CHUNK, all_positions: bool = False,
                 share_prefix: bool = False, responses_only: bool = False) -> ForwardOut:
    """One forward pass of a causal LM -> ForwardOut (log-probs; entropy, logit means and argmax hits, the
    final hidden state when asked), never holding the [N, K, V] logits (module docstring).

    Args:
        batch: input_ids [N, T], attention_mask [N, T], response_mask [N, T-1] (unless `all_positions`).
        hidden: also return the final hidden state [N, T, H].
        entropy: also the per-token entropy [N, T-1] (with gradients).
        logits_stats: also the per-token logit means and argmax hits [N, T-1] (detached; DPO's `logits/*`,
            SFT's token accuracy).
        chunk_size: predicted tokens per vocabulary-projection chunk; None or 0: the unchunked path.
        all_positions: every token from the second on, not only from the earliest response token.
        share_prefix: run the rows of one item (a preference pair) as one packed sequence, their common
            prefix once (amrlhf.models.shared_prefix), where that runs fewer positions and the model's
            attention takes a 4D mask; the values agree with the padded batch's to float32 rounding.
        responses_only: project only the response tokens onto the vocabulary (not the other rows' prompt
            tokens or padding after the earliest response token); every value outside `response_mask` is then
            0 (a batch without response tokens projects every position as without it). `share_prefix` and
            `responses_only` apply to the lean path; the unchunked path ignores both.
    """
    check_logits_chunk(chunk_size)
    ids = batch["input_ids"]
    T = ids.shape[1]
    first = 0 if all_positions else first_predicted(batch["response_mask"])
    parts = lm_parts(model) if chunk_size else None
    if parts is None:
        return _unchunked(model, batch, first, hidden=hidden, entropy=entropy, logits_stats=logits_stats)
    decoder, head, softcap = parts
    # which of the N x (T-1-first) positions from `first` on are projected (None: all of them)
    keep = batch["response_mask"][:, first:].reshape(-1).nonzero().squeeze(-1) if responses_only else None
    if keep is not None and keep.numel() == 0:
        keep = None
    packed = packing_for(decoder, batch) if share_prefix else None
    if packed is None:
        h = decoder(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
        x = h[:, first:T - 1].reshape(-1, h.shape[-1])  # [N*(T-1-first), H]: the positions predicting tokens
        if keep is not None:
            x = x.index_select(0, keep)
    else:
        packing, mask4d = packed
        flat = decoder(input_ids=packing.input_ids, position_ids=packing.position_ids, attention_mask=mask4d,
                       use_cache=False).last_hidden_state.flatten(0, 1)
        where = packing.index[:, first:T - 1].reshape(-1)
        x = flat.index_select(0, where if keep is None else where[keep])
        h = flat.index_select(0, packing.index.reshape(-1)).view(ids.shape[0], T, -1) if hidden else None
    labels = ids[:, first + 1:].reshape(-1)
    if keep is not None:
        labels = labels[keep]
    recompute = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in head.parameters()))

    def project(xc: Tensor, yc: Tensor) -> tuple[Tensor, ...]:
        return head_chunk(head, softcap, xc, yc, entropy=entropy, logits_stats=logits_stats)

    pieces = []
    for s in range(0, x.shape[0], chunk_size):
        xc, yc = x[s:s + chunk_size], labels[s:s + chunk_size]
        pieces.append(checkpoint(project, xc, yc, use_reentrant=False) if recompute else project(xc, yc))
    width = ids.shape[0] * (T - 1 - first)

    def layout(values: Tensor) -> Tensor:
        if keep is not None:  # zeros where nothing was projected
            values = values.new_zeros(width).index_copy(0, keep, values)
        return token_layout(values.view(ids.shape[0], -1), T)

    cols = [layout(torch.cat(p)) for p in zip(*pieces, strict=True)]
    out = ForwardOut(cols.pop(0), hidden=h if hidden else None)
    if entropy:
        out.entropy = cols.pop(0)
    if logits_stats:
        out.logit_mean, out.hits = cols
    return out


def packing_for(decoder, batch: dict):
    """(Packing, the 4D mask in the decoder's form) for the batch's rows of one item, or None where packing
    cannot serve (no multi-row items; an attention implementation without 4D masks; a sliding window shorter
    than the batch, which a custom mask would override) or would not run fewer positions."""
    from amrlhf.models.shared_prefix import attention_mask_for, bounded, item_groups, pack

    groups = item_groups(batch)
    if groups is None:
        return None
    config = decoder.config
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    window = getattr(config, "sliding_window", None)
    if window and batch["input_ids"].shape[1] > window:
        return None
    if implementation not in ("sdpa", "eager"):
        if implementation not in _fallback_logged:
            _fallback_logged.add(implementation)
            log.info("attention %r takes no 4D mask: shared-prefix packing is off (padded rows)", implementation)
        return None
    ids, mask = batch["input_ids"], batch["attention_mask"]
    runs = [run for rows in groups for run in bounded(ids, mask, rows, 2 * ids.shape[1])]
    packing = pack(ids, mask, runs)
    if not 0 < packing.positions < ids.numel():
        return None
    dtype = next(decoder.parameters()).dtype
    return packing, attention_mask_for(packing.allowed, implementation, dtype)


def head_chunk(head, softcap: float | None, x: Tensor, labels: Tensor, *, entropy: bool = False,
               logits_stats: bool = False) -> tuple[Tensor, ...]:
    """The head on one chunk of final hidden states x [M, H] predicting labels [M] -> (log-prob [M],
    entropy [M] if `entropy`, logit mean [M] and argmax hit [M] if `logits_stats`), float32. The logits
    [M, V] live only inside this call."""
    logits = head(x)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    out = [z.gather(-1, labels[:, None]).squeeze(-1) - lse]
    if entropy:  # as entropy_from_logits computes it
        logp = z.log_softmax(-1)
        out.append(-(logp.exp() * logp).sum(-1))
    if logits_stats:
        with torch.no_grad():
            out += [logits.mean(-1, dtype=torch.float32), (logits.argmax(-1) == labels).float()]
    return tuple(out)


def lm_parts(model) -> tuple[torch.nn.Module, torch.nn.Module, float | None] | None:
    """(decoder, output embedding, final logit soft-cap) of a causal LM whose logits are known to be
    head(decoder(...).last_hidden_state) (soft-capped for Gemma 2 / 3), peft LoRA included; None otherwise
    (logged once per model class): the caller takes the unchunked path."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return _fallback(type(model).__name__, "peft prompt learning changes the model's inputs")
    base = model.get_base_model() if peft_config is not None and hasattr(model, "get_base_model") else model
    name = type(base).__name__
    if name not in LEAN_CAUSAL_LMS | SOFTCAPPED_CAUSAL_LMS:
        return _fallback(name, "not a causal LM whose logits are known to be lm_head(final hidden state)")
    softcap = getattr(base.config, "final_logit_softcapping", None) if name in SOFTCAPPED_CAUSAL_LMS else None
    return base.model, base.get_output_embeddings(), softcap


def _fallback(name: str, why: str) -> None:
    if name not in _fallback_logged:
        _fallback_logged.add(name)
        log.info("%s: %s; computing unchunked logits [rows, positions, vocabulary] (more memory)", name, why)
    return None


def _unchunked(model, batch: dict, first: int, *, hidden: bool, entropy: bool, logits_stats: bool) -> ForwardOut:
    """ForwardOut from the model's own forward with logits_to_keep (the unchunked path)."""
    # not at the top: amrlhf.losses imports the scorers, which import this module
    from amrlhf.losses.logprobs import entropy_from_logits, token_logprobs

    ids = batch["input_ids"]
    T = ids.shape[1]
    out = model(input_ids=ids, attention_mask=batch["attention_mask"], logits_to_keep=T - first, use_cache=False,
                output_hidden_states=hidden)
    logits = out.logits  # [N, T-first, V]: positions first..T-1
    res = ForwardOut(token_layout(token_logprobs(logits, ids[:, first:]), T),
                     hidden=out.hidden_states[-1] if hidden else None)
    if entropy:
        res.entropy = token_layout(entropy_from_logits(logits[:, :-1]), T)
    if logits_stats:
        with torch.no_grad():
            res.logit_mean = token_layout(logits[:, :-1].mean(-1, dtype=torch.float32), T)
            res.hits = token_layout((logits[:, :-1].argmax(-1) == ids[:, first + 1:]).float(), T)
    return res


def token_layout(part: Tensor, T: int) -> Tensor:
    """Per-token values of the last k predicted tokens [N, k] -> the per-token layout [N, T-1]
    (aligned with input_ids[:, 1:]), zero for the earlier positions. From K kept logits, the values
    of their first K-1 positions (the last one predicts nothing) are the last K-1 tokens."""
    return torch.cat([part.new_zeros(part.shape[0], T - 1 - part.shape[1]), part], dim=1)


def response_logit_mean(logit_mean: Tensor, response_mask: Tensor) -> Tensor:
    """Mean raw logit over every response token of the rows given and the vocabulary, one scalar (TRL's
    `logits/*`: token-weighted, a long response counts for its length), from ForwardOut.logit_mean [N, T-1]
    (each token's value already the mean over the vocabulary)."""
    m = response_mask.to(logit_mean.dtype)
    return (logit_mean * m).sum() / m.sum().clamp(min=1)
