"""The lean forward path (chunked vocabulary projection, recomputed in backward) against the unchunked one.

Tolerances (float32, CPU; measured on these models in brackets): per-token log-probs atol 1e-5 [9.5e-7],
entropy atol 1e-5 [2.4e-6, on values ~5.8 nats], logit means atol 1e-6 [8.4e-9], argmax hits and the hidden
state exactly; gradients rtol 1e-4 / atol 1e-6 per element and relative norm error < 1e-5 [3.3e-6].
docs/performance.md.
"""

from __future__ import annotations

import logging

import pytest
import torch
from forward_oracle import mean_response_logits, policy_forward

from amrlhf.data import Collator, encode_examples, read_examples
from amrlhf.losses import SigmoidDPO, masked_sum, token_logprobs
from amrlhf.models import LoraSpec, ModelSpec, load_causal_lm
from amrlhf.models.forward import (
    DEFAULT_LOGITS_CHUNK,
    lean_forward,
    lm_parts,
    response_logit_mean,
)

CHUNKS = [1, 3, 10**6]  # one token, a size that does not divide the batch, larger than N x T
ATOL = 1e-5


def _model(lora: bool, gradient_checkpointing: bool = False):
    torch.manual_seed(0)
    model = load_causal_lm(ModelSpec("local:tiny-llama", lora=LoraSpec(r=4) if lora else None,
                                     gradient_checkpointing=gradient_checkpointing))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # trained adapters (fresh ones add 0)
            p.data.normal_(0, 0.1)
    return model


def _synthetic_batch(vocab: int) -> dict:
    """4 rows whose responses start at different positions (one at the second token), right padding."""
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (4, 13))
    attn = torch.ones_like(ids)
    attn[1, 10:] = 0
    attn[3, 7:] = 0
    resp = torch.zeros(4, 12)
    resp[0, 5:] = 1
    resp[1, 2:9] = 1
    resp[2, 0:4] = 1
    resp[3, 3:6] = 1
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


@pytest.fixture(scope="module")
def pairs(tokenizer) -> dict:
    """A real DPO batch (3 chosen rows, then their 3 rejected rows) whose responses start at different
    positions (the data's prompts all encode to one length: two are shortened by their first tokens)."""
    from dataclasses import replace

    enc, _ = encode_examples(read_examples("local:tiny-arith/prefs_train", "preference", 3), tokenizer, 64)
    items = [replace(item, prompt_ids=item.prompt_ids[cut:]) for item, cut in zip(enc, (0, 4, 9), strict=True)]
    batch = Collator(tokenizer.pad_token_id)(items)
    assert len(set(batch["response_mask"].float().argmax(-1).tolist())) == 3
    return batch


def _all(model, batch, chunk):
    return lean_forward(model, batch, hidden=True, entropy=True, logits_stats=True, chunk_size=chunk)


def _assert_same(lean, ref, batch):
    torch.testing.assert_close(lean.logps, ref.logps, rtol=0, atol=ATOL)
    torch.testing.assert_close(lean.entropy, ref.entropy, rtol=0, atol=ATOL)
    torch.testing.assert_close(lean.logit_mean, ref.logit_mean, rtol=0, atol=1e-6)
    assert torch.equal(lean.hits, ref.hits)
    assert torch.equal(lean.hidden, ref.hidden)
    first = int(batch["response_mask"].bool().any(0).float().argmax())
    for t in (lean.logps, lean.entropy, lean.logit_mean, lean.hits):
        assert t.shape == batch["response_mask"].shape and not t[:, :first].any()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_lean_equals_unchunked_values(lora, chunk, pairs):
    model = _model(lora)
    assert lm_parts(model) is not None  # the lean path is taken, not the fallback
    vocab = model.get_output_embeddings().weight.shape[0]
    for batch in (_synthetic_batch(vocab), pairs):
        with torch.no_grad():
            ref = _all(model, batch, 0)
            lean = _all(model, batch, chunk)
        _assert_same(lean, ref, batch)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_unchunked_stats_are_the_old_definitions(lora, pairs):
    """chunk_size 0 computes what policy_forward, entropy_from_logits, mean_response_logits and SFT's
    argmax hits computed from the kept logits [N, K, V]."""
    from amrlhf.losses.logprobs import entropy_from_logits
    from amrlhf.models.forward import token_layout

    model = _model(lora)
    with torch.no_grad():
        out = _all(model, pairs, 0)
        logps, logits, hidden = policy_forward(model, pairs, hidden=True)
    T, keep, resp = pairs["input_ids"].shape[1], logits.shape[1], pairs["response_mask"]
    assert torch.equal(out.logps, logps) and torch.equal(out.hidden, hidden)
    assert torch.equal(out.entropy, token_layout(entropy_from_logits(logits)[:, :-1], T))
    hits = (logits[:, :-1].argmax(-1) == pairs["input_ids"][:, T - keep + 1:]).float()
    assert torch.equal(out.hits, token_layout(hits, T))
    B = pairs["index"].shape[0]
    for rows in (slice(0, B), slice(B, None)):
        torch.testing.assert_close(response_logit_mean(out.logit_mean[rows], resp[rows]),
                                   mean_response_logits(logits[rows], resp[rows]), rtol=1e-6, atol=1e-7)


