"""Every loss of ALGORITHM.md sections 1, 2 and 4 against arithmetic written out by hand."""

import math

import pytest
import torch

from smpo.losses import dpo_loss, kto_loss, mapo_loss, per_sample_mse, sft_loss, smpo_loss
from smpo.methods import LOSSES


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


MW = torch.tensor([0.30, 0.10, 0.25], dtype=torch.float64)
ML = torch.tensor([0.20, 0.40, 0.25], dtype=torch.float64)
RW = torch.tensor([0.28, 0.12, 0.20], dtype=torch.float64)
RL = torch.tensor([0.21, 0.35, 0.30], dtype=torch.float64)


def test_per_sample_mse_is_the_mean_over_elements():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 1.0]]])
    target = torch.zeros(2, 2, 2)
    # (1 + 4 + 9 + 16) / 4 = 7.5 and 1 / 4 = 0.25
    assert per_sample_mse(pred, target).tolist() == [7.5, 0.25]


def test_sft_is_the_mean_winner_error():
    out = sft_loss(MW)
    assert out.loss.item() == pytest.approx((0.30 + 0.10 + 0.25) / 3)
    assert torch.equal(out.losses, MW)


def test_dpo_by_hand():
    beta = 5000.0
    out = dpo_loss(MW, ML, RW, RL, beta=beta)
    expected = []
    for mw, ml, rw, rl in zip(MW.tolist(), ML.tolist(), RW.tolist(), RL.tolist()):
        inside = -(beta / 2) * ((mw - rw) - (ml - rl))
        expected.append(-logsig(inside))
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-12)
    # inside terms: pair 0: -2500*(0.02 - -0.01) = -75 (<0); pair 1: -2500*(-0.02-0.05)=175 (>0);
    # pair 2: -2500*(0.05 - -0.05) = -250 (<0)
    assert out.metrics["implicit_acc"].item() == pytest.approx(1 / 3)
    assert out.metrics["reward_margin"].item() == pytest.approx((-75 + 175 - 250) / 3)


def test_smpo_by_hand_with_per_pair_probability():
    beta, gamma = 2000.0, 10.0
    p = torch.tensor([0.7, 0.55, 0.5], dtype=torch.float64)
    out = smpo_loss(MW, ML, RW, RL, p_win=p, beta=beta, gamma=gamma)
    expected = []
    for mw, ml, rw, rl, pw in zip(MW.tolist(), ML.tolist(), RW.tolist(), RL.tolist(), p.tolist()):
        lam = gamma * (2 * pw - 1)
        inside = -(beta / 2) * lam * ((mw - rw) - (ml - rl))
        expected.append(-logsig(inside))
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["lambda"].item() == pytest.approx((4.0 + 1.0 + 0.0) / 3)


def test_smpo_at_even_odds_is_log2_with_zero_gradient():
    mw = torch.tensor([0.3, 0.9], requires_grad=True)
    ml = torch.tensor([0.1, 0.2], requires_grad=True)
    out = smpo_loss(mw, ml, torch.tensor([0.2, 0.5]), torch.tensor([0.4, 0.1]), p_win=0.5, beta=2000.0)
    out.loss.backward()
    assert out.losses.tolist() == pytest.approx([math.log(2)] * 2)
    assert mw.grad.abs().max().item() == 0.0 and ml.grad.abs().max().item() == 0.0


def test_smpo_with_certain_label_and_unit_sensitivity_is_dpo():
    a = smpo_loss(MW, ML, RW, RL, p_win=1.0, beta=5000.0, gamma=1.0)
    b = dpo_loss(MW, ML, RW, RL, beta=5000.0)
    assert torch.allclose(a.losses, b.losses, rtol=0, atol=1e-12)


def test_smpo_swap_winner_and_loser_with_complementary_probability():
    p = torch.tensor([0.7, 0.6, 0.52], dtype=torch.float64)
    a = smpo_loss(MW, ML, RW, RL, p_win=p, beta=2000.0)
    b = smpo_loss(ML, MW, RL, RW, p_win=1 - p, beta=2000.0)
    assert torch.allclose(a.losses, b.losses, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["dpo", "smpo"])
def test_batch_equals_mean_of_single_pairs(name):
    kwargs = {"beta": 2000.0} | ({"p_win": torch.tensor([0.7, 0.55, 0.6], dtype=torch.float64)} if name == "smpo" else {})
    batch = LOSSES[name](MW, ML, RW, RL, **kwargs).loss
    singles = []
    for i in range(3):
        kw = dict(kwargs)
        if "p_win" in kw:
            kw["p_win"] = kw["p_win"][i : i + 1]
        singles.append(LOSSES[name](MW[i : i + 1], ML[i : i + 1], RW[i : i + 1], RL[i : i + 1], **kw).loss)
    assert batch.item() == pytest.approx(torch.stack(singles).mean().item(), rel=1e-12)


