"""LoRA: the adapters-off view is the base model, and adapters come back on even after an error."""

from __future__ import annotations

import copy

import pytest
import torch

from smpo.models import adapters_disabled, add_lora, has_lora, lora_parameters, reference_view
from smpo.models.presets import build_pipeline


@pytest.fixture(scope="module")
def unet():
    return build_pipeline("sd15", "tiny", seed=1).unet.eval()


def _run(net, x, t, states):
    return net(x, t, encoder_hidden_states=states, return_dict=False)[0]


def test_lora_reference_view_equals_base_model(unet):
    base = copy.deepcopy(unet)
    policy = add_lora(copy.deepcopy(unet), rank=4, alpha=8)
    assert has_lora(policy) and not has_lora(base)
    params = lora_parameters(policy)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert params and len(trainable) == len(params)
    with torch.no_grad():  # B starts at zero; move it so the adapter changes the output
        for p in params:
            p.add_(0.05)
    g = torch.Generator().manual_seed(0)
    x, states = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        expected = _run(base, x, t, states)
        adapted = _run(policy, x, t, states)
        reference = _run(reference_view(policy), x, t, states)
        after = _run(policy, x, t, states)
    torch.testing.assert_close(reference, expected, atol=1e-6, rtol=1e-5)
    assert (adapted - expected).abs().max() > 1e-3
    torch.testing.assert_close(after, adapted)  # the view left the adapters on


def test_adapters_reenabled_after_an_exception(unet):
    policy = add_lora(copy.deepcopy(unet), rank=2)
    with torch.no_grad():
        for p in lora_parameters(policy):
            p.fill_(0.1)
    x, states, t = torch.ones(1, 4, 8, 8), torch.ones(1, 77, 32), torch.tensor([5])
    with torch.no_grad():
        adapted = _run(policy, x, t, states)
        with pytest.raises(RuntimeError, match="boom"), adapters_disabled(policy):
            raise RuntimeError("boom")
        torch.testing.assert_close(_run(policy, x, t, states), adapted)


def test_reference_view_needs_lora(unet):
    with pytest.raises(ValueError, match="add_lora"):
        reference_view(unet)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_view_equals_the_adapted_network_and_leaves_it_untouched(unet, dtype):
    from smpo.models.lora import MergedAdaptersView, inference_view

    policy = add_lora(copy.deepcopy(unet).to(dtype), rank=4, alpha=8)
    with torch.no_grad():
        for p in lora_parameters(policy):
            p.add_(0.05)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x, states = torch.randn(2, 4, 8, 8, generator=g).to(dtype), torch.randn(2, 77, 32, generator=g).to(dtype)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        adapted = _run(policy, x, t, states).float()
        view = inference_view(policy)
        merged = _run(view, x, t, states).float()
        base = _run(reference_view(policy), x, t, states).float()
    assert isinstance(view, MergedAdaptersView) and len(view.weights) > 0
    assert all(w.dtype == dtype for w in view.weights.values())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(merged, adapted, atol=tol, rtol=tol)
    # the adapters matter, and the view has them (its error is far below their effect)
    assert (merged - adapted).abs().max() < 0.25 * (adapted - base).abs().max()
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())  # nothing merged in place
    assert inference_view(unet) is unet  # no adapters: the network itself
