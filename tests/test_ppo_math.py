"""PPO's formulas pinned against values computed by hand (see the comments for the arithmetic)."""

import math

import pytest
import torch

from qwen_tune.rl.ppo_math import (
    AdaptiveKLController,
    entropy_from_logits,
    gae,
    kl_estimate,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0)


# ---------------------------------------------------------------- GAE


def test_gae_matches_hand_computation():
    # gamma 1, lam 0.5, V = .5 .6 .7, reward 1 on the last token:
    # t2: delta = 1 - .7 = .3 -> A=.3; t1: delta = .7 - .6 = .1 -> A = .1 + .5*.3 = .25; t0: .1 + .5*.25 = .225
    adv, ret = gae(t([0, 0, 1]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=1.0, lam=0.5)
    close(adv, t([0.225, 0.25, 0.3]))
    close(ret, t([0.725, 0.85, 1.0]))


def test_gae_with_discount():
    # gamma .9, lam .95: t2: .3; t1: .9*.7-.6 = .03 -> .03 + .855*.3 = .2865; t0: .9*.6-.5 = .04 -> .04 + .855*.2865
    adv, _ = gae(t([0, 0, 1]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=0.9, lam=0.95)
    close(adv, t([0.04 + 0.855 * 0.2865, 0.2865, 0.3]))


def test_gae_ignores_padding_after_the_end():
    # The episode ends after token 1: the padded reward 99 and value 42 must not leak back.
    # gamma = lam = 1: returns are the Monte Carlo return (2) at every real token.
    adv, ret = gae(t([0, 2, 99], [0, 0, 1]), t([0.5, 1.0, 42], [0, 0, 0]), t([1, 1, 0], [1, 1, 1]), gamma=1.0, lam=1.0)
    close(adv, t([1.5, 1.0, 0.0], [1.0, 1.0, 1.0]))
    close(ret, t([2.0, 2.0, 0.0], [1.0, 1.0, 1.0]))


# ---------------------------------------------------------------- losses


def test_clipped_policy_loss():
    # ratios 1.5, 0.5, 1.1 with advantages 1, -1, 2 and clip .2:
    # max(-1.5, -1.2) = -1.2 (clipped); max(.5, .8) = .8 (clipped); max(-2.2, -2.2) = -2.2 -> mean -2.6/3
    # The 4th token is padding: its huge ratio and advantage must not count.
    logprobs = torch.log(t([1.5, 0.5, 1.1, 50.0]))
    loss, clipfrac = policy_loss(logprobs, torch.zeros(1, 4), t([1, -1, 2, 100]), t([1, 1, 1, 0]), cliprange=0.2)
    close(loss, -2.6 / 3)
    close(clipfrac, 2 / 3)


def test_policy_loss_gradient_vanishes_once_clipped():
    logprobs = torch.log(t([1.5])).requires_grad_()
    loss, _ = policy_loss(logprobs, torch.zeros(1, 1), t([1.0]), t([1.0]), cliprange=0.2)
    loss.backward()
    assert logprobs.grad.abs().item() == 0.0  # ratio 1.5 > 1.2 with A > 0: no push further
    logprobs = torch.log(t([1.1])).requires_grad_()
    loss, _ = policy_loss(logprobs, torch.zeros(1, 1), t([1.0]), t([1.0]), cliprange=0.2)
    loss.backward()
    close(logprobs.grad, t([-1.1]))  # d(-A * exp(logp))/dlogp = -ratio


def test_clipped_value_loss():
    # old V 0, new V .5 and -.1, return 1, clip .2: token 0: clipped V .2 -> max(.25, .64) = .64;
    # token 1: within the clip -> 1.21 both; loss = .5 * (.64 + 1.21) / 2
    loss, clipfrac = value_loss(t([0.5, -0.1]), t([0.0, 0.0]), t([1.0, 1.0]), t([1, 1]), cliprange_value=0.2)
    close(loss, 0.4625)
    close(clipfrac, 0.5)


# ---------------------------------------------------------------- KL and rewards


def test_kl_estimators_by_hand():
    # p = .5, q = .25: log p/q = ln 2; k2 = ln(2)^2 / 2; k3 = (q/p - 1) - ln(q/p) = -.5 + ln 2
    lp, lq = torch.log(t([0.5])), torch.log(t([0.25]))
    close(kl_estimate(lp, lq, "k1"), t([math.log(2)]))
    close(kl_estimate(lp, lq, "k2"), t([math.log(2) ** 2 / 2]))
    close(kl_estimate(lp, lq, "k3"), t([-0.5 + math.log(2)]))
    close(kl_estimate(lp, lp, "k3"), t([0.0]))
    with pytest.raises(ValueError):
        kl_estimate(lp, lq, "k9")


def test_k1_and_k3_are_unbiased_for_the_exact_kl():
    # Expectation under the actor p of the per-sample estimate = KL(p || q) exactly.
    p, q = t(0.7, 0.2, 0.1), t(0.3, 0.3, 0.4)
    exact = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        close((p * kl_estimate(p.log(), q.log(), kind)).sum(), exact)
    assert (kl_estimate(p.log(), q.log(), "k3") >= 0).all()


def test_token_rewards_put_the_score_on_the_last_real_token():
    kl = t([0.1, 0.2, 0.3], [0.5, 0.5, 9.0])
    rewards = token_rewards(t(1.0, 2.0), kl, t([1, 1, 1], [1, 1, 0]), kl_coef=0.1)
    close(rewards, t([-0.01, -0.02, 0.97], [-0.05, 1.95, 0.0]))


def test_whitening():
    x, mask = t([2.0, 4.0, 6.0, 100.0]), t([1, 1, 1, 0])
    # mean 4, unbiased variance (4 + 0 + 4) / 2 = 4 -> (x - 4) / 2; padding stays 0
    close(masked_whiten(x, mask), t([-1.0, 0.0, 1.0, 0.0]), tol=1e-4)
    close(masked_whiten(x, mask, shift_mean=False), t([3.0, 4.0, 5.0, 0.0]), tol=1e-4)


def test_entropy():
    close(entropy_from_logits(torch.zeros(4)), math.log(4))
    close(entropy_from_logits(torch.log(t(0.5, 0.25, 0.25))), 1.5 * math.log(2))


def test_adaptive_kl_controller():
    fixed = AdaptiveKLController(0.1)
    assert fixed.update(100.0, 8) == 0.1
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    close(ctl.update(12.0, 8), 0.1 * (1 + 0.2 * 8 / 10000), tol=1e-9)  # error 1 is clipped to .2
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    close(ctl.update(5.4, 8), 0.1 * (1 - 0.1 * 8 / 10000), tol=1e-9)  # 5.4 / 6 - 1 = -.1


def test_collapse_is_reported_with_what_to_change_but_convergence_is_not():
    from qwen_tune.rl.rollouts import collapse_warning

    cats, short = ["I prefer cats."] * 8, ["I cats"] * 8
    assert collapse_warning([cats, cats, cats], [1.0, 1.0, 1.0], best_reward=1.0) is None  # converged on the best answer
    warning = collapse_warning([short, short, short], [0.0, 0.0, 0.0], best_reward=1.0)
    assert "every reply of the last 3 steps was 'I cats', with reward +0.000 below the run's best +1.000" in warning
    assert "lower --learning_rate, raise --kl_coef" in warning
    assert "was empty" in collapse_warning([[""] * 8] * 3, [0.5] * 3, best_reward=0.5)
    assert collapse_warning([short, short, cats], [0.0, 0.0, 1.0], best_reward=1.0) is None  # still varied
    assert collapse_warning([short, short], [0.0, 0.0], best_reward=1.0) is None  # too early to say
