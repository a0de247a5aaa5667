"""ops.rl + masked stats: hand-computed cases, plain-loop references, masking and gradient edge cases."""

import math
import statistics

import pytest
import torch

from lowmem_rlhf.ops import (
    explained_variance,
    gae_advantages,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    reinforce_pp_advantages,
    rloo_advantages,
)

F64 = torch.float64


def _t(rows, dtype=F64):
    return torch.tensor(rows, dtype=dtype)


def _prefix_mask(g, b, t, min_len=0):
    lengths = torch.randint(min_len, t + 1, (b,), generator=g)
    lengths[0] = t  # at least one full row, so every statistic has several valid entries
    return torch.arange(t) < lengths[:, None]


def _fill(x, mask, value):
    """`x` with every invalid entry replaced by `value` (pad garbage)."""
    return torch.where(mask, x, torch.full_like(x, value))


# ----------------------------------------------------------------------------------------------- by hand


def test_masked_var_and_whiten_by_hand():
    # valid values 1, 2, 3: mean 2, unbiased var (1 + 0 + 1) / 2 = 1, biased var 2 / 3
    x = _t([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert masked_var(x, mask).item() == pytest.approx(1.0)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2.0 / 3.0)
    s = 1.0 / math.sqrt(1.0 + 1e-8)
    torch.testing.assert_close(masked_whiten(x, mask), _t([[-s, 0.0, s, 0.0]]))
    # scale only: (x - 2) / 1 + 2, invalid entry still 0
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), _t([[2 - s, 2.0, 2 + s, 0.0]]))
    # one valid entry: unbiased variance undefined -> documented 0, whitened value 0 (no NaN)
    one = torch.tensor([[True, False, False, False]])
    assert masked_var(x, one).item() == 0.0
    torch.testing.assert_close(masked_whiten(x, one), torch.zeros_like(x))


