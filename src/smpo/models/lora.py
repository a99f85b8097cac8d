"""LoRA on the UNet via peft, and the reference view it gives for free.

With LoRA the frozen reference of DPO-style losses (ALGORITHM.md section 1, ``eps_ref``) is the
same network with its adapters switched off, so no second copy of the UNet lives in memory
(the torchtune idiom, STYLE.md). :func:`adapters_disabled` switches them off for a block and
always switches them back on, even when the block raises.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from smpo.models.base import module_dtype

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
"""The attention projections, as in diffusers' LoRA training scripts."""

ADAPTER_NAME = "smpo"


def add_lora(network: Any, *, rank: int = 8, alpha: float | None = None,
             target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, dropout: float = 0.0,
             adapter_name: str = ADAPTER_NAME, trainable_dtype: torch.dtype | None = torch.float32) -> Any:
    """Add a LoRA adapter to ``network`` (a diffusers UNet or SD3/FLUX transformer) and make only it trainable.

    ``alpha`` defaults to ``rank`` (scale 1). The LoRA ``B`` matrices start at zero, so the
    adapted network starts equal to the base network. The LoRA weights are kept in
    ``trainable_dtype`` (float32 by default, so a half-precision UNet trains float32 adapters;
    peft casts activations to them). Returns ``network`` (modified in place).
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    network.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank),
                        target_modules=list(target_modules), lora_dropout=dropout, init_lora_weights="gaussian")
    network.add_adapter(config, adapter_name=adapter_name)
    network.set_adapter(adapter_name)
    if trainable_dtype is not None:
        for param in lora_parameters(network):
            param.data = param.data.to(trainable_dtype)
    return network


def has_lora(network: Any) -> bool:
    """True if ``network`` carries a peft adapter."""
    return bool(getattr(network, "_hf_peft_config_loaded", False)) or any(
        "lora_" in name for name, _ in network.named_parameters())


def lora_parameters(network: Any) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters of ``network``."""
    return [p for name, p in network.named_parameters() if "lora_" in name]


def adapter_layers(network: Any) -> list[Any]:
    """The peft adapter layers (``BaseTunerLayer``) of ``network``, in module order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in network.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(network: Any, layers: Sequence[Any] | None = None) -> Iterator[Any]:
    """Run a block with ``network``'s adapters off (the base model); restore them afterwards, even on error.

    Sets the flag every adapter layer's forward reads (peft's ``disable_adapters``) on the given
    ``layers`` (default: `adapter_layers`). peft's own ``network.disable_adapters()`` walks every
    module and changes ``requires_grad`` on each switch, which costs a third of a small UNet's
    call per switch; the objective switches around every reference call, under ``no_grad``.
    """
    layers = adapter_layers(network) if layers is None else layers
    if not all(hasattr(layer, "_disable_adapters") for layer in layers):  # another peft layout: its own switch
        network.disable_adapters()
        try:
            yield network
        finally:
            network.enable_adapters()
        return
    # A plain instance attribute: written to each layer's __dict__, as nn.Module.__setattr__ ends up
    # writing it after checking its parameters, buffers and submodules (a third of the switch's cost).
    previous = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer.__dict__["_disable_adapters"] = True
    try:
        yield network
    finally:
        for layer, state in zip(layers, previous):
            layer.__dict__["_disable_adapters"] = state


class AdaptersOffView:
    """The frozen reference of a LoRA policy: calls ``network`` with its adapters disabled.

    Callable like the UNet itself, so the objective treats it like a separate frozen network.
    Use it under ``torch.no_grad()`` (the objective does).
    """

    def __init__(self, network: Any) -> None:
        self.network = network
        self.layers = adapter_layers(network)

    @property
    def dtype(self) -> torch.dtype:
        return module_dtype(self.network)

    @property
    def config(self) -> Any:
        return self.network.config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with adapters_disabled(self.network, self.layers):
            return self.network(*args, **kwargs)


class MergedAdaptersView(AdaptersOffView):
    """A LoRA policy for no-grad calls (the inversion): its adapters folded into copies of the
    adapted layers' base weights (``W + scale B A``, peft's ``get_delta_weight``). A call swaps the
    copies in (``.data``, no copy), runs the network with its adapters off (`AdaptersOffView`), and
    swaps the original weights back, so each call costs what the base network costs and the
    module's own weights are never modified. Build a new view after each optimizer step. Equal to
    calling ``network`` itself up to rounding (the merged weight is kept in the base weight's dtype,
    as autocast computes it).
    """

    def __init__(self, network: Any) -> None:
        from peft.tuners.lora import LoraLayer

        super().__init__(network)
        self.merged: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        with torch.no_grad():
            for module in self.layers:
                if not isinstance(module, LoraLayer) or not module.active_adapters:
                    continue
                weight = module.get_base_layer().weight
                merged = weight.detach().float()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        merged = merged + module.get_delta_weight(adapter).float()
                self.merged.append((weight, merged.to(weight.dtype)))

    @property
    def weights(self) -> dict[int, torch.Tensor]:
        """The merged weights, one per adapted layer (in module order)."""
        return {k: merged for k, (_, merged) in enumerate(self.merged)}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        originals = [weight.data for weight, _ in self.merged]
        try:
            for weight, merged in self.merged:
                weight.data = merged
            return super().__call__(*args, **kwargs)
        finally:
            for (weight, _), original in zip(self.merged, originals):
                weight.data = original


def inference_view(network: Any) -> Any:
    """``network`` for no-grad calls: a LoRA-adapted UNet as a `MergedAdaptersView`, anything else itself.

    A sharded network (FSDP2) holds only its shard of each weight between calls and gathers a
    block's weights as the call reaches it, so there is no whole weight to fold the adapters into:
    it is called as it is, adapters on (equal to the merged view up to rounding).
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded
    sharded = fsdp is not None and isinstance(network, fsdp.FSDPModule)
    if isinstance(network, torch.nn.Module) and has_lora(network) and not sharded:
        return MergedAdaptersView(network)
    return network


def reference_view(network: Any) -> AdaptersOffView:
    """The reference network of a LoRA-adapted ``network``: the same weights with adapters off."""
    if not has_lora(network):
        raise ValueError("reference_view needs a UNet with a LoRA adapter (call add_lora first); "
                         "for full fine-tuning load a separate frozen copy as the reference")
    return AdaptersOffView(network)


def load_lora_weights(network: Any, folder: str, *, adapter_name: str = ADAPTER_NAME) -> Any:
    """Set the adapter ``adapter_name`` of ``network`` (made by :func:`add_lora` with the same rank and
    targets) to the weights an ``smpo train`` LoRA export holds (``folder``: a ``final/lora`` folder
    with ``pytorch_lora_weights.safetensors``, diffusers' format). Every adapter weight must be
    found. Returns ``network``."""
    from pathlib import Path

    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder)
    path = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no pytorch_lora_weights.safetensors (an `smpo train` final/lora folder)")
    state = load_file(str(path))
    prefixes = {key.split(".", 1)[0] for key in state}  # unet. or transformer.: the network's keyword
    state = {key.split(".", 1)[1] if len(prefixes) == 1 else key: value for key, value in state.items()}
    result = set_peft_model_state_dict(network, convert_unet_state_dict_to_peft(state), adapter_name=adapter_name)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and adapter_name in k]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the LoRA adapters of this network (rank, alpha, targets): "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return network
