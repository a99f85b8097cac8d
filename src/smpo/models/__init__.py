"""Model families behind one adapter interface (``base``: the interface; ``conditioning``: what the
network is conditioned on; ``ddpm``: SD1.5 and SDXL; ``flow``: SD3 and FLUX; ``loading``: the registry,
detection and loading), LoRA helpers and architecture presets."""

from smpo.models.base import FamilyAdapter, InversionSettings, diffusers_dtype_kwarg
from smpo.models.conditioning import Conditioning, PreparedImage, crop_image, image_pixels, prepare_image
from smpo.models.ddpm import DDPMAdapter, SD15Adapter, SDXLAdapter
from smpo.models.flow import FlowAdapter, FluxAdapter, SD3Adapter
from smpo.models.loading import (
    FAMILIES,
    FAMILY_NAMES,
    detect_family,
    load_family,
    make_adapter,
    read_model_index,
)
from smpo.models.lora import (
    AdaptersOffView,
    adapters_disabled,
    add_lora,
    has_lora,
    lora_parameters,
    reference_view,
)

__all__ = [
    "FAMILIES", "FAMILY_NAMES", "AdaptersOffView", "Conditioning", "DDPMAdapter", "FamilyAdapter", "FlowAdapter",
    "FluxAdapter", "InversionSettings", "PreparedImage", "SD15Adapter", "SD3Adapter", "SDXLAdapter",
    "adapters_disabled", "add_lora", "crop_image", "detect_family", "diffusers_dtype_kwarg", "has_lora",
    "image_pixels", "load_family", "lora_parameters", "make_adapter", "prepare_image", "read_model_index",
    "reference_view",
]