def test_smpo_gradient_matches_finite_difference():
    mw = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    args = (torch.tensor([0.2], dtype=torch.float64), torch.tensor([0.29], dtype=torch.float64),
            torch.tensor([0.21], dtype=torch.float64))
    smpo_loss(mw, *args, p_win=0.6, beta=100.0).loss.backward()
    h = 1e-6
    f = lambda v: smpo_loss(torch.tensor([v], dtype=torch.float64), *args, p_win=0.6, beta=100.0).loss.item()  # noqa: E731
    assert mw.grad.item() == pytest.approx((f(0.3 + h) - f(0.3 - h)) / (2 * h), rel=1e-6)


def test_mapo_by_hand():
    mw = torch.tensor([0.30, 0.10], dtype=torch.float64)
    ml = torch.tensor([0.20, 0.40], dtype=torch.float64)
    out = mapo_loss(mw, ml, beta=0.1, snr=0.5, num_timesteps=1000)
    f = lambda x: x / (math.exp(x) - 1)  # noqa: E731
    ratios = [logsig(1000 * (f(0.5 * a) - f(0.5 * b))) for a, b in zip(mw.tolist(), ml.tolist())]
    expected = (0.30 + 0.10) / 2 - 0.1 * sum(ratios) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    # f is decreasing: the winner with the lower error (pair 1) has the higher f
    assert out.metrics["implicit_acc"].item() == pytest.approx(0.5)


def test_mapo_odds_term_is_continuous_at_zero():
    out0 = mapo_loss(torch.zeros(1), torch.zeros(1))
    assert out0.loss.item() == pytest.approx(0.0 - 0.1 * math.log(0.5))
    tiny = mapo_loss(torch.full((1,), 1e-7, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    assert math.isfinite(tiny.loss.item())


def test_kto_by_hand():
    model = torch.tensor([0.30, 0.10, 0.25, 0.40], dtype=torch.float64)
    ref = torch.tensor([0.28, 0.12, 0.20, 0.45], dtype=torch.float64)
    desirable = torch.tensor([True, True, False, False])
    beta = 1000.0
    g = [r - m for m, r in zip(model.tolist(), ref.tolist())]  # [-0.02, 0.02, -0.05, 0.05]
    z0 = max(0.0, sum(g) / 4)  # 0
    expected = [1 - sig((2 * y - 1) * beta * (gi - z0)) for gi, y in zip(g, [1, 1, 0, 0])]
    out = kto_loss(model, ref, desirable=desirable, beta=beta)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-9)
    # A positive batch mean of g becomes the reference point
    ref2 = ref + 0.1
    out2 = kto_loss(model, ref2, desirable=desirable, beta=beta)
    g2 = [r - m for m, r in zip(model.tolist(), ref2.tolist())]
    z = sum(g2) / 4
    assert out2.metrics["kl_reference_point"].item() == pytest.approx(z)
    assert out2.losses.tolist() == pytest.approx(
        [1 - sig((2 * y - 1) * beta * (gi - z)) for gi, y in zip(g2, [1, 1, 0, 0])], rel=1e-9)


def test_kto_reference_point_is_detached_and_overridable():
    model = torch.tensor([0.1, 0.2], requires_grad=True)
    ref = torch.tensor([0.3, 0.3])
    out = kto_loss(model, ref, desirable=torch.tensor([True, False]), beta=10.0)
    out.loss.backward()
    # with z0 detached, d/dm of (1 - sigmoid(s*b*(r - m - z0))) = s*b*sig'(.)
    z0 = 0.15
    for i, s in enumerate([1.0, -1.0]):
        a = s * 10.0 * (0.3 - [0.1, 0.2][i] - z0)
        assert model.grad[i].item() == pytest.approx(s * 10.0 * sig(a) * (1 - sig(a)) / 2, rel=1e-5)
    fixed = kto_loss(model.detach(), ref, desirable=torch.tensor([True, False]), beta=10.0, reference_point=0.0)
    assert fixed.metrics["kl_reference_point"].item() == 0.0


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), beta=1.0)
    with pytest.raises(ValueError, match="p_win"):
        smpo_loss(MW, ML, RW, RL, p_win=1.5, beta=1.0)


def test_registry_names():
    assert set(LOSSES) == {"sft", "dpo", "smpo", "mapo", "kto"}
