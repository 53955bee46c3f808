"""How a prompt looks to the model: a strip of token boxes.

Each box is one token with its text (a newline shows as ↵, a space as ·); the image placeholder
run is shaded and, unless expanded, collapsed into a single wide box ("50 image tokens");
tokens that carry a loss (label != -100, the answer-only mask) are drawn bold and coloured.
"""

from __future__ import annotations

from typing import Sequence

import unicodedata
from functools import lru_cache

import torch

from ..model.vlm import placeholder_mask
from ..tokenizer import IGNORE_INDEX, IMAGE_TOKEN

# Colours: plain text, image placeholders, tokens that carry a loss.
TEXT_FILL, IMAGE_FILL, LOSS_FILL = "#f2f2f2", "#cfe3f7", "#fde2c4"
TEXT_EDGE, IMAGE_EDGE, LOSS_EDGE = "#9e9e9e", "#4a86c5", "#d2691e"


# Fonts with Chinese glyphs (the original dataset is Chinese), used as fallbacks where installed.
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei",
             "Microsoft YaHei", "SimHei", "PingFang SC", "Heiti SC", "Arial Unicode MS")


def font_family(base: str = "DejaVu Sans") -> list[str]:
    """``base`` followed by the installed CJK fonts: matplotlib takes each glyph from the first
    font that has it, so Chinese tokens render instead of empty boxes."""
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return [base, *(name for name in CJK_FONTS if name in installed)]


