"""rlhfzoo.ops: masked statistics, GAE and the KL controllers against hand-computed values."""

import math

import pytest
import torch

from rlhfzoo.ops import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    apply_mask,
    gae,
    last_index,
    masked_mean,
    masked_var,
    masked_whiten,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------------------------------ masked statistics


def test_masked_mean_var_and_whiten():
    x = t([1.0, 2.0, 3.0, 100.0], [4.0, -50.0, 5.0, 6.0])
    m = t([1, 1, 1, 0], [1, 0, 1, 1])
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    assert masked_mean(x, m).item() == pytest.approx(kept.mean().item())
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([2.0, 5.0])
    assert masked_var(x, m).item() == pytest.approx(kept.var(unbiased=True).item())
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(kept.var(unbiased=False).item())
    w = masked_whiten(x, m)
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(w, m).item() == pytest.approx(1.0, rel=1e-6)
    assert w[0, 3] == 0 and w[1, 1] == 0
    # shift_mean=False keeps the mean
    assert masked_mean(masked_whiten(x, m, shift_mean=False), m).item() == pytest.approx(kept.mean().item())


def test_masked_ops_ignore_nan_and_inf_off_the_mask():
    x = t([1.0, float("nan"), 3.0, float("inf")])
    m = t([1, 0, 1, 0])
    assert masked_mean(x, m).item() == 2.0
    assert torch.isfinite(masked_whiten(x, m)).all()
    assert apply_mask(x, m).tolist() == [[1.0, 0.0, 3.0, 0.0]]
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0  # nothing selected: 0, not NaN


def test_last_index():
    m = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    assert last_index(m).tolist() == [2, 3, -1, 2]


# ------------------------------------------------------------------------------ GAE


def test_gae_hand_computed_with_left_and_right_padding():
    # One step of left padding, one of right padding; values/rewards there must be ignored.
    rewards = t([9.0, 0.0, 0.0, 1.0, 9.0])
    values = t([9.0, 0.5, 0.2, 0.1, 9.0])
    mask = t([0, 1, 1, 1, 0])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # delta_3 = 1 - 0.1 = 0.9                      A_3 = 0.9
    # delta_2 = 0 + 0.9 * 0.1 - 0.2 = -0.11         A_2 = -0.11 + 0.72 * 0.9 = 0.538
    # delta_1 = 0 + 0.9 * 0.2 - 0.5 = -0.32         A_1 = -0.32 + 0.72 * 0.538 = 0.06736
    assert adv[0].tolist() == pytest.approx([0.0, 0.06736, 0.538, 0.9, 0.0], abs=1e-12)
    assert ret[0].tolist() == pytest.approx([0.0, 0.56736, 0.738, 1.0, 0.0], abs=1e-12)


def test_gae_skips_holes_in_the_mask():
    adv, ret = gae(t([0.0, 7.0, 1.0]), t([0.5, 7.0, 0.2]), t([1, 0, 1]), gamma=1.0, lam=1.0)
    # t=2: A = 1 - 0.2 = 0.8; t=0: delta = 0 + 0.2 - 0.5 = -0.3, A = -0.3 + 0.8 = 0.5
    assert adv[0].tolist() == pytest.approx([0.5, 0.0, 0.8])
    assert ret[0].tolist() == pytest.approx([1.0, 0.0, 1.0])


def test_gae_special_cases():
    torch.manual_seed(0)
    r, v = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    m = torch.ones(3, 6, dtype=torch.float64)
    # lam = 1, gamma = 1: Monte-Carlo return minus the value
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    mc = r.flip(-1).cumsum(-1).flip(-1)
    assert torch.allclose(ret, mc) and torch.allclose(adv, mc - v)
    # lam = 0: one-step TD error
    adv0, _ = gae(r, v, m, gamma=0.7, lam=0.0)
    next_v = torch.cat([v[:, 1:], torch.zeros(3, 1, dtype=v.dtype)], 1)
    assert torch.allclose(adv0, r + 0.7 * next_v - v)


def test_gae_left_padding_is_the_same_as_none():
    torch.manual_seed(1)
    r, v = torch.randn(1, 5, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)
    adv, ret = gae(r, v, torch.ones_like(r), 0.95, 0.9)
    pad = torch.full((1, 3), float("nan"), dtype=torch.float64)  # garbage on the padding
    adv_p, ret_p = gae(torch.cat([pad, r, pad], 1), torch.cat([pad, v, pad], 1), t([0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0]), 0.95, 0.9)
    assert torch.allclose(adv_p[:, 3:8], adv) and torch.allclose(ret_p[:, 3:8], ret)
    assert (adv_p[:, :3] == 0).all() and (adv_p[:, 8:] == 0).all()


