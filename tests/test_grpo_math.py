"""The critic-free family's pure functions against values worked out by hand: advantage estimators,
loss aggregations, clip-higher and its statistics, dense token signals, TRL's reward statistics, and the
verifiable reward's components and errors."""

import math

import pytest
import torch
from torch.testing import assert_close

from amrlhf.data.collate import pad_rows
from amrlhf.errors import AmrlhfError, ConfigError
from amrlhf.losses import (
    ConstantNormalizer,
    GroupRelative,
    LeaveOneOut,
    ReinforcePlusPlus,
    SequenceMean,
    TokenMean,
)
from amrlhf.losses.dense import group_normalise, token_signal
from amrlhf.losses.ppo import clip_fractions, clipped_surrogate, policy_loss
from amrlhf.modules.grpo import completion_stats, reward_stats
from amrlhf.rewards import (
    ArithmeticAnswerReward,
    ArithmeticStepsReward,
    FunctionReward,
    NumberAnswerReward,
    RegexReward,
    VerifiableReward,
)

# two groups of four responses, two response tokens each
SCORES = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
RESP = torch.ones(8, 2)
ZERO = torch.zeros(8, 2)


def test_group_relative_advantage_by_hand():
    adv = GroupRelative().estimate(SCORES, ZERO, RESP, 4)
    # group 1: mean 0.25, unbiased var (0.75^2 + 3 x 0.25^2) / 3 = 0.25, std 0.5; eps 1e-4 as TRL
    assert adv[0].tolist() == pytest.approx([0.75 / 0.5001] * 2)
    assert adv[1].tolist() == pytest.approx([-0.25 / 0.5001] * 2)
    assert adv[4:].abs().max() == 0  # a group whose rewards are equal carries no signal
    unscaled = GroupRelative(scale_by_std=False).estimate(SCORES, ZERO, RESP, 4)
    assert unscaled[:4, 0].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_group_relative_counts_the_kl_reward_and_leaves_padding_zero():
    resp = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    non_score = torch.tensor([[-0.5, -0.5], [-0.25, -9.0]])  # the -9 is outside the response: ignored
    adv = GroupRelative(scale_by_std=False).estimate(torch.tensor([1.0, 1.0]), non_score, resp, 2)
    # returns 1 - 1 = 0 and 1 - 0.25 = 0.75: mean 0.375
    assert_close(adv, torch.tensor([[-0.375, -0.375], [0.375, 0.0]]))


def test_leave_one_out_by_hand():
    adv = LeaveOneOut().estimate(SCORES, ZERO, RESP, 4)
    assert adv[:4, 0].tolist() == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])
    assert adv[4:].abs().max() == 0
    with pytest.raises(ValueError, match="at least 2"):
        LeaveOneOut().estimate(SCORES, ZERO, RESP, 1)


def test_reinforce_plus_plus_returns_to_go_whitened_over_the_batch():
    resp = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # no baseline, no KL: returns row 0 = [1, 1], row 1 = [0]; over 3 tokens mean 2/3, unbiased var 1/3
    adv = ReinforcePlusPlus(baseline=False).estimate(torch.tensor([1.0, 0.0]), torch.zeros(2, 3), resp, 1)
    s = math.sqrt(1 / 3)
    assert_close(adv, torch.tensor([[(1 / 3) / s, (1 / 3) / s, 0.0], [(-2 / 3) / s, 0.0, 0.0]]))
    # the per-token KL reward accumulates backwards: r = [-0.1, 1 - 0.2], returns [0.7, 0.8]
    kl = torch.tensor([[-0.1, -0.2, 0.0], [0.0, 0.0, 0.0]])
    adv = ReinforcePlusPlus(baseline=False).estimate(torch.tensor([1.0, 0.0]), kl, resp, 1)
    returns = torch.tensor([0.7, 0.8, 0.0])
    mean, std = returns.mean(), returns.std()
    assert adv[0, :2].tolist() == pytest.approx(((returns[:2] - mean) / std).tolist(), abs=1e-5)
    # with the group baseline two equal scores give zero returns before whitening (all tokens equal: 0)
    same = ReinforcePlusPlus().estimate(torch.tensor([3.0, 3.0]), torch.zeros(2, 3), resp, 2)
    assert same.abs().max() == 0
    with pytest.raises(ConfigError):
        ReinforcePlusPlus(gamma=0.0)


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert TokenMean().reduce(per_token, mask, 4).item() == pytest.approx(7 / 3)
    assert SequenceMean().reduce(per_token, mask, 4).item() == pytest.approx((1.5 + 4) / 2)
    assert ConstantNormalizer().reduce(per_token, mask, 4).item() == pytest.approx(7 / 8)
    assert ConstantNormalizer(max_tokens=7).reduce(per_token, mask, 4).item() == pytest.approx(7 / 14)
    empty = torch.zeros(2, 3)  # a fully masked mini-batch is a zero loss, never NaN
    for agg in (TokenMean(), SequenceMean(), ConstantNormalizer()):
        assert agg.reduce(per_token, empty, 4).item() == 0.0


