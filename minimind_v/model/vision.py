"""The frozen CLIP vision encoder: images -> patch tokens.

MiniMind-V looks at an image through CLIP's vision transformer and never trains it. The image
is brought to S x S pixels, cut into (S/P)^2 patches of P x P pixels, and
each patch plus one CLS token comes out as a vector of the encoder's width. For the real
encoder, openai/clip-vit-base-patch32, that is 224/32 = 7, so 7 x 7 + 1 = 50 tokens of width 768.

The tokens we keep are the encoder's LAST HIDDEN STATE, before CLIP's post-layernorm (which
CLIP only applies to the pooled CLS vector), exactly `CLIPVisionModel(...).last_hidden_state`.

How a picture that is not square becomes S x S is the encoder's *preprocessing mode*, part of
what a model was trained with: "center_crop" (CLIP's own recipe and the book's default: scale
the shorter side to S, cut the middle S x S) or "resize" (MiniMind-V v1: the whole picture
squeezed to S x S, so nothing is cut off). The mode is saved with an encoder folder
(`vision_preprocessing.json`) and read back from it; a VLM whose encoder is a hub id keeps it in
its config (`vision_preprocessing`).

One class serves both worlds of the book: `VisionEncoder.from_pretrained(DEFAULT_CLIP)` for the
real encoder, or `VisionEncoder.from_pretrained(folder)` for the tiny CLIP trained in the book
(or any CLIPModel / CLIPVisionModel folder). `minimind_v.testing.make_random_clip` writes a tiny random-weight
CLIP folder for tests and quick experiments.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ..data.images import load_image, to_rgb
from .folders import HubUnreachableError, check_safe_weights, load_hub_id, looks_like_local_path, quiet_transformers
from .image_processing import (DEFAULT_PREPROCESSING, PREPROCESSING_FILE, Preprocessor, check_preprocessing,
                               has_image_processor_config, saved_preprocessing)

DEFAULT_CLIP = "openai/clip-vit-base-patch32"

# CLIP checkpoints this loader understands (model_type in config.json).
_CLIP_MODEL_TYPES = ("clip", "clip_vision_model")

# Config fields that change what the encoder computes (weights' shapes are hashed separately).
_ARCHITECTURE_KEYS = (
    "image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "hidden_act", "layer_norm_eps",
)

# Preprocessor fields that only name classes, not pixels.
_PROCESSOR_NAME_KEYS = ("image_processor_type", "feature_extractor_type", "processor_class", "_processor_class", "auto_map")

HOW_TO_GET_CLIP = (
    "Two ways to get a vision encoder:\n"
    f"  * the real one: with internet, VisionEncoder.from_pretrained({DEFAULT_CLIP!r}) downloads it once "
    "into the Hugging Face cache; or download it to a folder with\n"
    f"      hf download {DEFAULT_CLIP} --local-dir <folder>\n"
    "    and pass that folder;\n"
    "  * the embedded tiny CLIP (no internet needed): train it with\n"
    "      python -m minimind_v.train.clip\n"
    "    and pass its output folder to VisionEncoder.from_pretrained(<folder>)."
)


class VisionModelNotFoundError(OSError):
    """The CLIP encoder could not be found locally nor downloaded."""


# ----------------------------------------------------------------- hub ids: cache first, fail fast


class VisionEncoder(nn.Module):
    """Frozen CLIP vision tower: PIL images -> pixel_values (B, 3, S, S) -> tokens (B, T, W).

    Always in eval mode with requires_grad False; `forward` runs under torch.no_grad. (Not
    inference_mode: its tensors could not be fed to the trainable projector afterwards.)
    """

    def __init__(self, model: CLIPVisionModel, processor: CLIPImageProcessorPil, name_or_path: str = "",
                 preprocessing: str = DEFAULT_PREPROCESSING):
        super().__init__()
        self.model = model
        self.processor = processor
        self.name_or_path = str(name_or_path)  # where it came from; VLM folders record it
        self.preprocessing: str = check_preprocessing(preprocessing)  # "center_crop" or "resize"
        config = model.config
        self.image_size: int = int(config.image_size)
        self.pixel_processor = Preprocessor(processor, self.preprocessing, self.image_size)
        self.patch_size: int = int(config.patch_size)
        self.grid: int = self.image_size // self.patch_size  # patches per side (7 for ViT-B/32)
        self.num_tokens: int = 1 + self.grid * self.grid  # CLS + grid x grid patches (50)
        self.width: int = int(config.hidden_size)  # (768 for ViT-B/32)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)
        self._check_processor_matches_model()

    # ----------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_CLIP,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        preprocessing: str | None = None,
    ) -> "VisionEncoder":
        """Load from a hub id or a local CLIPModel / CLIPVisionModel folder whose image processor
        settings are in preprocessor_config.json or processor_config.json (whichever transformers reads).

        dtype: weights dtype, float32 unless given (whatever the checkpoint was saved in).
        device: where the weights live, CPU unless given. name_or_path is kept as given.
        preprocessing: "center_crop" or "resize"; None: what the folder records
        (vision_preprocessing.json), else "center_crop".
        """
        if preprocessing is not None:
            check_preprocessing(preprocessing)
        source = os.fspath(name_or_path)
        local = Path(source).expanduser()

        def load(local_files_only: bool, use_safetensors: bool | None = None):
            with quiet_transformers():
                model_and_info = CLIPVisionModel.from_pretrained(
                    load_from, dtype=dtype or torch.float32, output_loading_info=True, weights_only=True,
                    use_safetensors=use_safetensors, local_files_only=local_files_only,
                )
                processor = CLIPImageProcessorPil.from_pretrained(load_from, local_files_only=local_files_only)
                return model_and_info, processor

        hub = False
        if local.is_dir():
            _check_clip_folder(local)
            load_from = str(local)
        elif local.exists():
            raise VisionModelNotFoundError(f"{source} is a file; expected a CLIP model folder.\n{HOW_TO_GET_CLIP}")
        elif looks_like_local_path(source):
            raise VisionModelNotFoundError(f"No CLIP model folder at {source}.\n{HOW_TO_GET_CLIP}")
        else:
            load_from, hub = source, True  # a hub id such as openai/clip-vit-base-patch32
        try:
            if hub:
                (model, info), processor = load_hub_id(source, load, "CLIP vision encoder")
            else:
                # A local folder: safetensors only (checked above), never the hub.
                (model, info), processor = load(use_safetensors=True, local_files_only=True)
        except HubUnreachableError as err:
            raise VisionModelNotFoundError(f"{err}\n{HOW_TO_GET_CLIP}") from err
        except OSError as err:  # unknown repo, missing files
            raise VisionModelNotFoundError(
                f"Cannot load the CLIP vision encoder {source!r}: {str(err).splitlines()[0]}\n{HOW_TO_GET_CLIP}"
            ) from err
        # Loading a full CLIPModel folder leaves the text tower's weights unused (expected); a
        # MISSING vision weight would silently stay random, so that is an error.
        missing = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
        if missing:
            raise ValueError(
                f"{source}: the checkpoint lacks {len(missing)} vision-encoder weights "
                f"(e.g. {missing[:3]}); is it a CLIP checkpoint?"
            )
        if preprocessing is None:
            preprocessing = (saved_preprocessing(local) if not hub else None) or DEFAULT_PREPROCESSING
        encoder = cls(model, processor, name_or_path=source, preprocessing=preprocessing)
        if device is not None:
            encoder.to(device)
        return encoder

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the vision tower, its image processor and its preprocessing mode to `folder`
        (loadable by from_pretrained)."""
        folder = Path(folder)
        with quiet_transformers():
            self.model.save_pretrained(folder)
            self.processor.save_pretrained(folder)
        (folder / PREPROCESSING_FILE).write_text(json.dumps({"mode": self.preprocessing}) + "\n", encoding="utf-8")
        return folder

    # ----------------------------------------------------------------- frozen by construction

    def train(self, mode: bool = True) -> "VisionEncoder":
        """Stays in eval mode whatever is asked: the encoder is frozen (no dropout, fixed features)."""
        return super().train(False)

    def requires_grad_(self, requires_grad: bool = True) -> "VisionEncoder":
        """Stays requires_grad=False whatever is asked: the encoder is never trained."""
        return super().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def extra_repr(self) -> str:
        return (
            f"name_or_path={self.name_or_path!r}, image_size={self.image_size}, patch_size={self.patch_size}, "
            f"num_tokens={self.num_tokens}, width={self.width}, preprocessing={self.preprocessing!r}"
        )

    # ----------------------------------------------------------------- images -> tokens

    def preprocess(self, images: Sequence[Image.Image] | Image.Image) -> torch.Tensor:
        """PIL images of any mode and size -> pixel_values (B, 3, S, S) float32 on the CPU
        (through the encoder's preprocessing mode: centre crop or whole-picture resize)."""
        if isinstance(images, Image.Image):
            images = [images]
        return self.pixel_processor(images)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) -> last hidden state (B, num_tokens, width), on the model's device and dtype."""
        expected = (3, self.image_size, self.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(pixel_values.shape)}; use VisionEncoder.preprocess(images)"
            )
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype, non_blocking=True)
        # (B, 3, S, S) -> (B, 1 + (S/P)^2, W), before the post-layernorm
        return self.model(pixel_values=pixel_values).last_hidden_state

    def pixel_batches(
        self, items: Sequence, batch_size: int = 64, num_workers: int = 0
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start, pixel_values (b, 3, S, S)) for image paths or PIL images, in order.

        num_workers > 0 decodes and resizes images in background processes (the bottleneck when
        a GPU encodes: one CPU core prepares a few hundred images/s).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        loader = torch.utils.data.DataLoader(
            _PixelDataset(items, self.pixel_processor),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
        )
        start = 0
        for pixel_values in loader:
            yield start, pixel_values
            start += len(pixel_values)

    def encode_images(
        self,
        images_or_paths: Sequence,
        batch_size: int = 64,
        progress: bool = False,
        num_workers: int = 0,
    ) -> torch.Tensor:
        """Image paths or PIL images -> tokens (N, num_tokens, width) on the CPU, in the model's dtype."""
        if isinstance(images_or_paths, (str, os.PathLike, Image.Image)):
            images_or_paths = [images_or_paths]  # one image -> N = 1
        items = list(images_or_paths)
        tokens = torch.empty(len(items), self.num_tokens, self.width, dtype=self.dtype)
        with tqdm(total=len(items), unit="img", desc="encoding images", disable=not progress) as bar:
            for start, pixel_values in self.pixel_batches(items, batch_size, num_workers):
                tokens[start : start + len(pixel_values)] = self(pixel_values).cpu()
                bar.update(len(pixel_values))
        return tokens

    # ----------------------------------------------------------------- identity and cost

    def fingerprint(self) -> str:
        """Short hash of everything that decides the tokens: weights (bytes), architecture, preprocessing.

        Two encoders with the same fingerprint turn the same image into the same tokens (up to
        device arithmetic), so a feature cache keyed by it can never serve another encoder's output.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps(self.preprocess_config(), sort_keys=True).encode())
        architecture = {key: getattr(self.model.config, key, None) for key in _ARCHITECTURE_KEYS}
        digest.update(json.dumps(architecture, sort_keys=True, default=str).encode())
        for name, tensor in self.model.state_dict().items():
            tensor = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # raw bytes, any dtype
        return digest.hexdigest()[:16]

    def preprocess_config(self) -> dict:
        """The processor settings that decide pixel_values (JSON-normalised, class names dropped),
        with the preprocessing mode when it is not the default (so default fingerprints stay as they were)."""
        config = json.loads(self.processor.to_json_string())
        config = {key: value for key, value in config.items() if key not in _PROCESSOR_NAME_KEYS}
        if self.preprocessing != DEFAULT_PREPROCESSING:
            config["minimind_v_preprocessing"] = self.preprocessing
        return config

    def flops_per_image(self) -> int:
        """Multiply-add FLOPs (2 per MAC) of one forward pass, counting the matmuls and the patch convolution.

        Per layer with T tokens, width W, MLP width I: q/k/v/out projections 8*T*W^2, MLP 4*T*W*I,
        attention scores and weighted sum 4*T^2*W. Norms, softmax and activations are ignored.
        """
        config = self.model.config
        tokens, width, mlp = self.num_tokens, self.width, int(config.intermediate_size)
        patch_embedding = 2 * self.grid**2 * (config.num_channels * self.patch_size**2) * width
        per_layer = 8 * tokens * width**2 + 4 * tokens * width * mlp + 4 * tokens**2 * width
        return int(patch_embedding + config.num_hidden_layers * per_layer)

    def _check_processor_matches_model(self) -> None:
        # The position embeddings fix the image size; a processor cropping to another size would
        # fail deep inside CLIP, so check once with a dummy image.
        shape = tuple(self.preprocess([Image.new("RGB", (5, 3))]).shape[1:])
        if shape != (3, self.image_size, self.image_size):
            raise ValueError(
                f"{self.name_or_path or 'encoder'}: preprocessing makes images of shape {shape}, but the model "
                f"expects (3, {self.image_size}, {self.image_size}); fix crop_size/size in preprocessor_config.json"
            )


class _PixelDataset(torch.utils.data.Dataset):
    """Item i: image path or PIL image -> pixel_values (3, S, S). Used through a DataLoader."""

    def __init__(self, items: Sequence, preprocessor: Preprocessor):
        self.items = items
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.items[index]
        image = to_rgb(item) if isinstance(item, Image.Image) else load_image(item)
        return self.preprocessor([image])[0]


# --------------------------------------------------------------------- tiny CLIPs for tests


# --------------------------------------------------------------------- helpers


def _check_clip_folder(folder: Path) -> None:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise VisionModelNotFoundError(f"{folder} has no config.json, so it is not a model folder.\n{HOW_TO_GET_CLIP}")
    if not has_image_processor_config(folder):
        raise VisionModelNotFoundError(
            f"{folder} has no preprocessor_config.json, nor a processor_config.json with an 'image_processor' "
            f"entry: the encoder needs its preprocessing settings (saved by CLIPImageProcessor.save_pretrained "
            f"or CLIPProcessor.save_pretrained).\n{HOW_TO_GET_CLIP}"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in _CLIP_MODEL_TYPES:
        found = f"model_type is {model_type!r}" if isinstance(config, dict) else f"it holds a JSON {type(config).__name__}"
        raise ValueError(f"{config_file}: {found}, expected one of {_CLIP_MODEL_TYPES} (a CLIP checkpoint)")
    try:
        check_safe_weights(folder, "CLIP folder")
    except FileNotFoundError as err:
        raise VisionModelNotFoundError(f"{err}.\n{HOW_TO_GET_CLIP}") from None

