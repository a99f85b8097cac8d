"""Image preprocessing of the five scorers, in plain PIL + torch (no torchvision).

Each function maps one PIL image to a float tensor ``[3, size, size]``; the steps and their order
follow each scorer's reference code (docs/scorers.md lists which scorer uses which):

- :func:`clip_center_crop`: the OpenAI CLIP transform (torchvision), used by CLIP, ImageReward and
  the aesthetic predictor: resize the shorter side to ``size`` (bicubic), centre-crop ``size`` x
  ``size``, scale to [0, 1], normalise with the OpenAI CLIP mean and std.
- :func:`hf_clip_center_crop`: the same through transformers' ``CLIPImageProcessor``, which PickScore's
  reference code uses; only the crop offset rounds differently (floor instead of round).
- :func:`pad_to_square`: HPS v2's open_clip validation transform: resize the longer side to
  ``size`` (bicubic), pad with black (pixel value 0) to a centred square, scale to [0, 1],
  normalise with the OpenAI CLIP mean and std.

Sizes are rounded as torchvision rounds them (shorter-side resize truncates the longer side with
``int``, a centre crop offset is ``round((H - size) / 2)``, a longer-side resize rounds each side),
so the tensors match the reference pipelines.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_normalized_tensor(image: Image.Image, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """RGB uint8 PIL image -> ``[3, H, W]`` float32, ``(pixel / 255 - mean) / std`` per channel."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(array).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean_t) / std_t


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
    """OpenAI CLIP preprocessing (torchvision): RGB, shorter side to ``size`` (bicubic), centre crop, CLIP mean/std."""
    image = image.convert("RGB")
    return to_normalized_tensor(center_crop(resize_shorter_side(image, size), size))


def hf_clip_center_crop(image: Image.Image, size: int = 224) -> torch.Tensor:
    """transformers' ``CLIPImageProcessor`` (PickScore's processor): as :func:`clip_center_crop`, floor crop offset."""
    image = image.convert("RGB")
    return to_normalized_tensor(center_crop(resize_shorter_side(image, size), size, floor_offset=True))


def pad_to_square(image: Image.Image, size: int = 224) -> torch.Tensor:
    """HPS v2 preprocessing: RGB, longer side to ``size`` (bicubic), black-pad to a centred square, CLIP mean/std.

    The padding is black *pixels*, so after normalisation a padded pixel is ``-mean / std``, not 0.
    The extra width (or height) ``p`` is split ``p // 2`` before and ``p - p // 2`` after.
    """
    image = image.convert("RGB")
    width, height = image.size
    scale = size / max(width, height)
    new_w, new_h = round(width * scale), round(height * scale)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(image, ((size - new_w) // 2, (size - new_h) // 2))
    return to_normalized_tensor(canvas)


def stack(images, transform, size: int) -> torch.Tensor:
    """Apply ``transform(image, size)`` to each image and stack to ``[B, 3, size, size]``."""
    return torch.stack([transform(image, size) for image in images])
