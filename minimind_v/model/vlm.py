"""MiniMind-V: the decoder that reads pictures.

The prompt's ``<image>`` tag is expanded to ``num_image_tokens`` placeholder tokens (50 for
ViT-B/32). Their embeddings are overwritten, in one batched ``masked_scatter``, by the projected
CLIP patch tokens; the decoder never knows the difference between a word and a patch.

The frozen vision encoder is *attached*, not owned: its weights are not part of this model's
checkpoint, only its name or folder (``config.vision_model``) is. A model loaded from a folder
(``MiniMindVLM.from_pretrained``, or ``AutoModelForImageTextToText`` / ``AutoModelForCausalLM``
once ``minimind_v`` is imported) loads that encoder the first time it is given ``pixel_values``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import MiniMindConfig
from ..tokenizer import image_placeholder
from .folders import read_folder_config
from .llm import MiniMindForCausalLM
from .projector import VisionProjector


VISION_TOKENS = ("all", "cls")


class VLMConfig(MiniMindConfig):
    """The decoder's configuration plus what joins it to a vision encoder."""

    model_type = "minimind_v"

    def __init__(
        self,
        vision_model: str = "openai/clip-vit-base-patch32",
        vision_width: int = 768,
        num_image_tokens: int = 50,
        projector: str = "linear",
        image_token_ids: list[int] | None = None,
        vision_tokens: str = "all",
        **kwargs,
    ):
        if vision_tokens not in VISION_TOKENS:
            raise ValueError(f"vision_tokens must be one of {VISION_TOKENS}, got {vision_tokens!r}")
        self.vision_model = vision_model
        self.vision_width = vision_width
        self.num_image_tokens = num_image_tokens
        self.projector = projector
        # The token ids that stand for one image, in order (ours: N copies of <|image|>;
        # the original tokenizer: '<' * 25 + '>' * 25).
        self.image_token_ids = list(image_token_ids or [])
        # "all": each placeholder gets its own patch token; "cls": every placeholder gets the CLS
        # token, so the decoder sees only the pooled picture (the ablation of chapter 08).
        self.vision_tokens = vision_tokens
        super().__init__(**kwargs)


