"""PPO's pure functions against values worked out by hand."""

import math

import pytest
import torch

from amrlhf.losses import AdaptiveKL, FixedKL
from amrlhf.losses.logprobs import entropy_from_logits
from amrlhf.losses.ppo import (
    eos_penalised,
    gae,
    kl_estimate,
    policy_loss,
    shape_rewards,
    value_loss,
    whiten,
)
from amrlhf.losses.reductions import last_response_index
from amrlhf.models.forward import token_layout


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_kl_estimators():
    logp, ref = t([-1.0, -2.0]), t([-1.5, -2.0])
    assert torch.allclose(kl_estimate(logp, ref, "k1"), t([0.5, 0.0]))
    # k3 = (r - 1) - log r, r = pi_ref / pi = exp(-0.5): (0.606531 - 1) + 0.5
    assert torch.allclose(kl_estimate(logp, ref, "k3"), t([0.106531, 0.0]), atol=1e-6)
    assert (kl_estimate(t([-3.0, 0.0]), t([0.0, -3.0]), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(logp, ref, "k2")


def test_eos_penalised_subtracts_only_where_the_response_was_cut():
    scores, ended = torch.tensor([0.5, 0.5]), torch.tensor([True, False])
    assert eos_penalised(scores, ended, 2.0).tolist() == [0.5, -1.5]
    assert eos_penalised(scores, ended, None) is scores


def test_shape_rewards_adds_the_score_at_the_last_response_token():
    resp = t([0, 1, 1, 0], [1, 1, 1, 1])
    kl = t([9.0, 0.5, 0.1, 9.0], [0.0, 0.0, 0.0, 0.2])
    rewards, non_score = shape_rewards(torch.tensor([2.0, -1.0]), kl, resp, beta=0.1)
    assert torch.allclose(non_score, t([0, -0.05, -0.01, 0], [0, 0, 0, -0.02]))
    assert torch.allclose(rewards, t([0, -0.05, 1.99, 0], [0, 0, 0, -1.02]))
    assert last_response_index(resp).tolist() == [2, 3]
    empty = t([0, 0, 0, 0], [0, 1, 1, 0])
    assert last_response_index(empty).tolist() == [-1, 2] and last_response_index(empty, empty=0).tolist() == [0, 2]


def test_gae_by_hand():
    # gamma 0.9, lambda 0.8; values outside the response are ignored, V after the last token is 0
    rewards, values, resp = t([0, -0.05, 1.99, 0]), t([9.0, 0.5, 1.0, 9.0]), t([0, 1, 1, 0])
    adv, ret = gae(rewards, values, resp, gamma=0.9, lam=0.8)
    # t=2: delta = 1.99 - 1.0 = 0.99;  t=1: delta = -0.05 + 0.9 * 1.0 - 0.5 = 0.35, A = 0.35 + 0.72 * 0.99
    assert torch.allclose(adv, t([0, 1.0628, 0.99, 0]), atol=1e-6)
    assert torch.allclose(ret, t([0, 1.5628, 1.99, 0]), atol=1e-6)
    # gamma = lambda = 1: the advantage is the return-to-go minus V
    adv1, _ = gae(t([0.0, 1.0, 2.0]), t([0.5, 0.5, 0.5]), t([1, 1, 1]), gamma=1.0, lam=1.0)
    assert torch.allclose(adv1, t([2.5, 2.5, 1.5]))


def test_whiten_over_valid_tokens_only():
    out = whiten(t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0]))
    assert torch.allclose(out, t([-1.0, 0.0, 1.0, 0.0]), atol=1e-6)  # mean 2, unbiased var 1
    kept = whiten(t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0]), shift_mean=False)
    assert torch.allclose(kept, t([1.0, 2.0, 3.0, 0.0]), atol=1e-6)


