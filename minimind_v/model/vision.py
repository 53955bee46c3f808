"""The frozen CLIP vision encoder: images -> patch tokens.

MiniMind-V looks at an image through CLIP's vision transformer and never trains it. The image
is resized and centre-cropped to S x S pixels, cut into (S/P)^2 patches of P x P pixels, and
each patch plus one CLS token comes out as a vector of the encoder's width. For the real
encoder, openai/clip-vit-base-patch32, that is 224/32 = 7, so 7 x 7 + 1 = 50 tokens of width 768.

The tokens we keep are the encoder's LAST HIDDEN STATE, before CLIP's post-layernorm (which
CLIP only applies to the pooled CLS vector), exactly `CLIPVisionModel(...).last_hidden_state`.

One class serves both worlds of the book: `VisionEncoder.from_pretrained(DEFAULT_CLIP)` for the
real encoder, or `VisionEncoder.from_pretrained(folder)` for the tiny CLIP trained in the book
(or any CLIPModel / CLIPVisionModel folder). `make_random_clip` writes a tiny random-weight
CLIP folder for tests and quick experiments.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.utils import logging as hf_logging

from ..data.images import load_image, to_rgb

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


class VisionEncoder(nn.Module):
    """Frozen CLIP vision tower: PIL images -> pixel_values (B, 3, S, S) -> tokens (B, T, W).

    Always in eval mode with requires_grad False; `forward` runs under torch.no_grad. (Not
    inference_mode: its tensors could not be fed to the trainable projector afterwards.)
    """

    def __init__(self, model: CLIPVisionModel, processor: CLIPImageProcessorPil, name_or_path: str = ""):
        super().__init__()
        self.model = model
        self.processor = processor
        self.name_or_path = str(name_or_path)  # where it came from; VLM folders record it
        config = model.config
        self.image_size: int = int(config.image_size)
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
    ) -> "VisionEncoder":
        """Load from a hub id or a local CLIPModel / CLIPVisionModel folder with preprocessor_config.json.

        dtype: weights dtype, float32 unless given (whatever the checkpoint was saved in).
        device: where the weights live, CPU unless given. name_or_path is kept as given.
        """
        source = os.fspath(name_or_path)
        local = Path(source).expanduser()
        if local.is_dir():
            _check_clip_folder(local)
            load_from = str(local)
        elif local.exists():
            raise VisionModelNotFoundError(f"{source} is a file; expected a CLIP model folder.\n{HOW_TO_GET_CLIP}")
        elif _looks_like_local_path(source):
            raise VisionModelNotFoundError(f"No CLIP model folder at {source}.\n{HOW_TO_GET_CLIP}")
        else:
            load_from = source  # a hub id such as openai/clip-vit-base-patch32
        try:
            with quiet_transformers():
                model, info = CLIPVisionModel.from_pretrained(
                    load_from, dtype=dtype or torch.float32, output_loading_info=True
                )
                processor = CLIPImageProcessorPil.from_pretrained(load_from)
        except OSError as err:  # offline and not cached, unknown repo, missing files
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
        encoder = cls(model, processor, name_or_path=source)
        if device is not None:
            encoder.to(device)
        return encoder

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the vision tower and its preprocessing config to `folder` (loadable by from_pretrained)."""
        folder = Path(folder)
        with quiet_transformers():
            self.model.save_pretrained(folder)
            self.processor.save_pretrained(folder)
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
            f"num_tokens={self.num_tokens}, width={self.width}"
        )

    # ----------------------------------------------------------------- images -> tokens

    def preprocess(self, images: Sequence[Image.Image] | Image.Image) -> torch.Tensor:
        """PIL images of any mode and size -> pixel_values (B, 3, S, S) float32 on the CPU."""
        if isinstance(images, Image.Image):
            images = [images]
        images = [to_rgb(image) for image in images]
        if not images:
            return torch.empty(0, 3, self.image_size, self.image_size)
        # resize shortest side -> centre crop S x S -> scale to [0, 1] -> normalise per channel
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

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
            _PixelDataset(items, self.processor),
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
        """The processor settings that decide pixel_values (JSON-normalised, class names dropped)."""
        config = json.loads(self.processor.to_json_string())
        return {key: value for key, value in config.items() if key not in _PROCESSOR_NAME_KEYS}

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

    def __init__(self, items: Sequence, processor: CLIPImageProcessorPil):
        self.items = items
        self.processor = processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.items[index]
        image = to_rgb(item) if isinstance(item, Image.Image) else load_image(item)
        return self.processor(images=[image], return_tensors="pt")["pixel_values"][0]


# --------------------------------------------------------------------- tiny CLIPs for tests


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


# --------------------------------------------------------------------- helpers


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load reports and weight-loading bars for the duration (restored after).

    Loading a vision tower from a full CLIPModel folder prints a long table of unused text
    weights; we check for missing weights ourselves instead.
    """
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _check_clip_folder(folder: Path) -> None:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise VisionModelNotFoundError(f"{folder} has no config.json, so it is not a model folder.\n{HOW_TO_GET_CLIP}")
    if not (folder / "preprocessor_config.json").is_file():
        raise VisionModelNotFoundError(
            f"{folder} has no preprocessor_config.json: the encoder needs its preprocessing settings "
            f"(saved by CLIPImageProcessor.save_pretrained).\n{HOW_TO_GET_CLIP}"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    if model_type not in _CLIP_MODEL_TYPES:
        raise ValueError(
            f"{config_file}: model_type is {model_type!r}, expected one of {_CLIP_MODEL_TYPES} (a CLIP checkpoint)"
        )


def _looks_like_local_path(source: str) -> bool:
    """A hub id is 'name' or 'owner/name'; anything else (absolute, ./, ~, deeper) is meant as a folder."""
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
    )