def _losses(out, batch):
    """The masked log-prob sum, a sigmoid DPO loss on the pairs, and an entropy bonus."""
    resp = batch["response_mask"]
    B = resp.shape[0] // 2
    d = masked_sum(out.logps, resp)
    return {"logp_sum": (out.logps * resp).sum(),
            "dpo": SigmoidDPO(beta=0.5).loss(d[:B], d[B:], resp[:B].sum(-1), resp[B:].sum(-1)).mean(),
            "entropy": (out.entropy * resp).sum() / resp.sum()}


@pytest.mark.parametrize("lora,gc", [(False, False), (True, False), (True, True)],
                         ids=["full", "lora", "lora-gradient-checkpointing"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_lean_gradients_equal_unchunked(lora, gc, chunk, pairs):
    model = _model(lora, gc)
    params = [p for p in model.parameters() if p.requires_grad]
    ref_losses = _losses(_all(model, pairs, 0), pairs)
    lean_losses = _losses(_all(model, pairs, chunk), pairs)
    for key in ref_losses:
        torch.testing.assert_close(lean_losses[key], ref_losses[key], rtol=1e-6, atol=ATOL)
        ref = torch.autograd.grad(ref_losses[key], params, retain_graph=True)
        lean = torch.autograd.grad(lean_losses[key], params, retain_graph=True)
        assert any(g.abs().max() > 1e-4 for g in ref), key  # the gradients are not trivially zero
        for g, r in zip(lean, ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
            assert (g - r).norm() <= 1e-5 * r.norm() + 1e-9, key


def test_under_bf16_autocast_the_paths_agree_to_bf16_precision(pairs):
    """bf16-mixed: the head runs in bf16 in both paths; the values agree closely, the gradients to bf16
    precision (the lean path sums the chunks' weight gradients in float32, the unchunked one in one bf16
    GEMM) [measured: values equal, relative gradient norm error <= 6e-3]."""
    model = _model(False)
    params = [p for p in model.parameters() if p.requires_grad]
    resp = pairs["response_mask"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, lean = _all(model, pairs, 0), _all(model, pairs, 3)
    for key in ("logps", "entropy", "logit_mean"):
        torch.testing.assert_close(getattr(lean, key), getattr(ref, key), rtol=0, atol=2e-2)
    g_ref = torch.autograd.grad((ref.logps * resp).sum(), params)
    g_lean = torch.autograd.grad((lean.logps * resp).sum(), params)
    for g, r in zip(g_lean, g_ref, strict=True):
        assert (g - r).norm() <= 2e-2 * r.norm() + 1e-9


def _saved_shapes(fn) -> list[torch.Size]:
    """Shapes of every tensor the autograd graph keeps for backward while `fn` runs."""
    shapes = []

    def pack(t):
        shapes.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_no_tensor_over_the_vocabulary_is_kept_for_backward(pairs):
    model = _model(False)
    vocab = model.get_output_embeddings().weight.shape[0]
    kept = _saved_shapes(lambda: _all(model, pairs, 4))
    assert not [s for s in kept if s[-1] == vocab], "lean path: logits kept for backward"
    rows, positions = pairs["input_ids"].shape[0], pairs["input_ids"].shape[1] - 1
    first = int(pairs["response_mask"].bool().any(0).float().argmax())
    unchunked = _saved_shapes(lambda: _all(model, pairs, 0))  # the probe sees the logits there (row by row)
    assert sum(s.numel() for s in unchunked if s[-1] == vocab) >= rows * (positions - first) * vocab


def test_next_token_entropy_covers_every_position(pairs):
    from amrlhf.losses.logprobs import entropy_from_logits
    from amrlhf.scorers import next_token_entropy

    model = _model(False).eval()
    with torch.no_grad():
        full = entropy_from_logits(model(input_ids=pairs["input_ids"],
                                         attention_mask=pairs["attention_mask"]).logits[:, :-1])
    for chunk in (*CHUNKS, 0):
        torch.testing.assert_close(next_token_entropy(model, pairs, chunk), full, rtol=0, atol=ATOL)


TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {  # model class -> extra config; softcap 0.5 changes tiny random logits by ~0.1
    "LlamaForCausalLM": {}, "MistralForCausalLM": {}, "Qwen2ForCausalLM": {}, "Qwen3ForCausalLM": {"head_dim": 8},
    "Phi3ForCausalLM": {}, "GemmaForCausalLM": {"head_dim": 8}, "SmolLM3ForCausalLM": {}, "Olmo2ForCausalLM": {},
    "Gemma2ForCausalLM": {"head_dim": 8, "final_logit_softcapping": 0.5},
    "Gemma3ForCausalLM": {"head_dim": 8, "final_logit_softcapping": 0.5},
}


def _tiny(class_name: str):
    import transformers

    cls = getattr(transformers, class_name)
    torch.manual_seed(0)
    return cls(cls.config_class(**TINY, **FAMILIES[class_name])).eval()


def test_every_family_on_the_lean_list_is_tested():
    from amrlhf.models.forward import LEAN_CAUSAL_LMS, SOFTCAPPED_CAUSAL_LMS

    assert set(FAMILIES) == LEAN_CAUSAL_LMS | SOFTCAPPED_CAUSAL_LMS


@pytest.mark.parametrize("class_name", list(FAMILIES))
def test_lean_path_computes_the_model_s_own_logits(class_name):
    """For every class on the lean list, log-probs and entropy from the decoder + head equal those of the
    model's own forward (Gemma 2 / 3: soft-capped as their forward does)."""
    from amrlhf.losses.logprobs import entropy_from_logits

    model = _tiny(class_name)
    assert lm_parts(model) is not None
    batch = _synthetic_batch(97)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = lean_forward(model, batch, entropy=True, chunk_size=5, all_positions=True)
    torch.testing.assert_close(out.logps, token_logprobs(logits, batch["input_ids"]), rtol=0, atol=ATOL)
    torch.testing.assert_close(out.entropy, entropy_from_logits(logits[:, :-1]), rtol=0, atol=ATOL)


def test_a_model_with_its_own_logit_processing_falls_back_to_its_forward(caplog):
    """A class not on the lean list (here a Llama whose forward doubles the logits) is computed through its
    own forward, with one log line."""
    import transformers

    class DoubledLlama(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    torch.manual_seed(0)
    model = DoubledLlama(transformers.LlamaConfig(**TINY)).eval()
    batch = _synthetic_batch(97)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="amrlhf.models.forward"):
        out = lean_forward(model, batch, chunk_size=3)
        lean_forward(model, batch, chunk_size=3)
        expected = policy_forward(model, batch)[0]
    assert torch.equal(out.logps, expected)
    assert len([r for r in caplog.records if "DoubledLlama" in r.getMessage()]) == 1


@pytest.mark.parametrize("chunk", [DEFAULT_LOGITS_CHUNK, 3, 0])
def test_policy_and_reference_log_probs_are_bit_equal_at_step_zero(chunk, pairs):
    """The reference uses the module's logits_chunk (and share_prefix): at step 0 it computes what the policy
    computes, bit for bit (DPO's log-ratios are exactly 0)."""
    from amrlhf.modules import DPOModule, FrozenReference

    m = DPOModule(ModelSpec("local:tiny-llama"), reference=FrozenReference(), logits_chunk=chunk)
    m.configure_model()
    m.reference.setup(m)
    assert m.share_prefix
    policy = lean_forward(m.policy, pairs, **m.forward_options()).logps
    assert torch.equal(policy, m.reference.logps(m, pairs, "train"))


def test_negative_logits_chunk_is_refused():
    from amrlhf.errors import ConfigError
    from amrlhf.modules import DPOModule, SFTModule

    for cls in (DPOModule, SFTModule):
        with pytest.raises(ConfigError, match="logits_chunk"):
            cls(ModelSpec("local:tiny-llama"), logits_chunk=-1)
    assert DPOModule(ModelSpec("local:tiny-llama")).logits_chunk == DEFAULT_LOGITS_CHUNK


@pytest.mark.parametrize("module_name", ["DPOModule", "SFTModule"])
def test_module_step_loss_stats_and_gradients_match_the_unchunked_path(module_name, pairs):
    from amrlhf import modules

    def step(chunk):
        torch.manual_seed(0)
        m = getattr(modules, module_name)(ModelSpec("local:tiny-llama", lora=LoraSpec(r=4)), logits_chunk=chunk)
        m.configure_model()
        for name, p in m.policy.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1)
        if hasattr(m, "reference"):
            m.reference = modules.AdapterReference()  # the reference through the same path, adapters off
            m.reference.setup(m)
        loss, stats = m.model_step(pairs, "train")
        loss.backward()
        return loss.detach(), stats, {n: p.grad for n, p in m.policy.named_parameters() if p.requires_grad}

    loss, stats, grads = step(3)
    loss0, stats0, grads0 = step(0)
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
    assert stats.keys() == stats0.keys()
    for key in stats:
        torch.testing.assert_close(stats[key].float(), stats0[key].float(), rtol=1e-5, atol=ATOL)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads0[name], rtol=1e-4, atol=1e-6)
