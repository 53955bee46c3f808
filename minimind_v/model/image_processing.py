"""How a picture becomes pixel values, and where those settings live.

How a picture that is not square becomes S x S is the encoder's *preprocessing mode*:
"center_crop" (CLIP's own recipe and the book's default: scale the shorter side to S, cut the
middle S x S) or "resize" (MiniMind-V v1: the whole picture squeezed to S x S, nothing cut off).
A ``Preprocessor`` applies one with CLIP's image processor. The mode is saved beside an encoder
folder's image processor settings (``vision_preprocessing.json``), which transformers keeps in
``preprocessor_config.json`` or in the "image_processor" entry of ``processor_config.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ..data.images import to_rgb
from .folders import load_hub_id, looks_like_local_path, quiet_transformers

# Where transformers keeps an image processor's settings: its own file, or (transformers 5's
# ProcessorMixin.save_pretrained) the "image_processor" entry of processor_config.json.
IMAGE_PROCESSOR_FILE, PROCESSOR_FILE = "preprocessor_config.json", "processor_config.json"


# How a picture becomes S x S: CLIP's resize-shorter-side + centre crop, or v1's whole-picture resize.
PREPROCESSING_MODES = ("center_crop", "resize")


DEFAULT_PREPROCESSING = "center_crop"


PREPROCESSING_FILE = "vision_preprocessing.json"  # {"mode": ...}, beside preprocessor_config.json


def check_preprocessing(mode: str) -> str:
    if mode not in PREPROCESSING_MODES:
        raise ValueError(f"preprocessing mode must be one of {PREPROCESSING_MODES}, got {mode!r}")
    return mode


def saved_preprocessing(folder: str | os.PathLike) -> str | None:
    """The preprocessing mode a local encoder folder records (None: it records none)."""
    path = Path(folder) / PREPROCESSING_FILE
    if not path.is_file():
        return None
    try:
        mode = json.loads(path.read_text(encoding="utf-8")).get("mode")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{path}: not a JSON object with a 'mode' ({err})") from None
    try:
        return check_preprocessing(mode)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


class Preprocessor:
    """PIL images -> pixel_values (n, 3, S, S) by an image processor and a preprocessing mode.

    "center_crop": the processor's own steps (resize the shorter side, centre crop, rescale,
    normalise). "resize": the whole picture resized to S x S (bicubic, as PIL's default in v1's
    ``image.resize((224, 224))``), then only rescaled and normalised. Picklable, for DataLoader workers.
    """

    def __init__(self, processor: CLIPImageProcessorPil, mode: str = DEFAULT_PREPROCESSING, image_size: int = 224):
        self.processor, self.mode, self.image_size = processor, check_preprocessing(mode), int(image_size)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        images = [to_rgb(image) for image in images]
        if not images:
            return torch.empty(0, 3, self.image_size, self.image_size)
        table = self.value_table()
        if table is not None and all(image.size == (self.image_size, self.image_size) for image in images):
            return pixels_by_table(images, table)
        if self.mode == "resize":
            size = (self.image_size, self.image_size)
            images = [image.resize(size, Image.Resampling.BICUBIC) for image in images]
            return self.processor(images=images, do_resize=False, do_center_crop=False,
                                  return_tensors="pt")["pixel_values"]
        # resize shortest side -> centre crop S x S -> scale to [0, 1] -> normalise per channel
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def value_table(self) -> np.ndarray | None:
        """(3, 256) float32: the pixel value the processor gives each byte of each channel, when an
        S x S picture goes through it unchanged but for rescaling and normalising (its resize and crop
        are then the identity); None when its settings do more (or less) than that."""
        if "_table" not in self.__dict__:
            self._table = None
            p, S = self.processor, self.image_size
            size, crop = p.size, p.crop_size
            resize_is_identity = (self.mode == "resize" or not p.do_resize
                                  or (size.shortest_edge == S and not size.longest_edge)
                                  or (size.height == size.width == S))
            crop_is_identity = self.mode == "resize" or not p.do_center_crop or crop.height == crop.width == S
            if (resize_is_identity and crop_is_identity and p.do_rescale and p.do_normalize
                    and len(p.image_mean) == len(p.image_std) == 3):
                # The processor's arithmetic, value by value: bytes * factor in float64, then float32,
                # then (x - mean) / std in float32.
                values = (np.arange(256, dtype=np.float64) * p.rescale_factor).astype(np.float32)
                mean = np.asarray(p.image_mean, dtype=np.float32)[:, None]
                std = np.asarray(p.image_std, dtype=np.float32)[:, None]
                self._table = (values[None] - mean) / std
        return self._table


def pixels_by_table(images: Sequence[Image.Image], table: np.ndarray) -> torch.Tensor:
    """RGB pictures of one size -> (n, 3, S, S) float32, each byte looked up in ``table`` (3, 256):
    one pass over the pixels instead of the image processor's resize, crop, rescale and normalise
    (~2x the pictures per second when building a feature cache)."""
    pixels = np.stack([np.asarray(image) for image in images])  # (n, S, S, 3) uint8
    out = np.empty((len(images), 3, *pixels.shape[1:3]), dtype=np.float32)
    for channel in range(3):
        out[:, channel] = table[channel][pixels[..., channel]]
    return torch.from_numpy(out)


def has_image_processor_config(folder: str | os.PathLike) -> bool:
    """Whether transformers finds image processor settings in a local folder: processor_config.json
    with an "image_processor" entry (what transformers 5's CLIPProcessor.save_pretrained writes,
    read first), or preprocessor_config.json."""
    folder = Path(folder)
    processor_file = folder / PROCESSOR_FILE
    if processor_file.is_file():
        try:
            if isinstance(json.loads(processor_file.read_text(encoding="utf-8")).get("image_processor"), dict):
                return True
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass  # transformers would fail on it too, unless preprocessor_config.json is there
    return (folder / IMAGE_PROCESSOR_FILE).is_file()


def image_processor_from_dict(settings, where) -> CLIPImageProcessorPil:
    """The image processor saved in a processor_config.json: CLIP's PIL pipeline, as the vision
    encoder uses (whatever class name the file records)."""
    if not isinstance(settings, dict):
        raise ValueError(f"{where} holds no image_processor settings")
    names = ("image_processor_type", "processor_class", "_processor_class", "auto_map")
    return CLIPImageProcessorPil(**{k: v for k, v in settings.items() if k not in names})


def load_image_processor(name_or_path: str) -> CLIPImageProcessorPil:
    """The image processor of a vision encoder folder (or of a cached hub id: never a long wait offline)."""
    local = Path(name_or_path).expanduser()
    with quiet_transformers():
        if local.is_dir():
            return CLIPImageProcessorPil.from_pretrained(str(local), local_files_only=True)
        if looks_like_local_path(name_or_path) or not name_or_path:
            raise FileNotFoundError(f"no vision encoder folder at {name_or_path!r} (named by the model's config.json): "
                                    "its image processor settings are needed to build the processor")
        return load_hub_id(name_or_path, lambda **hub: CLIPImageProcessorPil.from_pretrained(name_or_path, **hub),
                           "image processor")


def encoder_preprocessing(encoder) -> str:
    """A ``VisionEncoder``'s preprocessing mode ("center_crop" for encoders that have none)."""
    return getattr(encoder, "preprocessing", "center_crop")