def _as_list(values, what: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.dim() == 2 and values.shape[0] == 1:
            values = values[0]
        if values.dim() != 1:
            raise ValueError(f"{what} must be one sequence (T,) or (1, T), got shape {tuple(values.shape)}")
        return values.tolist()
    return [int(v) for v in values]


def image_positions_mask(tokenizer, input_ids: Sequence[int], image_token_ids=None, image_mask=None) -> list[bool]:
    """Which positions hold image placeholders.

    ``image_mask`` (a bool per token) is used as given; else ``image_token_ids`` (the placeholder
    pattern, e.g. ``config.image_token_ids``) is searched for; else every ``<|image|>`` token.
    """
    ids = _as_list(input_ids, "input_ids")
    if image_mask is not None:
        mask = [bool(m) for m in _as_list(image_mask, "image_mask")]
        if len(mask) != len(ids):
            raise ValueError(f"image_mask has {len(mask)} entries for {len(ids)} tokens")
        return mask
    if image_token_ids is not None:
        pattern = torch.tensor(list(image_token_ids))
        if pattern.numel() == 0:
            raise ValueError("image_token_ids is empty")
        return placeholder_mask(torch.tensor([ids]), pattern)[0].tolist()
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if IMAGE_TOKEN in tokenizer.get_vocab() else None
    return [i == image_id for i in ids]


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable stand-in character -> its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            stand_ins[chr(byte)] = byte
        else:  # unprintable bytes are shifted past 255
            stand_ins[chr(256 + extra)] = byte
            extra += 1
    return stand_ins


def token_text(tokenizer, token_id: int) -> str:
    """One token's text. A byte-level token holding part of a character (a Chinese character is
    3 UTF-8 bytes, often split over tokens) shows its bytes, e.g. '\\xe7\\xba', not U+FFFD."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text
    piece = tokenizer.convert_ids_to_tokens(token_id)
    decoder = _byte_level_decoder()
    if not isinstance(piece, str) or not all(c in decoder for c in piece):
        return text  # not a byte-level token: keep what decode gave
    return bytes(decoder[c] for c in piece).decode("utf-8", errors="backslashreplace")


def escape(text: str) -> str:
    """Make invisible characters visible: newline -> ↵, tab -> ⇥, other control characters
    as Python escapes (\\x1b)."""
    text = text.replace("\n", "↵").replace("\t", "⇥")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def token_label(text: str) -> str:
    """A token as a short title: control characters made visible, outer spaces dropped."""
    shown = escape(text)
    return shown.strip() or shown.replace(" ", "·")


def describe_tokens(tokenizer, input_ids, image_token_ids=None, image_mask=None, labels=None):
    """[(index, token_text, is_image, has_loss), ...]: one entry per token, text escaped."""
    ids = _as_list(input_ids, "input_ids")
    is_image = image_positions_mask(tokenizer, ids, image_token_ids, image_mask)
    if labels is None:
        has_loss = [False] * len(ids)
    else:
        labels = _as_list(labels, "labels")
        if len(labels) != len(ids):
            raise ValueError(f"labels has {len(labels)} entries for {len(ids)} tokens")
        has_loss = [label != IGNORE_INDEX for label in labels]
    texts = [escape(token_text(tokenizer, i)) for i in ids]
    return [(i, texts[i], is_image[i], has_loss[i]) for i in range(len(ids))]


def display_width(text: str) -> int:
    """Width in monospace cells: Chinese, Japanese and Korean characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def _boxes(described, expand_image: bool, max_tokens: int | None):
    """Group the described tokens into boxes: (label, kind, first_index, count)."""
    boxes = []
    for index, text, is_image, has_loss in described:
        kind = "image" if is_image else ("loss" if has_loss else "text")
        if kind == "image" and not expand_image and boxes and boxes[-1][1] == "image-run" \
                and boxes[-1][2] + boxes[-1][3] == index:
            label, _, first, count = boxes[-1]
            boxes[-1] = (label, "image-run", first, count + 1)
            continue
        if kind == "image" and not expand_image:
            boxes.append(("", "image-run", index, 1))
        else:
            boxes.append((text, kind, index, 1))
    boxes = [(f"{count} image tokens" if kind == "image-run" else label, kind, first, count)
             for label, kind, first, count in boxes]
    hidden = 0
    if max_tokens is not None and len(boxes) > max_tokens:
        hidden = sum(count for *_, count in boxes[max_tokens:])
        first_hidden = boxes[max_tokens][2]
        boxes = boxes[:max_tokens] + [(f"… {hidden} more", "more", first_hidden, hidden)]
    return boxes


def plot_token_strip(
    tokenizer,
    input_ids,
    image_token_ids=None,
    image_mask=None,
    labels=None,
    max_tokens: int | None = 120,
    expand_image: bool = False,
    chars_per_row: int = 64,
    show_index: bool = True,
    title: str | None = None,
    ax=None,
):
    """Draw how a prompt is tokenized, as rows of boxes. Returns the Figure.

    ``image_token_ids`` / ``image_mask``: where the image placeholders are (see
    ``image_positions_mask``); ``labels``: the training labels, to show the loss mask;
    ``max_tokens``: boxes drawn before the rest is summarised; ``expand_image``: one box per
    placeholder token instead of one for the whole run.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    described = describe_tokens(tokenizer, input_ids, image_token_ids, image_mask, labels)
    boxes = _boxes(described, expand_image, max_tokens)

    # Lay the boxes out in character units, wrapping rows at chars_per_row.
    pad, gap, row_height = 0.8, 0.35, 2.2 if show_index else 1.6
    placed, x, row = [], 0.0, 0
    for label, kind, first, count in boxes:
        shown = label if kind in ("image-run", "more") else label.replace(" ", "·")
        width = max(display_width(shown), 1) * 0.62 + pad
        if x > 0 and x + width > chars_per_row:
            x, row = 0.0, row + 1
        placed.append((x, row, width, shown, kind, first, count))
        x += width + gap
    n_rows = row + 1
    total_width = max(chars_per_row, max(p[0] + p[2] for p in placed) if placed else 1)

    if ax is None:
        fig, ax = plt.subplots(figsize=(min(0.16 * total_width + 0.6, 14), 0.42 * row_height * n_rows + 0.9))
    else:
        fig = ax.figure
    styles = {
        "text": dict(facecolor=TEXT_FILL, edgecolor=TEXT_EDGE, linewidth=0.8),
        "image": dict(facecolor=IMAGE_FILL, edgecolor=IMAGE_EDGE, linewidth=0.8),
        "image-run": dict(facecolor=IMAGE_FILL, edgecolor=IMAGE_EDGE, linewidth=1.0),
        "loss": dict(facecolor=LOSS_FILL, edgecolor=LOSS_EDGE, linewidth=2.0),
        "more": dict(facecolor="white", edgecolor=TEXT_EDGE, linewidth=0.8, linestyle=":"),
    }
    family = font_family("DejaVu Sans Mono")
    for x, row, width, shown, kind, first, count in placed:
        y = -row * row_height
        ax.add_patch(FancyBboxPatch((x, y), width, 1.0, boxstyle="round,pad=0,rounding_size=0.2",
                                    gid=f"token-{kind}-{first}-{count}", **styles[kind]))
        ax.text(x + width / 2, y + 0.5, shown, ha="center", va="center", fontsize=9,
                family=family, fontweight="bold" if kind == "loss" else "normal",
                style="italic" if kind in ("image-run", "more") else "normal")
        if show_index and kind != "more":
            where = str(first) if count == 1 else f"{first}–{first + count - 1}"
            ax.text(x + width / 2, y - 0.3, where, ha="center", va="center", fontsize=6, color="#777777")
    ax.set_xlim(-0.3, total_width + 0.3)
    ax.set_ylim(-(n_rows - 1) * row_height - (0.8 if show_index else 0.3), 1.3)
    ax.set_aspect("auto")
    ax.axis("off")

    # A legend only for the kinds that appear.
    from matplotlib.patches import Patch
    kinds = {kind for *_, kind, _, _ in placed}
    legend = [Patch(**styles["text"], label="text")]
    if kinds & {"image", "image-run"}:
        legend.append(Patch(**styles["image"], label="image placeholder"))
    if "loss" in kinds:
        legend.append(Patch(**styles["loss"], label="carries a loss (label ≠ -100)"))
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(legend),
              frameon=False, fontsize=8)
    n_tokens = len(described)
    ax.set_title(title or f"{n_tokens} tokens", fontsize=11, loc="left")
    fig.tight_layout()
    return fig
