"""Shared-prefix packing (amrlhf.models.shared_prefix): the packed layout by hand, and the packed forward
against the padded batch's (values and gradients), full, LoRA, gradient checkpointing, eager and SDPA
attention, pairs whose responses share a start, groups of three; DPO's step with and without it.

Tolerances (float32, CPU; measured in brackets on tiny-llama): log-probs and entropy atol 1e-5 [5e-7],
gradients relative norm error < 1e-5 [3e-7]. On SmolLM2-135M (benchmarks, 2 HaluEval pairs): log-probs 1.1e-5,
gradients 5.6e-6.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from amrlhf.data import Collator, encode_examples, read_examples
from amrlhf.models import LoraSpec, ModelSpec, load_causal_lm
from amrlhf.models.forward import lean_forward, packing_for
from amrlhf.models.shared_prefix import attention_mask_for, bounded, common_prefix, item_groups, pack


def test_pack_by_hand():
    """Two rows share columns 0-1; row 0 has 4 valid tokens, row 1 has 3 (right padding, pad id 0)."""
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    assert common_prefix(ids, mask, [0, 1]) == 2
    p = pack(ids, mask, [[0, 1]])
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # each token keeps its column as its position
    # row 0 reads packed 0, 1, 2, 3 (its pad column: 0); row 1 reads 0, 1, then its own token at packed 4
    assert p.index.tolist() == [[0, 1, 2, 3, 0], [0, 1, 4, 0, 0]]
    expected = torch.tensor([  # query (row) may attend key (column)
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # 7: the prefix and itself
        [1, 1, 1, 1, 0],  # 8: the prefix, 7 and itself
        [1, 1, 0, 0, 1],  # 9: the prefix and itself, never row 0's tokens
    ], dtype=torch.bool)
    assert torch.equal(p.allowed[0, 0], expected)


def test_pack_pads_groups_and_a_padding_token_sees_only_itself():
    ids = torch.tensor([[1, 2, 3], [1, 2, 4], [1, 5, 0], [1, 6, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 0]])
    p = pack(ids, mask, [[0, 1], [2, 3]])
    assert p.input_ids.tolist() == [[1, 2, 3, 4], [1, 5, 6, 0]]
    assert p.index.tolist() == [[0, 1, 2], [0, 1, 3], [4, 5, 0 + 4], [4, 6, 4]]
    assert p.allowed[1, 0, 3].tolist() == [False, False, False, True]  # the packed padding token
    assert p.allowed[1, 0, 2].tolist() == [True, False, True, False]  # 6 sees 1 and itself, not 5


def test_packed_attention_is_each_rows_own_on_random_layouts():
    """Brute force over random batches (left and right padding, gaps in the mask, empty rows, rows equal to
    each other, groups of 1-3): every valid (row, column) reads its own token at its own position, and may
    attend exactly the packed places of its row's valid columns k <= q."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n_items, k = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        T = int(torch.randint(1, 9, (1,), generator=g))
        N = n_items * k
        ids = torch.randint(1, 4, (N, T), generator=g)  # a small vocabulary: long common prefixes happen
        mask = (torch.rand(N, T, generator=g) > 0.2).long()
        for r in range(N):  # some rows start like their group's first row
            if r >= n_items and torch.rand(1, generator=g) < 0.5:
                ids[r], mask[r] = ids[r % n_items], mask[r % n_items]
        groups = [[j * n_items + i for j in range(k)] for i in range(n_items)]
        p = pack(ids, mask, groups)
        flat_ids, flat_pos = p.input_ids.reshape(-1), p.position_ids.reshape(-1)
        allowed = p.allowed[:, 0]
        L = p.input_ids.shape[1]
        for r in range(N):
            for q in range(T):
                if not mask[r, q]:
                    continue
                at = int(p.index[r, q])
                assert flat_ids[at] == ids[r, q] and flat_pos[at] == q
                grp, lq = divmod(at, L)
                want = {int(p.index[r, c]) % L for c in range(q + 1) if mask[r, c]}
                got = set(allowed[grp, lq].nonzero().squeeze(-1).tolist())
                assert got == want, (ids, mask, r, q)


def test_common_prefix_stops_at_a_differing_token_mask_or_the_shortest_row():
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 9, 3, 4]])
    assert common_prefix(ids, torch.ones_like(ids), [0, 1]) == 4  # identical rows: all of them
    assert common_prefix(ids, torch.ones_like(ids), [0, 2]) == 1
    assert common_prefix(ids, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1] * 4]), [0, 1]) == 2
    p = pack(ids[:2], torch.ones(2, 4, dtype=torch.long), [[0, 1]])
    assert p.input_ids.tolist() == [[1, 2, 3, 4]] and p.index.tolist() == [[0, 1, 2, 3]] * 2


