"""Loss math against values worked out by hand."""

import math

import pytest
import torch

from amrlhf.losses import (
    IPO,
    HingeDPO,
    RobustDPO,
    SigmoidDPO,
    bradley_terry_loss,
    centring_term,
    dpo_stats,
    masked_mean,
    nll_sums,
    reward_stats,
    token_logprobs,
)


def ls(x):  # log sigmoid
    return -math.log1p(math.exp(-x))


def test_token_logprobs_hand_values_and_alignment():
    # vocab 2; logits at position 0 predict token 1 of input_ids
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]]])
    ids = torch.tensor([[1, 1, 0]])
    lp = token_logprobs(logits, ids)
    assert lp.shape == (1, 2)
    # position 0: uniform -> log 1/2 for token 1; position 1: p(0) = 3/4
    assert torch.allclose(lp, torch.tensor([[math.log(0.5), math.log(0.75)]]))


def test_token_logprobs_chunked_equals_full_log_softmax():
    torch.manual_seed(0)
    logits, ids = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    full = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, ids, rows_per_chunk=2), full, atol=1e-6)


def test_sigmoid_dpo_hand_value():
    # D_w = 1.0, D_l = -1.0, beta 0.5 -> z = 1.0 -> -log sigmoid(1)
    loss = SigmoidDPO(beta=0.5).loss(torch.tensor([1.0]), torch.tensor([-1.0]), torch.ones(1), torch.ones(1))
    assert loss.item() == pytest.approx(-ls(1.0), rel=1e-6)


def test_cdpo_label_smoothing_hand_value():
    loss = SigmoidDPO(beta=1.0, label_smoothing=0.25).loss(torch.tensor([2.0]), torch.tensor([0.0]),
                                                           torch.ones(1), torch.ones(1))
    assert loss.item() == pytest.approx(-0.75 * ls(2.0) - 0.25 * ls(-2.0), rel=1e-6)


def test_robust_dpo_hand_value():
    loss = RobustDPO(beta=1.0, label_smoothing=0.1).loss(torch.tensor([1.0]), torch.tensor([0.0]),
                                                         torch.ones(1), torch.ones(1))
    assert loss.item() == pytest.approx((-0.9 * ls(1.0) + 0.1 * ls(-1.0)) / 0.8, rel=1e-6)


def test_hinge_dpo_hand_value():
    loss = HingeDPO(beta=0.5).loss(torch.tensor([1.0, 4.0]), torch.tensor([0.0, 0.0]), torch.ones(2), torch.ones(2))
    assert loss.tolist() == pytest.approx([0.5, 0.0])


def test_ipo_normalises_by_kept_token_count():
    # D_w = 6 over 3 tokens -> 2; D_l = 2 over 2 tokens -> 1; h = 1; beta 0.25 -> (1 - 2)^2 = 1
    loss = IPO(beta=0.25).loss(torch.tensor([6.0]), torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([2.0]))
    assert loss.item() == pytest.approx(1.0)


def test_label_smoothing_out_of_range_is_refused():
    with pytest.raises(ValueError, match="label_smoothing"):
        SigmoidDPO(label_smoothing=0.5)


def test_dpo_stats_hand_values_and_ties():
    s = dpo_stats(0.1, torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -5.0]),
                  torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0]))
    assert s["rewards/chosen"].tolist() == pytest.approx([0.1, 0.0])
    assert s["rewards/rejected"].tolist() == pytest.approx([-0.1, 0.0])
    assert s["rewards/margins"].tolist() == pytest.approx([0.2, 0.0])
    assert s["rewards/accuracies"].tolist() == [1.0, 0.0]  # TRL's: chosen > rejected, a tie counts 0


def test_nll_sums_token_mean_hand_value():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    nll, n = nll_sums(lp, mask)
    assert nll.tolist() == [3.0, 6.0] and n.tolist() == [2.0, 1.0]
    assert (nll.sum() / n.sum()).item() == pytest.approx(3.0)  # (1 + 2 + 6) / 3


def test_bradley_terry_and_reward_stats_hand_values():
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.tolist() == pytest.approx([-ls(1.0), math.log(2.0)])
    st = reward_stats(torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 0.0]))
    assert st["rm/accuracy"].item() == pytest.approx(0.5)  # 1 + 0.5 + 0 over 3
    assert st["rm/margin"].item() == pytest.approx(0.0)


def test_centring_term_hand_values():
    # pairs (1, 0) and (3, -1): (1 + 0)^2 = 1, (3 - 1)^2 = 4; a pair centred on 0 costs nothing
    assert centring_term(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([0.0, -1.0, -2.0])).tolist() == [1.0, 4.0, 0.0]


def test_masked_mean_empty_mask_is_zero_not_nan():
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


def test_all_ones_mask_equals_unmasked_dpo():
    torch.manual_seed(1)
    pol, ref = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    resp = torch.tensor([[0, 1, 1, 1, 1, 0]] * 4, dtype=torch.float32)
    d_unmasked = ((pol - ref) * resp).sum(-1)
    d_masked = ((pol - ref) * (torch.ones_like(resp) * resp)).sum(-1)
    f = SigmoidDPO(beta=0.1)
    a = f.loss(d_unmasked[:2], d_unmasked[2:], resp.sum(-1)[:2], resp.sum(-1)[2:]).mean()
    b = f.loss(d_masked[:2], d_masked[2:], resp.sum(-1)[:2], resp.sum(-1)[2:]).mean()
    assert torch.equal(a, b)


def test_token_label_loss_by_hand():
    """BCE of sigmoid(s_t) against 'good' (1 - flawed) over response tokens: softplus(-s) on good tokens,
    softplus(s) on flawed ones; accuracy counts s > 0 as good."""
    from amrlhf.losses import token_label_loss

    scores = torch.tensor([[9.0, 2.0, -1.0, 0.5], [7.0, -3.0, 1.0, 0.0]])
    flawed = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])  # the 9 and 7 are prompt positions
    loss, stats = token_label_loss(scores, flawed, mask)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    by_hand = (sp(-2.0) + sp(-1.0) + sp(0.5) + sp(3.0) + sp(-1.0)) / 5
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # right: 2.0 good (yes), -1.0 flawed (yes), 0.5 flawed (no), -3.0 good (no), 1.0 good (yes)
    assert stats["rm/token_accuracy"].item() == pytest.approx(3 / 5)
    assert stats["rm/flaw_recall"].item() == pytest.approx(1 / 2)
    assert stats["rm/flawed_frac"].item() == pytest.approx(2 / 5)
