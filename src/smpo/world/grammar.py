"""The miniature world's prompt grammar: attributes <-> prompt text, and the train / held-out split.

A prompt names one object with five attributes, always in the same order::

    "a small red circle on the left, white background"

Every combination of the attribute lists below is a valid prompt (``all_prompts``). A fixed,
hash-based fifth of the combinations is held out from training (``split``), so the held-out set
is the same on every machine and every Python version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

# Object colours (RGB) and background colours: far apart so that a colour is decidable from pixels.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 205, 40), "purple": (150, 60, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
# Position word -> (phrase used in the prompt, object centre as a fraction of the image side).
POSITIONS: dict[str, tuple[str, tuple[float, float]]] = {
    "left": ("on the left", (0.3, 0.5)), "right": ("on the right", (0.7, 0.5)),
    "top": ("at the top", (0.5, 0.3)), "bottom": ("at the bottom", (0.5, 0.7)),
    "center": ("in the center", (0.5, 0.5)),
}
HELD_OUT_SHARE = 5  # one combination in HELD_OUT_SHARE is held out


@dataclass(frozen=True)
class Attributes:
    """What one prompt asks for."""

    colour: str
    shape: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for field, value, allowed in (("colour", self.colour, COLOURS), ("shape", self.shape, SHAPES),
                                      ("size", self.size, SIZES), ("position", self.position, POSITIONS),
                                      ("background", self.background, BACKGROUNDS)):
            if value not in allowed:
                raise ValueError(f"unknown {field} {value!r}; choose from {', '.join(allowed)}")


def to_prompt(attributes: Attributes) -> str:
    """``Attributes(red, circle, small, left, white)`` -> "a small red circle on the left, white background"."""
    a = attributes
    return f"a {a.size} {a.colour} {a.shape} {POSITIONS[a.position][0]}, {a.background} background"


def parse_prompt(prompt: str) -> Attributes:
    """The inverse of ``to_prompt``; raises ``ValueError`` naming the prompt if it is not in the grammar."""
    words = prompt.strip().lower().replace(",", " ").split()
    # a SIZE COLOUR SHAPE PREP the POSITION BACKGROUND background
    if len(words) != 9 or words[0] != "a" or words[5] != "the" or words[8] != "background":
        raise ValueError(f"prompt {prompt!r} is not in the world's grammar "
                         "(expected e.g. 'a small red circle on the left, white background')")
    position = words[6]
    if position not in POSITIONS or POSITIONS[position][0] != f"{words[4]} the {position}":
        raise ValueError(f"prompt {prompt!r}: unknown position phrase {' '.join(words[4:7])!r}")
    try:
        return Attributes(colour=words[2], shape=words[3], size=words[1], position=position,
                          background=words[7])
    except ValueError as err:
        raise ValueError(f"prompt {prompt!r}: {err}") from None


def vocabulary() -> list[str]:
    """Every word a prompt can contain, sorted (the tokenizer's vocabulary)."""
    words = {"a", "the", "background", *COLOURS, *BACKGROUNDS, *SHAPES, *SIZES}
    for phrase, _ in POSITIONS.values():
        words.update(phrase.split())
    return sorted(words)


def all_attributes() -> list[Attributes]:
    """Every combination, in a fixed order."""
    return [Attributes(c, s, z, p, b) for c in COLOURS for s in SHAPES for z in SIZES
            for p in POSITIONS for b in BACKGROUNDS]


def is_held_out(attributes: Attributes) -> bool:
    """A stable hash (sha256 of the prompt) puts one combination in ``HELD_OUT_SHARE`` in the held-out set."""
    digest = hashlib.sha256(to_prompt(attributes).encode()).digest()
    return int.from_bytes(digest[:4], "big") % HELD_OUT_SHARE == 0


SPLITS: tuple[str, ...] = ("train", "pairs", "validation", "held_out", "all")
VALIDATION_SHARE = 6  # one train combination in VALIDATION_SHARE is the validation split


def is_validation(attributes: Attributes) -> bool:
    """A train combination set aside to choose settings on (a second stable hash, never held out)."""
    if is_held_out(attributes):
        return False
    digest = hashlib.sha256(("validation:" + to_prompt(attributes)).encode()).digest()
    return int.from_bytes(digest[:4], "big") % VALIDATION_SHARE == 0


def split(name: Literal["train", "pairs", "validation", "held_out", "all"] = "train") -> list[str]:
    """The prompts of a split, in a fixed order.

    ``train``: every combination not held out (the base model was pretrained on these);
    ``validation``: about a sixth of ``train``, for choosing settings (learning rates, budgets);
    ``pairs``: ``train`` without ``validation``, the prompts of the preference pairs;
    ``held_out``: a fifth of all combinations, seen by nothing but the final evaluation.
    """
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; choose from {', '.join(SPLITS)}")
    attributes = all_attributes()
    if name == "all":
        return [to_prompt(a) for a in attributes]
    if name == "held_out":
        return [to_prompt(a) for a in attributes if is_held_out(a)]
    train = [a for a in attributes if not is_held_out(a)]
    if name == "train":
        return [to_prompt(a) for a in train]
    return [to_prompt(a) for a in train if is_validation(a) == (name == "validation")]