def placeholder_mask(input_ids: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions covered by an occurrence of ``pattern`` (length N) in each row.

    Batched: find every window that equals the pattern, then mark the N positions after each
    start with a running sum (a position is covered if a match started within the last N).
    """
    B, T = input_ids.shape
    N = pattern.numel()
    covered = torch.zeros(B, T, dtype=torch.bool, device=input_ids.device)
    if T < N:
        return covered
    starts = (input_ids.unfold(1, N, 1) == pattern).all(-1)  # (B, T-N+1)
    starts = torch.nn.functional.pad(starts.long(), (0, N - 1))  # (B, T)
    running = starts.cumsum(1)
    running = running - torch.nn.functional.pad(running, (N, 0))[:, :T]  # matches in (t-N, t]
    return running > 0


class MiniMindVLM(MiniMindForCausalLM):
    config_class = VLMConfig

    def __init__(self, config: VLMConfig):
        super().__init__(config)  # the decoder, initialised by its post_init (the only one)
        self.vision_proj = VisionProjector(config.vision_width, config.dim, config.projector)
        self._vision_encoder = None
        # Dropout on the encoder's tokens, in training only (a training setting, not saved: `--image-dropout`)
        self.image_dropout = 0.0
        # The projection, added after post_init, gets the same init rule: init_weights touches only
        # modules not yet initialised (none while from_pretrained builds on the meta device), in the
        # order, and so with the random draws, that seeded models always had.
        self.init_weights()

    @classmethod
    def folder_hints(cls, folder: str) -> dict[str, str]:
        clip = (f"a MiniMind-V folder names its encoder in config.json (vision_model); give {folder} as "
                "--vision to the VLM training stages, or as vision_model= to load_vlm")
        return {
            "minimind": (f"train the VLM stages first (python -m minimind_v.train.pretrain_vlm --init {folder} ..., "
                         "then minimind_v.train.sft_vlm) and load the folder they write"),
            "clip": clip,
            "clip_vision_model": clip,
        }

    @classmethod
    def from_language_model(cls, lm: MiniMindForCausalLM, **vision_kwargs) -> "MiniMindVLM":
        """A VLM whose decoder starts as ``lm`` and whose projection is freshly initialised."""
        config = VLMConfig(**{**lm.config.to_diff_dict(), **vision_kwargs})
        vlm = cls(config)
        missing, unexpected = vlm.load_state_dict(lm.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("vision_proj.") for k in missing), (missing, unexpected)
        return vlm.to(lm.device)

    # -- the vision encoder, attached at run time ----------------------------------------
    def attach_vision_encoder(self, encoder) -> "MiniMindVLM":
        """Use ``encoder`` (a frozen :class:`~minimind_v.model.vision.VisionEncoder`) for pixel inputs."""
        if encoder.num_tokens != self.config.num_image_tokens or encoder.width != self.config.vision_width:
            raise ValueError(
                f"encoder gives ({encoder.num_tokens}, {encoder.width}) tokens per image but this "
                f"model expects ({self.config.num_image_tokens}, {self.config.vision_width})"
            )
        # Stored outside the module tree so its weights stay out of this model's checkpoint.
        self.__dict__["_vision_encoder"] = encoder
        return self

    @property
    def vision_encoder(self):
        return self.__dict__["_vision_encoder"]

    def load_vision_encoder(self, vision_model: str | None = None):
        """Load and attach the encoder ``config.vision_model`` names (a folder inside the model's own
        folder, a local folder or a hub id; or ``vision_model``), on this model's device."""
        from .vision import VisionEncoder

        name = vision_model or resolve_vision_model(self.name_or_path or ".", self.config.vision_model)
        self.attach_vision_encoder(VisionEncoder.from_pretrained(name, device=self.device))
        return self.vision_encoder

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, 3, S, S) -> frozen patch tokens (n_images, N, vision_width).

        A model loaded from a folder loads the encoder its config names on first use."""
        if self.vision_encoder is None:
            if not (self.name_or_path and Path(self.name_or_path).is_dir()):
                raise RuntimeError("no vision encoder attached: call attach_vision_encoder(encoder) "
                                   "or pass image_tokens (e.g. from the feature cache)")
            self.load_vision_encoder()
        return self.vision_encoder(pixel_values)

    # -- placeholder substitution ---------------------------------------------------------
    def substitute_image_tokens(self, input_ids, inputs_embeds, image_tokens) -> torch.Tensor:
        """Replace each image's N placeholder embeddings with its N projected patch tokens.

        input_ids (B, T); inputs_embeds (B, T, dim); image_tokens (n_images, N, vision_width),
        images in the order their placeholders appear, row by row.
        """
        N = self.config.num_image_tokens
        if not self.config.image_token_ids:
            raise ValueError("config.image_token_ids is empty: which tokens stand for the image?")
        pattern = torch.tensor(self.config.image_token_ids, device=input_ids.device)
        mask = placeholder_mask(input_ids, pattern)  # (B, T)
        per_row = mask.sum(1)
        if torch.any(per_row % N):
            bad = [(i, int(c)) for i, c in enumerate(per_row.tolist()) if c % N]
            raise ValueError(
                f"rows {bad} (row, placeholder tokens) hold a partial image placeholder: each image "
                f"needs exactly {N} placeholder tokens"
            )
        n_images = int(per_row.sum()) // N
        if n_images != image_tokens.shape[0] or image_tokens.shape[1:] != (N, self.config.vision_width):
            raise ValueError(
                f"the prompts hold placeholders for {n_images} image(s) of {N} tokens, but "
                f"image tokens of shape {tuple(image_tokens.shape)} were given "
                f"(expected ({n_images}, {N}, {self.config.vision_width}))"
            )
        if self.config.vision_tokens == "cls":  # the encoder's CLS token (index 0) in every place
            image_tokens = image_tokens[:, :1].expand(-1, N, -1)
        if self.training and self.image_dropout:
            image_tokens = F.dropout(image_tokens, self.image_dropout)
        projected = self.vision_proj(image_tokens.to(inputs_embeds.dtype))  # (n, N, W) -> (n, N, dim)
        # (bfloat16 under autocast: the text's embeddings, and so the residual stream, stay as they are)
        return inputs_embeds.masked_scatter(mask[..., None], projected.to(inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        """Like the decoder's forward, plus the picture: ``pixel_values`` (n_images, 3, S, S)
        through the attached encoder, or ready ``image_tokens`` (n_images, N, vision_width)
        from the feature cache. With neither, the placeholders keep their own embeddings
        (the text-only baseline). ``logits_to_keep`` is named here so that ``generate`` sees it
        and asks for the last position's logits only when it reads the prompt."""
        if pixel_values is not None and image_tokens is not None:
            raise ValueError("pass pixel_values or image_tokens, not both")
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids")
            inputs_embeds = self.tok_embeddings(input_ids)
            if pixel_values is not None:
                with torch.no_grad():
                    image_tokens = self.encode_images(pixel_values)
            if image_tokens is not None:
                inputs_embeds = self.substitute_image_tokens(input_ids, inputs_embeds, image_tokens)
        return super().forward(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               logits_to_keep=logits_to_keep, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, cache=None, pixel_values=None,
                                      image_tokens=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, cache=cache, **kwargs)
        # The picture enters once, with the prompt; later steps read it from the KV cache.
        if cache is None or cache.get_seq_length() == 0:
            inputs["pixel_values"], inputs["image_tokens"] = pixel_values, image_tokens
        return inputs


def is_vlm_folder(folder: str | Path) -> bool:
    """Does the saved folder hold a MiniMind-V (rather than a text LM)?"""
    return read_folder_config(folder).get("model_type") == VLMConfig.model_type


def load_start_model(init: str | Path, tokenizer, encoder, projector: str = "linear",
                     vision_tokens: str = "all") -> "MiniMindVLM":
    """Where a VLM stage starts: a VLM folder continues as it is; a text LM folder gets a fresh
    projection from the encoder's width to the decoder's, and the tokenizer's image placeholder."""
    if is_vlm_folder(init):
        return MiniMindVLM.from_pretrained(init)
    lm = MiniMindForCausalLM.from_pretrained(init)
    _, ids = image_placeholder(tokenizer, encoder.num_tokens)
    return MiniMindVLM.from_language_model(
        lm, vision_width=encoder.width, num_image_tokens=encoder.num_tokens, projector=projector,
        image_token_ids=ids, vision_tokens=vision_tokens,
    )


def resolve_vision_model(folder: str | Path, vision_model: str) -> str:
    """A saved VLM may keep its encoder inside its own folder (a relative name) or name a hub id."""
    inside = Path(folder) / vision_model
    return str(inside) if inside.exists() else vision_model
