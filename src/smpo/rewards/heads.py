"""The linear stack shared by the LAION aesthetic predictor and ImageReward's reward head."""

from __future__ import annotations

import torch
from torch import nn


class LinearStackHead(nn.Module):
    """Linear(d, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
    Linear(64, 16), Linear(16, 1), without activations (as published: the whole head is affine).

    ``layers`` indices (0, 2, 4, 6, 7 hold weights) match both published state dicts
    (aesthetic ``layers.*``, ImageReward ``mlp.layers.*``).
    """

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    @property
    def embed_dim(self) -> int:
        return self.layers[0].in_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, d]`` -> ``[B]``."""
        return self.layers(features).squeeze(-1)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str) -> LinearStackHead:
        """Build from ``layers.*`` tensors (cast to float32); ``source`` names the file in errors."""
        if "layers.0.weight" not in state:
            raise ValueError(f"{source}: not a linear-stack head; expected keys layers.{{0,2,4,6,7}}.{{weight,bias}}, "
                             f"found {sorted(state)[:6]}")
        head = cls(embed_dim=state["layers.0.weight"].shape[1])
        try:
            head.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as error:
            raise ValueError(f"{source}: head weights do not fit the linear stack: {error}") from error
        return head.eval()