def test_clip_higher_and_trl_clip_statistics():
    logps = torch.log(torch.tensor([[1.25, 0.7, 1.5, 1.0]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    per_token, ratio = clipped_surrogate(logps, old, adv, 0.2, 0.28)
    # r 1.25, A+: inside [0.8, 1.28]: -1.25; r 0.7, A-: clipped at 0.8: 0.8; r 1.5, A+: clipped at 1.28: -1.28
    assert_close(per_token, torch.tensor([[-1.25, 0.8, -1.28, 1.0]]))
    symmetric, _ = clipped_surrogate(logps, old, adv, 0.2)
    assert symmetric[0, 0].item() == pytest.approx(-1.2)  # with clip 0.2 both ways the first token is clipped
    stats = clip_fractions(ratio, adv, torch.ones(1, 4), 0.2, 0.28)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(0.25)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(0.25)
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(0.5)


def test_ppo_policy_loss_is_the_mean_of_the_symmetric_surrogate():
    logps = torch.log(torch.tensor([[1.25, 0.7, 1.5, 1.0]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, stats = policy_loss(logps, torch.zeros(1, 4), adv, torch.ones(1, 4), 0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 1.2 + 1.0) / 4)
    assert stats["policy/clipfrac"].item() == pytest.approx(0.75)


def test_dense_increments_start_from_the_prompt_score_and_normalise_per_group():
    scores = torch.tensor([[9.0, 0.5, 1.0], [9.0, 2.0, 2.0]])
    resp = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    d = token_signal(scores, torch.tensor([0.2, 1.0]), resp, "increment")
    assert_close(d, torch.tensor([[0.0, 0.3, 0.5], [0.0, 1.0, 0.0]]))
    assert_close(token_signal(scores, None, resp, "level"), torch.tensor([[0, 0.5, 1.0], [0, 2.0, 0]]))
    z = group_normalise(d, resp, 2)
    values = torch.tensor([0.3, 0.5, 1.0])  # the group's three response tokens
    expected = (values - values.mean()) / (values.std() + 1e-4)
    assert [z[0, 1].item(), z[0, 2].item(), z[1, 1].item()] == pytest.approx(expected.tolist(), abs=1e-5)
    assert z[0, 0] == 0 and z[1, 2] == 0


def test_group_normalise_has_no_cancellation_on_a_large_offset():
    torch.manual_seed(0)
    resp = torch.ones(16, 64)
    values = 100.0 + 1e-2 * torch.randn(16, 64)  # level scores with an offset, small spread
    z = group_normalise(values, resp, 8)
    for g in range(2):
        part = z[8 * g:8 * g + 8].flatten()
        spread = values[8 * g:8 * g + 8].double().std().item()
        # a one-pass variance (sum of squares - n mean^2) in float32 is off by far more than this here
        assert abs(part.mean().item()) < 1e-2
        assert part.std().item() == pytest.approx(spread / (spread + 1e-4), rel=0.02)


def test_trl_reward_and_completion_statistics():
    stats = reward_stats(SCORES, 4, {"a": SCORES * 2})
    assert stats["reward"].item() == pytest.approx(9 / 8)
    assert stats["reward_std"].item() == pytest.approx(SCORES.std().item())
    assert stats["frac_reward_zero_std"].item() == 0.5  # the second group
    assert stats["rewards/a/mean"].item() == pytest.approx(9 / 4)
    resp = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    c = completion_stats(resp, torch.tensor([False, True]))
    assert (c["completions/mean_length"].item(), c["completions/min_length"].item(),
            c["completions/max_length"].item()) == (2.0, 1.0, 3.0)
    assert c["completions/clipped_ratio"].item() == 0.5 and c["completions/mean_terminated_length"].item() == 1.0
    none_ended = completion_stats(resp, torch.tensor([False, False]))
    assert none_ended["completions/mean_terminated_length"].item() == 0.0  # TRL's value when none ended


def test_reward_components_check_answers():
    assert NumberAnswerReward().check("", "so 1,200 in all.\n#### 1200", {"target": "1200"}) == 1.0
    assert NumberAnswerReward().check("", "#### 12", {"target": "1200"}) == 0.0
    assert NumberAnswerReward(field="completion").check("", "3 plus 4 is 7.", {"completion": "3 plus 4 is 7."}) == 1.0
    solution = "Mia has 12. 12 + 5 = 17. 17 - 3 = 15. The answer is 15."
    assert ArithmeticAnswerReward().check("", solution, {"answer": 14, "start": 12}) == 0.0
    assert ArithmeticAnswerReward().check("", solution.replace("15", "14"), {"answer": 14, "start": 12}) == 1.0
    # steps 12 + 5 = 17 (right), 17 - 3 = 15 against a true total of 14 (wrong): half right
    assert ArithmeticStepsReward().check("", solution, {"start": 12, "answer": 14}) == 0.5
    assert ArithmeticStepsReward().check("", "The answer is 14.", {"start": 12}) == 0.0  # no equations
    assert RegexReward(r"#### -?\d+").check("", "x\n#### 42", {}) == 1.0
    assert RegexReward(r"\d+", full=True).check("", " 42a ", {}) == 0.0
    with pytest.raises(ConfigError, match="not a regular expression"):
        RegexReward("(")


def test_verifiable_reward_sums_components_at_the_last_token_and_names_the_row_of_a_failure(tokenizer):
    ids = tokenizer("3 plus 4 is 7.", add_special_tokens=False)["input_ids"]
    batch = pad_rows([([1, 2], ids), ([1, 2], ids[:3])], tokenizer.pad_token_id)
    rows = [{"source": "data.jsonl", "line": 7, "prompt": "What is 3 plus 4?", "fields": {"completion": "7"}}] * 2
    reward = VerifiableReward([NumberAnswerReward(field="completion"), RegexReward("plus", name="says_plus")],
                              weights=[1.0, 0.5])
    reward.tokenizer = tokenizer
    ts = reward.score({**batch, "rows": rows}, "train")
    resp = batch["response_mask"]
    last = (resp * torch.arange(resp.shape[1])).argmax(-1)
    assert ts.scores[0, last[0]].item() == pytest.approx(1.5)  # 7 is the answer, and it says plus
    assert ts.scores[1, last[1]].item() == pytest.approx(0.5)  # '3 plus' (cut): no 7
    assert ts.scores.sum().item() == pytest.approx(2.0)  # nothing anywhere else
    assert ts.components["number_answer"].tolist() == [1.0, 0.0]

    def broken(prompt, response):
        raise ZeroDivisionError("division by zero")

    bad = VerifiableReward([FunctionReward(broken)])
    bad.tokenizer = tokenizer
    with pytest.raises(AmrlhfError, match=r"reward 'broken' failed on the prompt of data.jsonl line 7 .*ZeroDivision"):
        bad.score({**batch, "rows": rows}, "train")
    nan = VerifiableReward([FunctionReward(lambda p, r: float("nan"), name="nan")])
    nan.tokenizer = tokenizer
    with pytest.raises(AmrlhfError, match="returned nan for the prompt of data.jsonl line 7: expected a finite"):
        nan.score({**batch, "rows": rows}, "train")
    missing = VerifiableReward([NumberAnswerReward()])  # field 'target' is not in the row
    missing.tokenizer = tokenizer
    with pytest.raises(AmrlhfError, match="no field 'target'"):
        missing.score({**batch, "rows": rows}, "train")
    with pytest.raises(ConfigError, match="names must differ"):
        VerifiableReward([RegexReward("a"), RegexReward("b")])


def test_reward_spread_is_measured_on_what_the_estimator_sees():
    # a tied group (all 1.0) with one truncated member: the missing-EOS penalty (-1) gives it signal
    raw = torch.tensor([1.0, 1.0, 1.0, 1.0])
    seen = torch.tensor([1.0, 1.0, 1.0, 0.0])
    stats = reward_stats(raw, 4, None, seen=seen)
    assert stats["reward"].item() == 1.0  # the mean stays the raw reward's
    assert stats["frac_reward_zero_std"].item() == 0.0
    assert stats["reward_std"].item() == pytest.approx(0.5)  # sd of (1, 1, 1, 0), unbiased
    assert reward_stats(raw, 4, None)["frac_reward_zero_std"].item() == 1.0


def test_soft_overlong_punishment_by_hand():
    from amrlhf.losses import SoftOverlongPunishment

    # L_max 10, L_cache 4: free up to 6 tokens, then -(|y| - 6) / 4, -1 past the budget
    p = SoftOverlongPunishment(cache=4).penalty(torch.tensor([3, 6, 7, 8, 10, 11]), 10)
    assert p.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert SoftOverlongPunishment(cache=4, factor=0.5).penalty(torch.tensor([8]), 10).tolist() == [-0.25]
    with pytest.raises(ConfigError, match="longer than the sampling budget"):
        SoftOverlongPunishment(cache=12).penalty(torch.tensor([1]), 10)
    with pytest.raises(ConfigError, match="cache must be >= 1"):
        SoftOverlongPunishment(cache=0)


def test_zero_std_groups_by_hand():
    from amrlhf.losses import zero_std_groups

    assert zero_std_groups(SCORES, 4).tolist() == [False] * 4 + [True] * 4