def test_item_groups_follow_the_collator_layout():
    ids = torch.zeros(6, 3, dtype=torch.long)
    assert item_groups({"input_ids": ids, "index": torch.arange(3)}) == [[0, 3], [1, 4], [2, 5]]
    assert item_groups({"input_ids": ids, "index": torch.arange(2)}) == [[0, 2, 4], [1, 3, 5]]
    assert item_groups({"input_ids": ids, "index": torch.arange(6)}) is None  # one row per item (SFT)
    assert item_groups({"input_ids": ids}) is None
    # a rollout: one index per row, a prompt's rows anywhere (a shuffled mini-batch)
    assert item_groups({"input_ids": ids, "index": torch.tensor([7, 3, 7, 7, 3, 9])}) == [[0, 2, 3], [1, 4], [5]]


def test_a_group_too_long_to_pack_whole_is_split_into_runs():
    """Prompt of 2 tokens, responses of 3: a run of k rows packs to 2 + 3k positions."""
    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 6, 7, 8], [1, 2, 9, 9, 9], [1, 2, 5, 5, 5]])
    mask = torch.ones_like(ids)
    assert bounded(ids, mask, [0, 1, 2, 3], 14) == [[0, 1, 2, 3]]
    assert bounded(ids, mask, [0, 1, 2, 3], 11) == [[0, 1, 2], [3]]
    assert bounded(ids, mask, [0, 1, 2, 3], 8) == [[0, 1], [2, 3]]
    assert bounded(ids, mask, [0, 1, 2, 3], 3) == [[0], [1], [2], [3]]  # a run of one may be longer


def test_eager_mask_is_additive():
    allowed = torch.tensor([[[[True, False], [True, True]]]])
    m = attention_mask_for(allowed, "eager", torch.float32)
    assert m[0, 0, 0, 0] == 0 and m[0, 0, 0, 1] == torch.finfo(torch.float32).min
    assert attention_mask_for(allowed, "sdpa", torch.float32) is allowed
    assert attention_mask_for(allowed, "flash_attention_2", torch.float32) is None


def _model(lora: bool = False, gc: bool = False, attn: str | None = None):
    torch.manual_seed(0)
    extra = {"attn_implementation": attn} if attn else {}
    model = load_causal_lm(ModelSpec("local:tiny-llama", lora=LoraSpec(r=4) if lora else None,
                                     gradient_checkpointing=gc, extra=extra))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # trained adapters (fresh ones add 0)
            p.data.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def batches(tokenizer) -> dict:
    """Real preference pairs whose prompts differ in length; the same pairs with the rejected response
    starting like the chosen one (a common start past the prompt); and groups of three responses."""
    enc, _ = encode_examples(read_examples("local:tiny-arith/prefs_train", "preference", 3), tokenizer, 64)
    items = [replace(item, prompt_ids=item.prompt_ids[cut:]) for item, cut in zip(enc, (0, 4, 9), strict=True)]
    shared = [replace(it, responses=[it.responses[0], it.responses[0][:3] + it.responses[1]]) for it in items]
    three = [replace(it, responses=[*it.responses, it.responses[1][:2]]) for it in items]
    collate = Collator(tokenizer.pad_token_id)
    return {"pairs": collate(items), "shared_start": collate(shared), "three": collate(three)}


def _values_and_grads(model, batch, share: bool, responses_only: bool = False):
    model.zero_grad(set_to_none=True)
    out = lean_forward(model, batch, entropy=True, logits_stats=True, hidden=True, chunk_size=5, share_prefix=share,
                       responses_only=responses_only)
    resp = batch["response_mask"]
    loss = (out.logps * resp).sum() + 0.1 * (out.entropy * resp).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("lora,gc,attn", [(False, False, None), (True, False, None), (True, True, None),
                                          (False, False, "eager")],
                         ids=["full", "lora", "lora-gradient-checkpointing", "eager"])
@pytest.mark.parametrize("name", ["pairs", "shared_start", "three"])
def test_packed_forward_equals_the_padded_batch(lora, gc, attn, name, batches):
    batch = batches[name]
    model = _model(lora, gc, attn)
    packed = packing_for(model.get_base_model().model if lora else model.model, batch)
    assert packed is not None  # packing is taken, and runs fewer positions
    assert packed[0].positions < batch["input_ids"].numel()
    if name == "shared_start":  # the common start of the two responses is in the prefix
        first_response = int(batch["response_mask"][0].nonzero()[0]) + 1
        assert common_prefix(batch["input_ids"], batch["attention_mask"], [0, 3]) >= first_response + 3
    ref, ref_grads = _values_and_grads(model, batch, share=False)
    out, grads = _values_and_grads(model, batch, share=True)
    resp = batch["response_mask"].bool()
    for a, b in ((out.logps, ref.logps), (out.entropy, ref.entropy)):
        torch.testing.assert_close(a[resp], b[resp], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logit_mean[resp], ref.logit_mean[resp], rtol=0, atol=1e-6)
    assert torch.equal(out.hits[resp], ref.hits[resp])
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out.hidden[valid], ref.hidden[valid], rtol=0, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for key, g in ref_grads.items():
        assert (grads[key] - g).norm() <= 1e-5 * g.norm() + 1e-9, key
    assert torch.isfinite(out.hidden).all()