def test_clipped_policy_loss_by_hand():
    old = t([0.0, 0.0, 0.0, 0.0])
    new = torch.log(t([1.5, 0.5, 0.5, 7.0]))
    adv = t([1.0, 1.0, -1.0, 5.0])
    loss, stats = policy_loss(new, old, adv, t([1, 1, 1, 0]), clip=0.2)
    # max(-A r, -A clip(r)): -1.2 (clipped), -0.5, 0.8 (clipped); the masked 4th token is ignored
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8) / 3, abs=1e-6)
    assert stats["policy/clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["val/ratio"].item() == pytest.approx(2.5 / 3)
    approx = 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 3
    assert stats["policy/approxkl"].item() == pytest.approx(approx, rel=1e-5)


def test_policy_loss_gradient_is_zero_where_clipped():
    new = torch.log(t([1.5, 0.5])).requires_grad_()
    loss, _ = policy_loss(new, t([0.0, 0.0]), t([1.0, 1.0]), t([1, 1]), clip=0.2)
    loss.backward()
    # token 1 clipped (ratio 1.5 > 1.2, A > 0): no gradient; token 2: d(-A r / 2)/d log r = -r / 2
    assert torch.allclose(new.grad, t([0.0, -0.25]))


def test_clipped_value_loss_by_hand():
    loss, stats = value_loss(t([1.0, 0.0]), t([0.5, 0.1]), t([2.0, 0.0]), t([1, 1]), clip=0.2)
    # V_clip = (0.7, 0.0): max(1.0, 1.69) and max(0, 0) -> 0.5 * (1.69 + 0) / 2
    assert loss.item() == pytest.approx(0.4225)
    assert stats["val/clipfrac"].item() == pytest.approx(0.5)


def test_kl_controllers():
    fixed = FixedKL(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    ctl = AdaptiveKL(value=0.1, target=6.0, horizon=100)
    ctl.update(9.0, 10)  # error clipped to +0.2: beta *= 1 + 0.2 * 10 / 100
    assert ctl.value == pytest.approx(0.102)
    ctl.update(3.0, 10)  # error clipped to -0.2
    assert ctl.value == pytest.approx(0.102 * 0.98)
    other = AdaptiveKL()
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value


def test_entropy_and_kept_layout():
    assert torch.allclose(entropy_from_logits(torch.zeros(1, 3, 2)), torch.full((1, 3), math.log(2)))
    kept = t([10.0, 20.0, 30.0])  # K = 3 kept positions of a T = 5 sequence: positions 2, 3, 4
    assert token_layout(kept[:, :-1], 5).tolist() == [[0.0, 0.0, 10.0, 20.0]]


def _ppo_rank(rank: int, init: str, out: str) -> None:
    """One of two gloo ranks: a rollout whose KL, raw scores and token scores are this rank's own."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from amrlhf.models import ModelSpec
    from amrlhf.modules import PPOModule
    from amrlhf.scorers import TokenScores
    from amrlhf.segmenters import AdaptivePivotSegmenter

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        module = PPOModule(ModelSpec("local:tiny-llama"), reward=None, kl=AdaptiveKL(value=0.1, target=1.0, horizon=4),
                           segmenter=AdaptivePivotSegmenter(), seed=0)
        resp = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
        roll = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4),
                "response_mask": resp}
        kl_per_token = 0.5 if rank == 0 else 2.5  # sequence KL 1 on rank 0, 5 on rank 1: mean 3 over the ranks
        raw = torch.tensor([1.0, 2.0]) if rank == 0 else torch.tensor([5.0, 6.0])  # mean 3.5 over the ranks
        seen = {}
        module.sample = lambda prompts, seed: ({k: v.clone() for k, v in roll.items()}, torch.ones(2, dtype=torch.bool),
                                               [{}, {}])
        module.old_outputs = lambda r: (torch.zeros(2, 3), torch.zeros(2, 4))
        module.reference = SimpleNamespace(logps=lambda m, r, split: torch.full((2, 3), -kl_per_token))
        module.sequence_scores = lambda r, ended, rows, split: (raw, raw, None)

        def actor_mask(r, ts, rows):
            seen["labels"] = r["labels"].clone()
            return resp, None

        module.actor_mask = actor_mask
        module.optimise = lambda r: {}
        module.lr_schedulers = lambda: None
        module.log_stats = module.log_sometimes = lambda *args, **kwargs: None
        module.training_step({}, 0)
        fresh = PPOModule(ModelSpec("local:tiny-llama"), reward=None, segmenter=AdaptivePivotSegmenter(), seed=0)
        scores = torch.tensor([[0.0, 1.0, 3.0], [0.0, 2.0, 4.0]]) * (1 if rank == 0 else 10)
        fresh.actor_mask({**roll, "labels": torch.tensor([1, -1])}, TokenScores(scores, torch.zeros(2)), [{}, {}])
        torch.save({"kl_coef": module.kl_ctl.value, "labels": seen["labels"], "scale": fresh.segmenter.scale},
                   f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ppo_rollout_statistics_are_pooled_over_ranks(tmp_path):
    """Under DDP each rank samples its own rollout: AdaptiveKL's update, AM-PPO's first label baseline and the
    score scale (measured on the first segmented rollout) come from every rank's rollout, so every rank holds
    the same state (and a checkpoint, rank 0's, is every rank's)."""
    torch.multiprocessing.spawn(_ppo_rank, args=(f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    expected = AdaptiveKL(value=0.1, target=1.0, horizon=4)
    expected.update(3.0, 4)  # the mean sequence KL and the number of sequences of both ranks
    for state in ranks:
        assert state["kl_coef"] == pytest.approx(expected.value)
    assert ranks[0]["labels"].tolist() == [-1, -1] and ranks[1]["labels"].tolist() == [1, 1]  # against 3.5
    pooled = torch.tensor([1.0, 3.0, 2.0, 4.0, 10.0, 30.0, 20.0, 40.0]).std().item()
    assert ranks[0]["scale"] == pytest.approx(pooled) and ranks[1]["scale"] == pytest.approx(pooled)
