"""What a family's network is conditioned on and the images it sees: :class:`Conditioning` (a batch
of text-encoder states and added embeddings), classifier-free guidance over it (:func:`guided_fn`),
and the resize-and-crop of training and cached images (:func:`prepare_image`).

Imports nothing else of smpo; every module of ``smpo.models`` builds on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Size = tuple[int, int]  # (height, width)


# --------------------------------------------------------------------------------------------
# Conditioning


@dataclass
class Conditioning:
    """Everything the network needs besides ``x_t`` and ``t``, batched along dim 0.

    ``hidden_states``: ``[B, L, D]`` text-encoder states (``encoder_hidden_states``).
    ``added``: SDXL's ``added_cond_kwargs``: ``{"text_embeds": [B, P], "time_ids": [B, 6]}``, or
    SD3/FLUX's pooled projection ``{"text_embeds": [B, P]}``; ``None`` for SD1.5-style models.
    """

    hidden_states: Tensor
    added: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Conditioning:
        added = None if self.added is None else {k: fn(v) for k, v in self.added.items()}
        return Conditioning(fn(self.hidden_states), added)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move to ``device`` and cast floating tensors to ``dtype``."""
        return self._map(lambda x: x.to(device=device, dtype=dtype if x.is_floating_point() else None))

    def repeat(self, n: int) -> Conditioning:
        """``n`` copies stacked along the batch: ``[c_0..c_B-1, c_0..c_B-1, ...]`` (winner+loser in one call)."""
        return self._map(lambda x: torch.cat([x] * n))

    def index(self, idx: Tensor | Sequence[int] | slice) -> Conditioning:
        """The samples ``idx`` (an index tensor, a list of indices, a boolean mask or a slice)."""
        if isinstance(idx, Sequence) and not isinstance(idx, Tensor):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        return self._map(lambda x: x[idx.to(x.device) if isinstance(idx, Tensor) else idx])

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch (all items of the same family)."""
        if not items:
            raise ValueError("Conditioning.cat needs at least one item")
        hidden = torch.cat([c.hidden_states for c in items])
        if items[0].added is None:
            return Conditioning(hidden)
        keys = items[0].added.keys()
        return Conditioning(hidden, {k: torch.cat([c.added[k] for c in items]) for k in keys})  # type: ignore[index]

    def drop_text(self, mask: Tensor, empty: Conditioning) -> Conditioning:
        """Replace the TEXT parts of the samples where ``mask`` is true by ``empty`` (a batch of 1).

        Used for the empty-prompt rate (ALGORITHM.md section 4, "Common extras"): the prompt is
        dropped but SDXL's size/crop ``time_ids`` stay those of the image.
        """
        mask = mask.to(device=self.hidden_states.device, dtype=torch.bool)

        def pick(own: Tensor, other: Tensor) -> Tensor:
            other = other.to(device=own.device, dtype=own.dtype).expand_as(own)
            return torch.where(mask.view(-1, *[1] * (own.dim() - 1)), other, own)

        hidden = pick(self.hidden_states, empty.hidden_states)
        if self.added is None:
            return Conditioning(hidden)
        added = dict(self.added)
        if "text_embeds" in added and empty.added is not None:
            added["text_embeds"] = pick(added["text_embeds"], empty.added["text_embeds"])
        return Conditioning(hidden, added)

    def network_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``UNet2DConditionModel.forward``."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden_states}
        if self.added is not None:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs


def guided_fn(predict: Callable[[Tensor, Tensor, Conditioning], Tensor], cond: Conditioning,
              uncond: Conditioning | None, guidance: float) -> Callable[..., Tensor]:
    """``fn(x, level, index=None)``: ``predict(x, level, c)`` on the rows ``index`` of ``cond`` (all
    when ``None``), with classifier-free guidance ``p_uncond + w (p_cond - p_uncond)`` when
    ``guidance != 1`` (both branches in one call; ``uncond`` a batch of 1 or of ``len(cond)``).
    The DDIM inversion's noise predictor (``DDPMAdapter.eps_fn``) and the flow inversion's velocity
    (``FlowAdapter.velocity_fn``) are both this."""
    if guidance != 1.0 and uncond is None:
        raise ValueError(f"inversion guidance {guidance} needs the empty-prompt conditioning (uncond)")

    def fn(x: Tensor, level: Tensor, index: Tensor | None = None) -> Tensor:
        rows = index if index is not None else torch.arange(x.shape[0])
        c = cond if index is None and len(cond) == x.shape[0] else cond.index(rows)
        if guidance == 1.0:
            return predict(x, level, c)
        assert uncond is not None
        u = uncond.index(torch.zeros_like(rows)) if len(uncond) == 1 else uncond.index(rows)
        both = Conditioning.cat([c, u.to(c.hidden_states.device)])
        p_cond, p_uncond = predict(torch.cat([x, x]), torch.cat([level, level]), both).chunk(2)
        return p_uncond + guidance * (p_cond - p_uncond)

    return fn


# --------------------------------------------------------------------------------------------
# Image preprocessing shared by the cache and the training loop


@dataclass
class PreparedImage:
    """A resized and cropped image: ``pixels`` ``[3, R, R]`` in [-1, 1], plus what SDXL conditions on."""

    pixels: Tensor
    original_size: Size  # (height, width) before resizing
    crop_top_left: Size  # (top, left) of the crop in the resized image


def prepare_image(image: Any, resolution: int, *, center_crop: bool = True, flip: bool = False,
                  generator: torch.Generator | None = None) -> PreparedImage:
    """Resize the shorter side of a PIL image to ``resolution`` (bilinear), crop a square, scale to [-1, 1].

    Centre crop by default; ``center_crop=False`` draws the crop from ``generator`` (the authors'
    random crop). ``flip`` mirrors the result horizontally (the pair's flip is drawn by the loop).
    The original size and the crop's top-left corner are returned for SDXL's ``add_time_ids``.
    """
    square, original, crop = crop_image(image, resolution, center_crop=center_crop, generator=generator)
    return PreparedImage(image_pixels([square], [flip])[0], original, crop)


def crop_image(image: Any, resolution: int, *, center_crop: bool = True,
               generator: torch.Generator | None = None) -> tuple[Any, Size, Size]:
    """`prepare_image`'s resize and crop: the ``resolution``-square PIL image (RGB), the original
    ``(height, width)`` and the crop's ``(top, left)``."""
    from PIL import Image

    if image.mode != "RGB":
        image = image.convert("RGB")
    original = (image.height, image.width)
    scale = resolution / min(original)
    new_h, new_w = max(resolution, round(original[0] * scale)), max(resolution, round(original[1] * scale))
    if (new_w, new_h) != image.size:  # (PIL's resize to the same size is a copy)
        image = image.resize((new_w, new_h), Image.BILINEAR)
    if center_crop:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top = int(torch.randint(0, new_h - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, new_w - resolution + 1, (1,), generator=generator))
    if (new_w, new_h) != (resolution, resolution):
        image = image.crop((left, top, left + resolution, top + resolution))
    return image, original, (top, left)


def image_pixels(squares: Sequence[Any], flips: Sequence[bool] = ()) -> Tensor:
    """``[B, 3, R, R]`` in [-1, 1] of same-size RGB PIL images, each mirrored where ``flips`` (none
    when empty): one
    buffer and one conversion for the batch (per image, the conversion's small kernels cost as much
    as the decoding at 16 px)."""
    height, width = squares[0].height, squares[0].width
    raw = b"".join(square.tobytes() for square in squares)
    pixels = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(len(squares), height, width, 3)
    pixels = pixels.permute(0, 3, 1, 2).contiguous().float().div(127.5).sub(1.0)
    if any(flips):
        mirrored = torch.tensor(list(flips), dtype=torch.bool)
        pixels[mirrored] = pixels[mirrored].flip(-1)
    return pixels
