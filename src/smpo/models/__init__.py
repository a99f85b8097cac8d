"""Model families (SD1.5, SDXL) behind one adapter interface, LoRA helpers and architecture presets."""

from smpo.models.family import (
    FAMILIES,
    Conditioning,
    FamilyAdapter,
    PreparedImage,
    SD15Adapter,
    SDXLAdapter,
    detect_family,
    load_family,
    make_adapter,
    prepare_image,
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
    "FAMILIES", "AdaptersOffView", "Conditioning", "FamilyAdapter", "PreparedImage", "SD15Adapter", "SDXLAdapter",
    "adapters_disabled", "add_lora", "detect_family", "has_lora", "load_family", "lora_parameters", "make_adapter",
    "prepare_image", "reference_view",
]