def test_gae_by_hand():
    # gamma = 0.9, lam = 0.8 (gamma * lam = 0.72)
    # row 0, all valid: r = [1, 0, 2], V = [0.5, 1.0, 1.5]
    #   t=2: delta = 2 - 1.5 = 0.5 (value after last token is 0)         A2 = 0.5
    #   t=1: delta = 0 + 0.9 * 1.5 - 1.0 = 0.35;  A1 = 0.35 + 0.72 * 0.5  = 0.71
    #   t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4;   A0 = 1.4 + 0.72 * 0.71  = 1.9112
    #   returns = A + V = [2.4112, 1.71, 2.0]
    # row 1, mask [T, T, F], garbage 1e6 at t=2: r = [1, 2, *], V = [0.5, 1.0, *]
    #   t=1: delta = 2 - 1.0 = 1.0;               A1 = 1.0
    #   t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4;   A0 = 1.4 + 0.72 * 1.0   = 2.12
    #   returns = [2.62, 2.0, 0]
    rewards = _t([[1.0, 0.0, 2.0], [1.0, 2.0, 1e6]])
    values = _t([[0.5, 1.0, 1.5], [0.5, 1.0, 1e6]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, _t([[1.9112, 0.71, 0.5], [2.12, 1.0, 0.0]]))
    torch.testing.assert_close(ret, _t([[2.4112, 1.71, 2.0], [2.62, 2.0, 0.0]]))


def test_ppo_policy_loss_by_hand():
    # clip_range 0.2 -> ratios clipped to [0.8, 1.2]
    # tok 0: ratio 1.5, A = 1:  -A*r = -1.5, -A*clip = -1.2 -> max -1.2 (clipped term active)
    # tok 1: ratio 0.5, A = 1:  -A*r = -0.5, -A*clip = -0.8 -> max -0.5
    # tok 2: ratio 0.5, A = -2: -A*r =  1.0, -A*clip =  1.6 -> max  1.6 (clipped term active)
    # tok 3: invalid (garbage)
    # loss = (-1.2 - 0.5 + 1.6) / 3 = -0.0333..; clipfrac = 2/3
    # k3 = (r - 1) - log r: r=1.5 -> 0.5 - 0.4054651 = 0.0945349; r=0.5 -> -0.5 + 0.6931472 = 0.1931472
    # approx_kl = (0.0945349 + 2 * 0.1931472) / 3 = 0.1602764; ratio_mean = 2.5 / 3; ratio_max = 1.5
    old = _t([[-1.0, -1.0, -1.0, 0.0]])
    logprobs = old + _t([[math.log(1.5), math.log(0.5), math.log(0.5), 1e6]])
    adv = _t([[1.0, 1.0, -2.0, 1e6]])
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-0.1 / 3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["approx_kl"].item() == pytest.approx(0.1602764, abs=1e-7)
    assert stats["ratio_mean"].item() == pytest.approx(2.5 / 3)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    for v in stats.values():
        assert v.dim() == 0 and not v.requires_grad


def test_ppo_value_loss_by_hand():
    # clip 0.2
    # tok 0: V=1.0, Vold=0.5, R=1.0: Vclip=0.7; (V-R)^2 = 0,    (Vclip-R)^2 = 0.09 -> 0.09 (clipped active)
    # tok 1: V=0.6, Vold=0.5, R=0.0: Vclip=0.6; 0.36,           0.36            -> 0.36 (tie: not clipped)
    # tok 2: V=0.0, Vold=1.0, R=2.0: Vclip=0.8; 4.0,            1.44            -> 4.0
    # loss = 0.5 * (0.09 + 0.36 + 4) / 3 = 0.7416667; value_clipfrac = 1/3; value_error = 4.36 / 3
    values = _t([[1.0, 0.6, 0.0, 1e6]], dtype=torch.float32)
    old = _t([[0.5, 0.5, 1.0, -1e6]], dtype=torch.float32)
    ret = _t([[1.0, 0.0, 2.0, 1e6]], dtype=torch.float32)
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = ppo_value_loss(values, old, ret, mask, clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.7416667, abs=1e-6)
    assert stats["value_clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["value_error"].item() == pytest.approx(4.36 / 3, abs=1e-6)


def test_kl_penalty_by_hand():
    # logp - ref = [0.5, -1.0]; ref - logp = [-0.5, 1.0]
    # k1 = [0.5, -1.0]; k2 = [0.125, 0.5]
    # k3 = [exp(-0.5) - 1 + 0.5, e - 1 - 1] = [0.1065307, 0.7182818]
    logp = _t([[-1.0, -2.0]])
    ref = _t([[-1.5, -1.0]])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), _t([[0.5, -1.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), _t([[0.125, 0.5]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), _t([[0.1065307, 0.7182818]]), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match=r"k1.*k2.*k3"):
        kl_penalty(logp, ref, "kl")


def test_group_advantages_by_hand():
    # group [1, 2, 3]: mean 2, std 1 -> [-1, 0, 1] / (1 + 1e-4); group [10, 10, 10]: std 0 -> 0 / 1e-4 = 0
    scores = _t([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    d = 1.0 / (1.0 + 1e-4)
    torch.testing.assert_close(group_advantages(scores, 3), _t([-d, 0.0, d, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(group_advantages(scores, 3, normalize_std=False), _t([-1.0, 0.0, 1.0, 0, 0, 0]))
    # group size 1 without std: s - s = 0
    torch.testing.assert_close(group_advantages(scores, 1, normalize_std=False), torch.zeros_like(scores))
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(scores, 1)
    with pytest.raises(ValueError, match="group"):
        group_advantages(scores, 4)


def test_rloo_advantages_by_hand():
    # k=2: [1, 2] -> [1 - 2, 2 - 1] = [-1, 1]; [3, 6] -> [-3, 3]
    torch.testing.assert_close(rloo_advantages(_t([1.0, 2.0, 3.0, 6.0]), 2), _t([-1.0, 1.0, -3.0, 3.0]))
    # k=3: [1, 2, 6] -> [1 - (2+6)/2, 2 - (1+6)/2, 6 - (1+2)/2] = [-3, -1.5, 4.5]
    torch.testing.assert_close(rloo_advantages(_t([1.0, 2.0, 6.0]), 3), _t([-3.0, -1.5, 4.5]))
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(_t([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="group"):
        rloo_advantages(_t([1.0, 2.0, 3.0]), 2)


def test_reinforce_pp_advantages_by_hand():
    # gamma 1: returns-to-go [3, 2, 2] and [2, 1.5, -]; over the 5 valid tokens mean 2.1, deviations
    # [.9, -.1, -.1, -.1, -.6], population variance 1.2 / 5 = .24
    rewards = _t([[1.0, 0.0, 2.0], [0.5, 1.5, 99.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    s = math.sqrt(0.24)
    want = _t([[0.9 / s, -0.1 / s, -0.1 / s], [-0.1 / s, -0.6 / s, 0.0]])
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, 1.0), want)
    # gamma .5: returns [1.5, 1, 2] and [1.25, 1.5, -]; mean 1.45, population variance .55 / 5 = .11
    s = math.sqrt(0.11)
    want = _t([[0.05 / s, -0.45 / s, 0.55 / s], [-0.2 / s, 0.05 / s, 0.0]])
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, 0.5), want)
    # equal returns everywhere: no spread to normalise by (variance clamped at 1e-8), advantages 0, finite
    flat = reinforce_pp_advantages(_t([[0.0, 1.0], [0.0, 1.0]]), torch.ones(2, 2, dtype=torch.bool), 1.0)
    torch.testing.assert_close(flat, torch.zeros(2, 2, dtype=F64))


def test_explained_variance_by_hand():
    mask = torch.tensor([[True, True, True, False]])
    ret = _t([[1.0, 2.0, 3.0, 1e6]])
    # perfect critic -> 1; constant (zero) critic -> 1 - var(R)/var(R) = 0
    assert explained_variance(_t([[1.0, 2.0, 3.0, -1e6]]), ret, mask).item() == pytest.approx(1.0)
    assert explained_variance(_t([[0.0, 0.0, 0.0, 5.0]]), ret, mask).item() == pytest.approx(0.0)
    # errors R - V = [0, 0, -1]: unbiased var = (1/9 + 1/9 + 4/9) / 2 = 1/3; var(R) = 1 -> 1 - 1/3
    assert explained_variance(_t([[1.0, 2.0, 4.0, 0.0]]), ret, mask).item() == pytest.approx(2 / 3)
    # constant returns -> NaN (documented)
    assert math.isnan(explained_variance(_t([[0.0, 1.0, 2.0, 0.0]]), _t([[3.0, 3.0, 3.0, 9.0]]), mask).item())


def test_per_token_rewards_by_hand():
    # kl_coef 0.5; row 0 all valid: [-0.05, -0.1, -0.15 + 2] ; row 1 [T, T, F]: [-0.2, -0.25 + 5, 0]
    # row 2 no valid token: all 0, its score 7 is dropped
    scores = _t([2.0, 5.0, 7.0])
    kl = _t([[0.1, 0.2, 0.3], [0.4, 0.5, 1e6], [1e6, 1e6, 1e6]])
    mask = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    got = per_token_rewards(scores, kl, 0.5, mask)
    torch.testing.assert_close(got, _t([[-0.05, -0.1, 1.85], [-0.2, 4.75, 0.0], [0.0, 0.0, 0.0]]))


# ------------------------------------------------------------------------------ plain-loop references


def _gae_loop(rewards, values, lengths, gamma, lam):
    adv_rows, ret_rows = [], []
    for r, v, n in zip(rewards, values, lengths, strict=True):
        adv = [0.0] * len(r)
        ret = [0.0] * len(r)
        last = 0.0
        for i in reversed(range(n)):
            next_v = v[i + 1] if i + 1 < n else 0.0
            delta = r[i] + gamma * next_v - v[i]
            last = delta + gamma * lam * last
            adv[i] = last
            ret[i] = last + v[i]
        adv_rows.append(adv)
        ret_rows.append(ret)
    return adv_rows, ret_rows


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.8), (1.0, 0.0), (0.5, 1.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_loop(gamma, lam, seed):
    g = torch.Generator().manual_seed(seed)
    b, t = 5, 9
    mask = _prefix_mask(g, b, t)
    rewards = _fill(torch.randn(b, t, generator=g, dtype=F64), mask, 1e6)
    values = _fill(torch.randn(b, t, generator=g, dtype=F64), mask, -1e6)
    lengths = mask.sum(1).tolist()
    want_adv, want_ret = _gae_loop(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, _t(want_adv))
    torch.testing.assert_close(ret, _t(want_ret))


def test_gae_left_padded_rows_match_right_padded():
    # a contiguous run anywhere in the row gives the same numbers as the same run right-padded
    g = torch.Generator().manual_seed(4)
    r = torch.randn(1, 4, generator=g, dtype=F64)
    v = torch.randn(1, 4, generator=g, dtype=F64)
    pad = torch.full((1, 3), 1e6, dtype=F64)
    right = gae_advantages(torch.cat([r, pad], 1), torch.cat([v, pad], 1), torch.arange(7)[None] < 4, 0.9, 0.7)
    left = gae_advantages(torch.cat([pad, r], 1), torch.cat([pad, v], 1), torch.arange(7)[None] >= 3, 0.9, 0.7)
    for a, b in zip(right, left, strict=True):
        torch.testing.assert_close(a[:, :4], b[:, 3:])
        assert (b[:, :3] == 0).all()


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_whiten_matches_statistics(shift_mean, seed):
    g = torch.Generator().manual_seed(seed)
    b, t = 4, 8
    mask = _prefix_mask(g, b, t)
    x = _fill(3.0 + 2.0 * torch.randn(b, t, generator=g, dtype=F64), mask, 1e6)
    vals = [x[i, j].item() for i in range(b) for j in range(t) if mask[i, j]]
    mean, var = statistics.mean(vals), statistics.variance(vals)
    assert masked_var(x, mask).item() == pytest.approx(var, rel=1e-12)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(statistics.pvariance(vals), rel=1e-12)
    want = [
        [
            ((x[i, j].item() - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)) if mask[i, j] else 0.0
            for j in range(t)
        ]
        for i in range(b)
    ]
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=shift_mean), _t(want))


def _policy_loop(logp, old, adv, mask, eps):
    total, clipped_count, kl, ratios = 0.0, 0, 0.0, []
    for i in range(len(logp)):
        for j in range(len(logp[i])):
            if not mask[i][j]:
                continue
            ratio = math.exp(logp[i][j] - old[i][j])
            unclipped = -adv[i][j] * ratio
            clipped = -adv[i][j] * min(max(ratio, 1 - eps), 1 + eps)
            total += max(unclipped, clipped)
            clipped_count += clipped > unclipped
            kl += (ratio - 1) - (logp[i][j] - old[i][j])
            ratios.append(ratio)
    n = len(ratios)
    return total / n, clipped_count / n, kl / n, sum(ratios) / n, max(ratios)


@pytest.mark.parametrize("eps", [0.1, 0.2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo_policy_loss_matches_loop(eps, seed):
    g = torch.Generator().manual_seed(seed)
    b, t = 4, 10
    mask = _prefix_mask(g, b, t)
    old = -torch.rand(b, t, generator=g, dtype=F64) * 3
    logp = _fill(old + 0.3 * torch.randn(b, t, generator=g, dtype=F64), mask, 1e6)
    adv = _fill(torch.randn(b, t, generator=g, dtype=F64), mask, 1e6)
    loss, clipfrac, kl, rmean, rmax = _policy_loop(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), eps)
    assert 0 < clipfrac < 1  # the random case exercises both branches
    got, stats = ppo_policy_loss(logp, old, adv, mask, eps)
    assert got.item() == pytest.approx(loss, rel=1e-10)
    assert stats["clipfrac"].item() == pytest.approx(clipfrac)
    assert stats["approx_kl"].item() == pytest.approx(kl, rel=1e-10)
    assert stats["ratio_mean"].item() == pytest.approx(rmean, rel=1e-10)
    assert stats["ratio_max"].item() == pytest.approx(rmax, rel=1e-10)


@pytest.mark.parametrize("clip", [0.05, 0.2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo_value_loss_matches_loop(clip, seed):
    g = torch.Generator().manual_seed(seed)
    b, t = 4, 10
    mask = _prefix_mask(g, b, t)
    old = _fill(torch.randn(b, t, generator=g, dtype=F64), mask, -1e6)
    values = _fill(old + 0.3 * torch.randn(b, t, generator=g, dtype=F64), mask, 1e6)
    ret = _fill(torch.randn(b, t, generator=g, dtype=F64), mask, 1e6)
    total, clipped_count, err, n = 0.0, 0, 0.0, 0
    for i in range(b):
        for j in range(t):
            if not mask[i, j]:
                continue
            v, vo, r = values[i, j].item(), old[i, j].item(), ret[i, j].item()
            vc = min(max(v, vo - clip), vo + clip)
            total += max((v - r) ** 2, (vc - r) ** 2)
            clipped_count += (vc - r) ** 2 > (v - r) ** 2
            err += (v - r) ** 2
            n += 1
    assert 0 < clipped_count < n
    loss, stats = ppo_value_loss(values, old, ret, mask, clip)
    assert loss.item() == pytest.approx(0.5 * total / n, rel=1e-10)
    assert stats["value_clipfrac"].item() == pytest.approx(clipped_count / n)
    assert stats["value_error"].item() == pytest.approx(err / n, rel=1e-10)


@pytest.mark.parametrize("group_size", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_group_and_rloo_advantages_match_loop(group_size, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(4 * group_size, generator=g, dtype=F64)
    s = scores.tolist()
    want_norm, want_center, want_rloo = [], [], []
    for start in range(0, len(s), group_size):
        group = s[start : start + group_size]
        mean, std = statistics.mean(group), statistics.stdev(group)
        for x in group:
            want_norm.append((x - mean) / (std + 1e-4))
            want_center.append(x - mean)
            want_rloo.append(x - (sum(group) - x) / (group_size - 1))
    torch.testing.assert_close(group_advantages(scores, group_size), _t(want_norm))
    torch.testing.assert_close(group_advantages(scores, group_size, normalize_std=False), _t(want_center))
    torch.testing.assert_close(rloo_advantages(scores, group_size), _t(want_rloo))


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reinforce_pp_advantages_match_loop(gamma, seed):
    g = torch.Generator().manual_seed(seed)
    b, t = 5, 7
    mask = _prefix_mask(g, b, t)
    rewards = _fill(torch.randn(b, t, generator=g, dtype=F64), mask, 1e6)
    returns = []
    for row, n in zip(rewards.tolist(), mask.sum(1).tolist(), strict=True):
        running, row_returns = 0.0, [0.0] * t
        for i in reversed(range(n)):
            running = row[i] + gamma * running
            row_returns[i] = running
        returns.append(row_returns)
    valid = [returns[i][j] for i in range(b) for j in range(t) if mask[i, j]]
    mean, std = statistics.mean(valid), math.sqrt(max(statistics.pvariance(valid), 1e-8))
    want = [[(returns[i][j] - mean) / std if mask[i, j] else 0.0 for j in range(t)] for i in range(b)]
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, gamma), _t(want))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_token_rewards_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    b, t = 6, 7
    mask = _prefix_mask(g, b, t)
    mask[-1] = False  # one empty row: its score is dropped
    scores = torch.randn(b, generator=g, dtype=F64)
    kl = _fill(torch.rand(b, t, generator=g, dtype=F64), mask, 1e6)
    want = []
    for i in range(b):
        row = [-0.1 * kl[i, j].item() if mask[i, j] else 0.0 for j in range(t)]
        valid = [j for j in range(t) if mask[i, j]]
        if valid:
            row[valid[-1]] += scores[i].item()
        want.append(row)
    torch.testing.assert_close(per_token_rewards(scores, kl, 0.1, mask), _t(want))


def test_explained_variance_matches_statistics():
    g = torch.Generator().manual_seed(5)
    mask = _prefix_mask(g, 4, 6)
    ret = _fill(torch.randn(4, 6, generator=g, dtype=F64), mask, 1e6)
    values = _fill(ret + 0.5 * torch.randn(4, 6, generator=g, dtype=F64), mask, -1e6)
    r = [ret[i, j].item() for i in range(4) for j in range(6) if mask[i, j]]
    e = [ret[i, j].item() - values[i, j].item() for i in range(4) for j in range(6) if mask[i, j]]
    want = 1 - statistics.variance(e) / statistics.variance(r)
    assert explained_variance(values, ret, mask).item() == pytest.approx(want, rel=1e-10)


# ----------------------------------------------------------------------------------------------- edges


def test_ratio_one_gives_minus_mean_advantage():
    g = torch.Generator().manual_seed(6)
    mask = _prefix_mask(g, 3, 5)
    logp = -torch.rand(3, 5, generator=g)
    adv = torch.randn(3, 5, generator=g)
    loss, stats = ppo_policy_loss(logp, logp.clone(), adv, mask, 0.2)
    assert loss.item() == pytest.approx(-masked_mean(adv, mask).item(), abs=1e-7)
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_max"].item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_penalties_zero_at_equal_and_nonnegative(dtype):
    g = torch.Generator().manual_seed(7)
    ref = -torch.rand(4, 50, generator=g, dtype=dtype) * 5
    for kind in ("k1", "k2", "k3"):
        assert (kl_penalty(ref.clone(), ref, kind) == 0).all()
    # large, ordinary and tiny differences (tiny ones are where exp(x) - 1 - x would round negative)
    scale = torch.tensor([3.0, 0.3, 1e-3, 1e-7, 1e-9], dtype=dtype).repeat_interleave(10)
    logp = ref + scale * torch.randn(4, 50, generator=g, dtype=dtype)
    assert (kl_penalty(logp, ref, "k2") >= 0).all()
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert (kl_penalty(logp, ref, "k1") < 0).any()  # k1 alone may go negative


def test_masked_positions_never_affect_results():
    g = torch.Generator().manual_seed(8)
    b, t = 4, 6
    mask = _prefix_mask(g, b, t)
    mask[-1] = False
    base = {k: torch.randn(b, t, generator=g) for k in ("a", "b", "c")}
    scores = torch.randn(b, generator=g)

    def run(fill):
        a, bb, c = (_fill(base[k], mask, fill) for k in ("a", "b", "c"))
        old_lp = _fill(-base["a"].abs(), mask, fill)
        lp = _fill(old_lp + 0.2 * bb, mask, fill)
        return {
            "whiten": masked_whiten(a, mask),
            "scale": masked_whiten(a, mask, shift_mean=False),
            "var": masked_var(a, mask),
            "gae": torch.cat(gae_advantages(a, bb, mask, 0.95, 0.9)),
            "policy": torch.stack([ppo_policy_loss(lp, old_lp, c, mask, 0.2)[0]]),
            "policy_stats": torch.stack(list(ppo_policy_loss(lp, old_lp, c, mask, 0.2)[1].values())),
            "value": torch.stack([ppo_value_loss(a, bb, c, mask, 0.2)[0]]),
            "value_stats": torch.stack(list(ppo_value_loss(a, bb, c, mask, 0.2)[1].values())),
            "ev": explained_variance(a, c, mask),
            "rewards": per_token_rewards(scores, bb.abs(), 0.1, mask),
            "reinforce_pp": reinforce_pp_advantages(a, mask, 0.9),
        }

    clean = run(0.0)
    for fill in (1e6, -1e6, 123.0):
        dirty = run(fill)
        for name, want in clean.items():
            got = dirty[name]
            assert torch.isfinite(got).all(), name
            if got.shape[-1:] == (t,) and got.dim() == 2:
                want_rows, got_rows = want.view(-1, b, t), got.view(-1, b, t)
                torch.testing.assert_close(got_rows[:, mask], want_rows[:, mask], msg=name)
                assert (got_rows[:, ~mask] == 0).all(), name  # invalid outputs are documented as 0
            else:
                torch.testing.assert_close(got, want, msg=name)


def test_gradients_flow_only_through_valid_tokens():
    g = torch.Generator().manual_seed(9)
    b, t = 3, 6
    mask = _prefix_mask(g, b, t, min_len=1)
    mask[1, 2:] = False
    old = -torch.rand(b, t, generator=g)
    logp = _fill(old + 0.5 * torch.randn(b, t, generator=g), mask, 1e6).requires_grad_()
    adv = torch.randn(b, t, generator=g)
    loss, _ = ppo_policy_loss(logp, old, adv, mask, 0.2)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[~mask] == 0).all()
    assert (logp.grad[mask] != 0).any()
    # unclipped tokens: d/dlogp of masked_mean(-A * ratio) = -A * ratio / n_valid
    ratio = torch.exp(logp.detach() - old)
    free = mask & (ratio > 0.8) & (ratio < 1.2)
    torch.testing.assert_close(logp.grad[free], (-adv * ratio / mask.sum())[free])

    values = _fill(torch.randn(b, t, generator=g), mask, -1e6).requires_grad_()
    vloss, _ = ppo_value_loss(values, torch.randn(b, t, generator=g), torch.randn(b, t, generator=g), mask, 10.0)
    vloss.backward()
    assert torch.isfinite(values.grad).all()
    assert (values.grad[~mask] == 0).all() and (values.grad[mask] != 0).all()

    x = _fill(torch.randn(b, t, generator=g), mask, 1e6).requires_grad_()
    (masked_whiten(x, mask) * torch.randn(b, t, generator=g)).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()

    lp = _fill(-torch.rand(b, t, generator=g), mask, 1e6).requires_grad_()
    ref = -torch.rand(b, t, generator=g)
    per_token_rewards(torch.randn(b, generator=g), kl_penalty(lp, ref, "k1"), 0.1, mask).sum().backward()
    assert (lp.grad[~mask] == 0).all() and (lp.grad[mask] == -0.1).all()
