"""Stand-ins for the real parts, for tests, exercises and benchmarks: a CLIP of any geometry with
random weights, written as a real checkpoint folder in seconds and with no download.

Random weights cost exactly what trained ones do, so speed and shapes can be measured without
the real model; nothing here trains.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .model.folders import quiet_transformers


def make_random_clip(
    folder: str | os.PathLike,
    image_size: int = 224,
    patch_size: int = 32,
    width: int = 64,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
    full: bool = False,
) -> Path:
    """Write a random-weight CLIP vision encoder to `folder` and return the folder.

    The folder looks like a real checkpoint (config.json, model.safetensors,
    preprocessor_config.json with CLIP's mean/std, resize to `image_size` then centre crop), so
    `VisionEncoder.from_pretrained(folder)` and `CLIPVisionModel.from_pretrained(folder)` load it.
    full=True saves a whole CLIPModel (with a one-layer text tower), like openai's folders.
    Tokens per image: 1 + (image_size // patch_size) ** 2. Seconds to build, no downloads.
    """
    folder = Path(folder)
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if full:
            text = dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=128, pad_token_id=1, bos_token_id=126, eos_token_id=127,
            )
            model = CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config=text, projection_dim=32))
        else:
            model = CLIPVisionModel(vision)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    with quiet_transformers():
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder
