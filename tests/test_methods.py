"""The method table: each method's facts as ALGORITHM.md states them, and how its loss is called."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from smpo.losses import LossOutput, dpo_loss, kto_loss, mapo_loss, sft_loss, smpo_loss
from smpo.methods import LOSSES, METHODS, BatchKind, LossInputs, get_method
from smpo.objective import ObjectiveConfig

MW = torch.tensor([0.30, 0.50, 0.20], dtype=torch.float64)
ML = torch.tensor([0.40, 0.45, 0.60], dtype=torch.float64)
RW = torch.tensor([0.35, 0.48, 0.25], dtype=torch.float64)
RL = torch.tensor([0.38, 0.47, 0.55], dtype=torch.float64)
P_WIN = torch.tensor([0.7, 0.55, 0.6], dtype=torch.float64)


def _pair_inputs(*, smoothed: bool, ref: bool = True) -> LossInputs:
    return LossInputs(model=torch.cat([MW, ML]), ref=torch.cat([RW, RL]) if ref else None, beta=40.0, gamma=3.0,
                      smoothed=smoothed, mapo_snr=0.25, num_timesteps=500, p_win=P_WIN)


def test_the_table_lists_every_method_in_the_cli_order():
    assert list(METHODS) == ["smpo", "dpo", "kto", "mapo", "sft"]
    assert all(name == m.name for name, m in METHODS.items())
    assert LOSSES == {"smpo": smpo_loss, "dpo": dpo_loss, "kto": kto_loss, "mapo": mapo_loss, "sft": sft_loss}


@pytest.mark.parametrize(("name", "beta", "noising", "labels"), [
    ("smpo", 2000.0, "renoise", "smoothed"),  # section 2 (SD1.5) and section 3
    ("dpo", 5000.0, "forward", "binary"),  # section 1
    ("kto", 1000.0, "forward", "binary"),  # section 4
    ("mapo", 0.1, "forward", "binary"),  # section 4
    ("sft", 0.0, "forward", "binary"),
])
def test_defaults_as_the_algorithm_states_them_and_as_the_config_resolves_them(name, beta, noising, labels):
    method = get_method(name)
    assert (method.default_beta, method.default_noising, method.default_labels) == (beta, noising, labels)
    resolved = ObjectiveConfig(method=name).resolved()
    assert (resolved.beta, resolved.noising, resolved.labels) == (beta, noising, labels)


def test_what_each_method_consumes_and_needs():
    kinds = {name: m.batch_kind for name, m in METHODS.items()}
    assert kinds == {"smpo": BatchKind.PAIRWISE, "dpo": BatchKind.PAIRWISE, "kto": BatchKind.UNPAIRED,
                     "mapo": BatchKind.PAIRWISE, "sft": BatchKind.WINNER_ONLY}
    assert [n for n, m in METHODS.items() if m.needs_reference] == ["smpo", "dpo", "kto"]  # MaPO is reference-free
    assert [n for n, m in METHODS.items() if m.smoothed_labels] == ["smpo"]
    assert [n for n, m in METHODS.items() if m.paper is None] == ["sft"]
    assert [m.display_name for m in METHODS.values()] == ["SmPO", "Diffusion-DPO", "Diffusion-KTO", "MaPO", "SFT"]


def test_an_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="unknown method 'ppo'; choose from smpo, dpo, kto, mapo, sft"):
        get_method("ppo")
    with pytest.raises(ValueError, match="unknown method 'ppo'"):
        ObjectiveConfig(method="ppo").resolved()
    with pytest.raises(ValueError, match="labels=smoothed needs method smpo"):
        ObjectiveConfig(method="kto", labels="smoothed").resolved()


def test_smpo_with_smoothed_labels_is_its_loss_and_with_binary_labels_diffusion_dpo():
    smoothed = METHODS["smpo"].compute(_pair_inputs(smoothed=True))
    expected = smpo_loss(MW, ML, RW, RL, p_win=P_WIN, beta=40.0, gamma=3.0)
    torch.testing.assert_close(smoothed.losses, expected.losses, rtol=0, atol=0)
    binary = METHODS["smpo"].compute(_pair_inputs(smoothed=False))
    torch.testing.assert_close(binary.losses, dpo_loss(MW, ML, RW, RL, beta=40.0).losses, rtol=0, atol=0)
    assert "lambda" in smoothed.metrics and "lambda" not in binary.metrics  # the DPO loss's own metrics


def test_each_record_calls_its_own_loss_with_the_arguments_it_takes():
    calls: list[tuple[tuple, dict]] = []

    def spy(*args, **kwargs) -> LossOutput:
        calls.append((args, kwargs))
        return LossOutput(loss=args[0].sum(), losses=args[0])

    images = LossInputs(model=MW, ref=RW, beta=7.0, gamma=3.0, smoothed=False, mapo_snr=0.25, num_timesteps=500,
                        desirable=torch.tensor([True, False, True]), reference_point=torch.tensor(0.01))
    pairs = (MW, ML, RW, RL)
    cases = [("smpo", _pair_inputs(smoothed=True), pairs, {"p_win": P_WIN, "beta": 40.0, "gamma": 3.0}),
             ("dpo", _pair_inputs(smoothed=False), pairs, {"beta": 40.0}),
             ("mapo", _pair_inputs(smoothed=False, ref=False), (MW, ML),
              {"beta": 40.0, "snr": 0.25, "num_timesteps": 500}),
             ("sft", replace(_pair_inputs(smoothed=False, ref=False), model=MW), (MW,), {}),
             ("kto", images, (MW, RW), {"desirable": images.desirable, "beta": 7.0,
                                         "reference_point": images.reference_point})]
    for name, inputs, errors, kwargs in cases:
        calls.clear()
        replace(METHODS[name], loss=spy).compute(inputs)
        [(args, got)] = calls
        assert len(args) == len(errors) and all(torch.equal(a, e) for a, e in zip(args, errors)), name
        assert got.keys() == kwargs.keys() and all(got[k] is v or got[k] == v for k, v in kwargs.items()), name
