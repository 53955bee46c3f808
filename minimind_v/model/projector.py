"""The projection: the "dictionary" that translates CLIP's patch tokens into the decoder's width."""

from __future__ import annotations

from torch import nn

PROJECTORS = ("linear", "mlp")


class VisionProjector(nn.Module):
    """(B, N, vision_width) -> (B, N, dim).

    ``linear`` is the original MiniMind-V's single ``nn.Linear`` (with a bias); ``mlp`` is
    LLaVA-1.5's two layers with a GELU between them.
    """

    def __init__(self, vision_width: int, dim: int, kind: str = "linear"):
        super().__init__()
        if kind == "linear":
            self.layers = nn.Sequential(nn.Linear(vision_width, dim))
        elif kind == "mlp":
            self.layers = nn.Sequential(nn.Linear(vision_width, dim), nn.GELU(), nn.Linear(dim, dim))
        else:
            raise ValueError(f"unknown projector {kind!r}; choose one of {PROJECTORS}")

    def forward(self, image_tokens):
        return self.layers(image_tokens)