# ------------------------------------------------------------------------------ KL controllers


def test_fixed_kl_controller():
    c = FixedKLController(0.2)
    assert c.update(100.0, 64) == 0.2 and c.value == 0.2
    other = FixedKLController(1.0)
    other.load_state_dict(c.state_dict())
    assert other.value == 0.2


def test_adaptive_kl_controller_hand_computed_sequence():
    # Ziegler et al. 2019: e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    expected = 0.1
    for kl, n, e in [(12.0, 1000, 0.2), (6.6, 1000, 0.1), (0.0, 500, -0.2), (6.0, 1000, 0.0), (5.4, 2000, -0.1)]:
        expected *= 1 + e * n / 10_000
        assert c.update(kl, n) == pytest.approx(expected, rel=1e-12)
        assert c.value == pytest.approx(expected, rel=1e-12)
    # KL above target raises beta, below lowers it; a non-finite KL leaves it alone
    up, down = AdaptiveKLController(1.0, 1.0, 10), AdaptiveKLController(1.0, 1.0, 10)
    assert up.update(1.5, 1) > 1.0 and down.update(0.5, 1) < 1.0
    assert up.update(float("nan"), 1) == up.value
    restored = AdaptiveKLController(5.0, 2.0, 3.0)
    restored.load_state_dict(c.state_dict())
    assert restored.state_dict() == c.state_dict()
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=1.0)


def test_running_moments_match_the_pooled_statistics():
    torch.manual_seed(2)
    chunks = [torch.randn(n) * 3 + 1 for n in (5, 17, 1, 40)]
    rm = RunningMoments()
    for c in chunks:
        rm.update(c)
    allx = torch.cat(chunks).double()
    assert rm.mean == pytest.approx(allx.mean().item(), rel=1e-9)
    assert rm.std == pytest.approx(allx.std(unbiased=True).item(), rel=1e-9)
    assert rm.count == 63
    other = RunningMoments()
    other.load_state_dict(rm.state_dict())
    assert other.state_dict() == rm.state_dict()
    assert math.isfinite(RunningMoments().std)


def test_running_moments_by_hand():
    """Batches [1, 2] then [3, 4, 5]: mean 3, population variance 10 / 5 = 2, sample variance 10 / 4."""
    sample, population = RunningMoments(), RunningMoments(unbiased=False)
    for rm in (sample, population):
        assert rm.update(torch.tensor([1.0, 2.0])) == (1.5, pytest.approx(math.sqrt(0.5)))  # the batch's own
        rm.update(torch.tensor([3.0, 4.0, 5.0]))
        assert rm.mean == pytest.approx(3.0) and rm.count == 5 and rm.var == pytest.approx(2.0)
    assert sample.std == pytest.approx(math.sqrt(2.5)) and population.std == pytest.approx(math.sqrt(2.0))


def test_running_moments_std_is_one_until_two_values():
    for unbiased in (True, False):
        rm = RunningMoments(unbiased=unbiased)
        assert rm.std == 1.0  # nothing seen: no spread to divide by
        rm.update(torch.tensor([7.0]))
        assert rm.mean == 7.0 and rm.std == 1.0
        rm.update(torch.tensor([11.0]))  # [7, 11]: squared deviations 4 + 4
        assert rm.std == pytest.approx(math.sqrt(8.0) if unbiased else 2.0)


def test_running_moments_load_a_checkpointed_state():
    """The state a checkpoint holds (PPO's `reward_moments`): mean, population variance, count."""
    rm = RunningMoments()
    rm.load_state_dict({"mean": 0.5, "var": 2.0, "count": 4})
    assert rm.state_dict() == {"mean": 0.5, "var": 2.0, "count": 4}
    assert rm.std == pytest.approx(math.sqrt(2.0 * 4 / 3))
    rm.update(torch.tensor([0.5, 0.5, 0.5, 0.5]))  # four more at the mean: the spread halves
    assert rm.mean == 0.5 and rm.count == 8 and rm.var == pytest.approx(1.0)


def test_running_moments_population_std_matches_the_pooled_statistics():
    torch.manual_seed(3)
    xs = torch.randn(100, dtype=torch.float64)
    rm = RunningMoments(unbiased=False)
    for chunk in xs.split(7):
        rm.update(chunk)
    assert rm.mean == pytest.approx(xs.mean().item(), rel=1e-9)
    assert rm.std == pytest.approx(xs.std(unbiased=False).item(), rel=1e-9)