def test_a_left_padded_rollout_packs_by_its_row_index(tokenizer):
    """GRPO's layout: prompts left-padded to one width, responses after them right-padded, `index` per row;
    two prompts x three responses, rows shuffled as in a mini-batch."""
    model = _model()
    g = torch.Generator().manual_seed(3)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts = [torch.randint(5, vocab, (n,), generator=g) for n in (6, 9)]
    width, R = 9, 5
    rows, order = [], [0, 1, 0, 1, 1, 0]
    for i, item in enumerate(order):
        n_resp = 2 + i % 3
        row = torch.zeros(width + R, dtype=torch.long)
        mask = torch.zeros(width + R, dtype=torch.long)
        row[width - len(prompts[item]):width], mask[width - len(prompts[item]):width] = prompts[item], 1
        row[width:width + n_resp] = torch.randint(5, vocab, (n_resp,), generator=g)
        mask[width:width + n_resp] = 1
        rows.append((row, mask))
    ids, attn = torch.stack([r for r, _ in rows]), torch.stack([m for _, m in rows])
    resp = torch.zeros(len(rows), width + R - 1)
    resp[:, width - 1:] = attn[:, width:]
    batch = {"input_ids": ids, "attention_mask": attn, "response_mask": resp, "index": torch.tensor(order)}
    packed = packing_for(model.model, batch)
    assert packed is not None and packed[0].input_ids.shape[0] == 2  # one packed sequence per prompt
    ref, ref_grads = _values_and_grads(model, batch, share=False)
    out, grads = _values_and_grads(model, batch, share=True, responses_only=True)
    m = resp.bool()
    torch.testing.assert_close(out.logps[m], ref.logps[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.entropy[m], ref.entropy[m], rtol=0, atol=1e-5)
    for key, g_ref in ref_grads.items():
        assert (grads[key] - g_ref).norm() <= 1e-5 * g_ref.norm() + 1e-9, key


@pytest.mark.parametrize("share", [False, True], ids=["padded", "packed"])
def test_responses_only_projects_the_response_tokens_alone(share, batches):
    """The same values on response tokens, zeros elsewhere (the full projection has other rows' prompt tokens
    and padding after the earliest response token), the same gradients."""
    batch = batches["pairs"]
    model = _model()
    ref, ref_grads = _values_and_grads(model, batch, share=False)
    out, grads = _values_and_grads(model, batch, share=share, responses_only=True)
    resp = batch["response_mask"].bool()
    first = int(resp.any(0).float().argmax())
    assert ref.logps[:, first:][~resp[:, first:]].abs().sum() > 0  # the full projection computed them
    for a, b in ((out.logps, ref.logps), (out.entropy, ref.entropy), (out.logit_mean, ref.logit_mean)):
        torch.testing.assert_close(a[resp], b[resp], rtol=0, atol=1e-5)
        assert not a[~resp].any()
    assert torch.equal(out.hits[resp], ref.hits[resp])
    for key, g in ref_grads.items():
        assert (grads[key] - g).norm() <= 1e-5 * g.norm() + 1e-9, key


def test_packing_is_off_where_it_cannot_serve(batches, caplog):
    model = _model()
    sft = {k: v[:3] for k, v in batches["pairs"].items() if k != "index"} | {"index": torch.arange(3)}
    assert packing_for(model.model, sft) is None  # one row per item
    model.config._attn_implementation = "flash_attention_2"
    with caplog.at_level(logging.INFO, logger="amrlhf.models.forward"):
        assert packing_for(model.model, batches["pairs"]) is None
    assert "takes no 4D mask" in caplog.text
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = 4  # shorter than the batch: a 4D mask would override the window
    assert packing_for(model.model, batches["pairs"]) is None


def test_dpo_step_with_and_without_packing(tokenizer, batches):
    from amrlhf.modules import DPOModule, FrozenReference

    batch = batches["pairs"]
    results = {}
    for share in (False, True):
        torch.manual_seed(0)
        m = DPOModule(ModelSpec("local:tiny-llama"), reference=FrozenReference(), share_prefix=share)
        m.configure_model()
        m.reference.setup(m)
        with torch.no_grad():  # a trained policy, so that the log-ratios are not zero
            for p in m.policy.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        loss, stats = m.model_step(batch, "train")
        loss.backward()
        results[share] = (loss.detach(), stats, {n: p.grad for n, p in m.policy.named_parameters()})
    (l0, s0, g0), (l1, s1, g1) = results[False], results[True]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert abs(float(s0["rewards/margins"].mean())) > 1e-4
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logits/chosen"):
        torch.testing.assert_close(s1[key], s0[key], rtol=1e-5, atol=1e-5)
    for key, g in g0.items():
        assert (g1[key] - g).norm() <= 1e-5 * g.norm() + 1e-9, key


def test_the_reference_is_packed_as_the_policy_is(tokenizer, batches):
    """At step 0 the policy and its reference compute the same log-probs bit for bit, packed or not."""
    from amrlhf.modules import DPOModule, FrozenReference

    for share in (False, True):
        m = DPOModule(ModelSpec("local:tiny-llama"), reference=FrozenReference(), share_prefix=share)
        m.configure_model()
        m.reference.setup(m)
        _, stats = m.model_step(batches["pairs"], "train")
        assert torch.equal(stats["rewards/margins"], torch.zeros_like(stats["rewards/margins"]))
