"""Image preprocessing of the five scorers, in plain PIL + torch (no torchvision).

Each function maps one PIL image to a float tensor ``[3, size, size]``; the steps and their order
follow each scorer's reference code (docs/scorers.md lists which scorer uses which and where the
reference was read):

- :func:`clip_center_crop`: the OpenAI CLIP / open_clip validation transform (torchvision on a PIL
  image), used by CLIP, ImageReward and the aesthetic predictor: resize the shorter side to
  ``size`` (PIL bicubic, in the image's own mode), centre-crop ``size`` x ``size``, *then* convert
  to RGB, scale to [0, 1], normalise with the OpenAI CLIP mean and std.
- :func:`hf_clip_center_crop`: transformers' ``CLIPImageProcessor``, which PickScore's reference code
  uses: converts to RGB *first*, then the same resize, a floor crop offset, the same normalisation.
- :func:`pad_to_square`: HPS v2's open_clip validation transform, which works on the *tensor*:
  RGB, scale to [0, 1], resize the longer side to ``size`` with torch's antialiased bicubic on
  float32 (no uint8 rounding, no clamping), zero-pad to a centred square, normalise.

Sizes are rounded as torchvision rounds them (shorter-side resize truncates the longer side with
``int``, a centre crop offset is ``round((H - size) / 2)``, a longer-side resize rounds each side),
so the tensors match the reference pipelines.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """RGB uint8 PIL image -> ``[3, H, W]`` float32 ``pixel / 255`` (torchvision's ``ToTensor``)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def normalize(pixels: torch.Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """``(pixels - mean) / std`` per channel of a ``[3, H, W]`` tensor."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean_t) / std_t


def to_normalized_tensor(image: Image.Image, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """RGB uint8 PIL image -> ``[3, H, W]`` float32, ``(pixel / 255 - mean) / std`` per channel."""
    return normalize(to_unit_tensor(image), mean, std)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so that the shorter side is ``size``; the longer side is ``int(size * long / short)``."""
    width, height = image.size
    if min(width, height) == size:
        return image
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    return image.resize(new, Image.BICUBIC)


def center_crop(image: Image.Image, size: int, *, floor_offset: bool = False) -> Image.Image:
    """Crop the central ``size`` x ``size`` window (the image must be at least that large).

    The offset is ``round(excess / 2)`` (torchvision, Python's half-to-even rounding) or, with
    ``floor_offset``, ``excess // 2`` (transformers' ``CLIPImageProcessor``); they differ by one
    pixel when the excess is odd and its half rounds up.
    """
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {width}x{height} image")
    if floor_offset:
        top, left = (height - size) // 2, (width - size) // 2
    else:
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def clip_center_crop(image: Image.Image, size: int = 224) -> torch.Tensor:
    """OpenAI CLIP / open_clip preprocessing: shorter side to ``size`` (bicubic), centre crop, RGB, CLIP mean/std.

    The resize and crop run in the image's own mode and the RGB conversion comes after them, as in
    the reference transforms; for RGB images the order does not matter, for RGBA (PIL resizes it
    with premultiplied alpha) and palette images (PIL resizes those with nearest neighbour) it does.
    """
    return to_normalized_tensor(center_crop(resize_shorter_side(image, size), size).convert("RGB"))


def hf_clip_center_crop(image: Image.Image, size: int = 224) -> torch.Tensor:
    """transformers' ``CLIPImageProcessor`` (PickScore's processor): as :func:`clip_center_crop`, floor crop offset."""
    image = image.convert("RGB")
    return to_normalized_tensor(center_crop(resize_shorter_side(image, size), size, floor_offset=True))


def pad_to_square(image: Image.Image, size: int = 224) -> torch.Tensor:
    """HPS v2 preprocessing: RGB, [0, 1] tensor, longer side to ``size``, zero-pad to a centred square, CLIP mean/std.

    HPS v2's transform converts to a tensor *before* resizing, so the resize is torch's bicubic
    interpolation on float32 with antialiasing (torchvision's tensor default since 0.17): values
    are neither rounded to 1/255 nor clamped, and may overshoot [0, 1] next to sharp edges. Each
    side becomes ``round(side * size / longer side)``. The padding is 0 in [0, 1] units (black),
    so after normalisation a padded pixel is ``-mean / std``; the extra width (or height) ``p`` is
    split ``p // 2`` before and ``p - p // 2`` after.
    """
    pixels = to_unit_tensor(image)
    height, width = pixels.shape[1:]
    scale = size / max(width, height)
    new_h, new_w = round(height * scale), round(width * scale)
    if (new_h, new_w) != (height, width):
        pixels = F.interpolate(pixels[None], size=(new_h, new_w), mode="bicubic", align_corners=False,
                               antialias=True)[0]
    pad_h, pad_w = size - new_h, size - new_w
    pixels = F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return normalize(pixels)


def stack(images, transform, size: int) -> torch.Tensor:
    """Apply ``transform(image, size)`` to each image and stack to ``[B, 3, size, size]``."""
    return torch.stack([transform(image, size) for image in images])
