"""Reading an attention trace over the picture, and drawing it.

The image part of an ``AttentionTrace``'s rows, with the CLS token dropped, is a g x g map over
the encoder's patch grid (``patch_grid``; ``image_share``: how much of a token's attention went
to the picture at all). ``plot_attention_overlay`` and ``plot_attention_panel`` lay it over the
picture the encoder saw (``encoder_view``: the picture through the image processor's own resize
and crop); ``plot_image_share`` draws the share per answer token and layer.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ..model.chat_inputs import as_rgb
from .tokens import escape, font_family, token_label
from .trace import AttentionTrace

# ----------------------------------------------------------------------------- maps


def _check_index(value, count: int, what: str):
    if value == "mean" or (isinstance(value, int) and not isinstance(value, bool) and -count <= value < count):
        return value
    raise ValueError(f"{what} must be 'mean' or an int in [-{count}, {count}), got {value!r}")


def _select_layers(trace: AttentionTrace, layer, head="mean") -> tuple[torch.Tensor, str]:
    """Image attention for one layer or the mean over layers, one head or the mean over heads:
    (n, N), and a label such as "layer 2, head 1"."""
    layer = _check_index(layer, trace.n_layers, "layer")
    head = _check_index(head, trace.n_heads, "head")
    if head == "mean":
        per_layer = trace.image_attention  # (n, L, N), already averaged over heads
    else:
        per_layer = trace.attention[:, :, head][..., trace.image_positions]  # (n, L, N)
    if layer == "mean":
        chosen, layer_label = per_layer.mean(1), "mean over layers"
    else:
        chosen, layer_label = per_layer[:, layer], f"layer {layer % trace.n_layers}"
    head_label = "mean over heads" if head == "mean" else f"head {head % trace.n_heads}"
    return chosen, f"{layer_label}, {head_label}"


def image_share(trace: AttentionTrace, layer="mean", head="mean") -> torch.Tensor:
    """(n,) the share of each answer token's attention that went to the image tokens (CLS
    included), in one layer / head or averaged over them."""
    per_token, _ = _select_layers(trace, layer, head)
    return per_token.sum(-1)


def _select_tokens(trace: AttentionTrace, tokens) -> list[int]:
    n = len(trace.token_ids)
    if isinstance(tokens, str) and tokens == "all":
        return list(range(n))
    picked = list(tokens)
    bad = [t for t in picked if not isinstance(t, int) or not -n <= t < n]
    if bad:
        raise ValueError(f"tokens must be 'all' or answer-token indices in [-{n}, {n}), got {bad}")
    return [t % n for t in picked]


def patch_grid(trace: AttentionTrace, token: int | Sequence[int] | str = "all", layer="mean",
               head="mean") -> np.ndarray:
    """The attention on the patch grid as a (g, g) array, patch (r, c) at [r, c].

    ``token``: one answer-token index, a list of them (averaged) or "all" (the whole answer).
    ``layer`` / ``head``: an index, or "mean" to average. CLS (image token 0) has no place on the
    grid and is left out.
    """
    per_token, _ = _select_layers(trace, layer, head)  # (n, N)
    picked = _select_tokens(trace, [token] if isinstance(token, int) else token)
    if not picked:
        raise ValueError("the answer has no tokens to draw")
    patches = per_token[picked].mean(0)[1:]  # drop CLS: (N,) -> (g*g,)
    return patches.reshape(trace.grid, trace.grid).numpy()  # row-major, as the encoder flattens


def encoder_view(image, size: int | None = None, processor=None) -> Image.Image:
    """What the vision encoder sees: the picture through the image processor's own steps that move
    pixels (CLIP's: shortest side resized to S, then the centre S x S), without its rescaling and
    normalisation, as an S x S RGB image.

    ``processor``: a ``MiniMindVProcessor`` (its image processor and its preprocessing mode: in
    "resize" mode the whole picture is resized to S x S, as the encoder's ``Preprocessor`` does)
    or an image processor; None: CLIP's image processor at side ``size``.
    """
    image = as_rgb(image)
    image_processor = getattr(processor, "image_processor", processor)
    mode = getattr(processor, "preprocessing", "center_crop")
    if image_processor is None:
        if size is None:
            raise ValueError("give the encoder's input side (size) or its processor")
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    side = image_processor.crop_size["height"]
    if size is not None and size != side:
        raise ValueError(f"size={size}, but the image processor crops to {side} x {side}")
    steps = {}
    if mode == "resize":  # v1's whole-picture resize (bicubic), then no resize or crop of the processor's
        image, steps = image.resize((side, side), Image.Resampling.BICUBIC), dict(do_resize=False, do_center_crop=False)
    pixels = image_processor(images=[image], do_rescale=False, do_normalize=False, return_tensors="np",
                             **steps)["pixel_values"][0]  # (3, S, S) uint8: PIL's resize, an integer crop
    if pixels.dtype != np.uint8:  # an image processor that resizes in floats
        pixels = np.clip(np.rint(pixels), 0, 255)
    return Image.fromarray(np.moveaxis(pixels, 0, -1).astype(np.uint8))


def _draw_overlay(ax, view: Image.Image, grid: np.ndarray, title: str, alpha: float, cmap: str):
    size = view.width
    ax.imshow(view)
    # One cell per patch, stretched over the picture; nearest keeps patch edges honest.
    heat = ax.imshow(grid, extent=(0, size, size, 0), cmap=cmap, alpha=alpha, interpolation="nearest",
                     vmin=0, vmax=max(float(grid.max()), 1e-12))
    ax.set_title(title, fontsize=10, family=font_family())
    _bare(ax)
    return heat


def _bare(ax):
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def plot_attention_overlay(trace: AttentionTrace, image, layer="mean", tokens="all", ax=None,
                           ncols: int = 6, alpha: float = 0.55, cmap: str = "inferno", head="mean"):
    """Attention on the patch grid laid over the picture: one panel per answer token, then one
    for the whole answer. Each panel's colours run from 0 to its own maximum; titles give the
    token and the share of its attention that went to the image at all.

    With ``ax``, draws only the averaged panel (over ``tokens``) into it. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    picked = _select_tokens(trace, tokens)
    if not picked:
        raise ValueError("the answer has no tokens to draw")
    _, label = _select_layers(trace, layer, head)
    share = image_share(trace, layer, head)  # (n,)
    view = encoder_view(image, trace.image_size, trace.processor)

    if ax is not None:
        _draw_overlay(ax, view, patch_grid(trace, picked, layer, head),
                      f"{escape(trace.answer)}\n{share[picked].mean():.0%} of attention on the image", alpha, cmap)
        return ax.figure

    panels = [(patch_grid(trace, t, layer, head), f"{token_label(trace.tokens[t])}\n{share[t]:.0%} on image")
              for t in picked]
    if len(picked) > 1:
        panels.append((patch_grid(trace, picked, layer, head),
                       f"whole answer\n{share[picked].mean():.0%} on image"))
    cols = min(ncols, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows + 0.5), squeeze=False)
    for a, (grid, title) in zip(axes.flat, panels):
        _draw_overlay(a, view, grid, title, alpha, cmap)
    for a in axes.flat[len(panels):]:
        a.axis("off")
    fig.suptitle(f"Q: {escape(trace.question)}   A: {escape(trace.answer)}   ({label})", fontsize=11,
                 family=font_family())
    fig.tight_layout()
    return fig


def plot_attention_panel(trace: AttentionTrace, image, layer="mean", head="mean", token="all",
                         alpha: float = 0.6, cmap: str = "inferno"):
    """The picture the encoder saw, and beside it the attention of one answer token (or the
    whole answer's mean) on its patches, with a colour bar in attention weight and, in the
    title, the share of that attention that went to the image at all. Returns the Figure."""
    import matplotlib.pyplot as plt

    if not trace.with_image:
        raise ValueError("this answer was given without a picture: there is no attention on a picture to draw")
    picked = _select_tokens(trace, [token] if isinstance(token, int) else token)
    if not picked:
        raise ValueError("the answer has no tokens to draw")
    _, label = _select_layers(trace, layer, head)
    share = float(image_share(trace, layer, head)[picked].mean())
    what = "the whole answer" if len(picked) > 1 or token == "all" else f"“{token_label(trace.tokens[picked[0]])}”"
    view = encoder_view(image, trace.image_size, trace.processor)
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.6, 3.7), gridspec_kw={"width_ratios": [1, 1.2]})
    left.imshow(view)
    left.set_title("the picture (as the encoder sees it)", fontsize=9, family=font_family())
    _bare(left)
    heat = _draw_overlay(right, view, patch_grid(trace, picked, layer, head),
                         f"attention of {what}\n{label}: {share:.0%} on the image", alpha, cmap)
    bar = fig.colorbar(heat, ax=right, fraction=0.046, pad=0.04, label="attention weight on the patch")
    bar.solids.set_alpha(1)  # the scale itself, not faded like the overlay
    fig.tight_layout()
    return fig


def plot_patch_maps(pictures: Sequence[Image.Image], maps, row_titles: Sequence[str], map_titles: Sequence[str],
                    alpha: float = 0.55, cmap: str = "inferno"):
    """Attention maps kept without a trace (a record's): one row per picture, the picture first,
    then each of its maps laid over it, each map on its own scale. ``maps`` is (rows, k, g, g),
    row-major over the patch grid as ``patch_grid`` gives it; ``map_titles`` names the k maps
    (the layers, say). Returns the Figure."""
    import matplotlib.pyplot as plt

    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 4 or maps.shape[0] != len(pictures) or maps.shape[2] != maps.shape[3]:
        raise ValueError(f"maps must be (pictures, k, g, g) for {len(pictures)} pictures, got {maps.shape}")
    if len(row_titles) != len(pictures) or len(map_titles) != maps.shape[1]:
        raise ValueError(f"give one title per picture ({len(pictures)}) and per map ({maps.shape[1]}), "
                         f"got {len(row_titles)} and {len(map_titles)}")
    cols = 1 + maps.shape[1]
    fig, axes = plt.subplots(len(pictures), cols, figsize=(2.2 * cols, 2.6 * len(pictures) + 0.3), squeeze=False)
    for row, (picture, title) in enumerate(zip(pictures, row_titles)):
        view = as_rgb(picture)
        axes[row, 0].imshow(view)
        axes[row, 0].set_title(title, fontsize=9, family=font_family(), loc="left")
        _bare(axes[row, 0])
        for k, map_title in enumerate(map_titles):
            _draw_overlay(axes[row, 1 + k], view, maps[row, k], map_title, alpha, cmap)
    fig.tight_layout()
    return fig


def plot_image_share(trace: AttentionTrace, kind: str = "heatmap", ax=None):
    """For each answer token, the share of its attention that goes to the image tokens.

    ``kind="heatmap"``: layers x tokens. ``kind="lines"``: one line per layer, with the share a
    uniform spread over the context would give (N / keys seen) as a dashed reference.
    """
    import matplotlib.pyplot as plt

    if kind not in ("heatmap", "lines"):
        raise ValueError(f"kind must be 'heatmap' or 'lines', got {kind!r}")
    n, L = trace.image_share.shape
    if n == 0:
        raise ValueError("the answer has no tokens to draw")
    share = trace.image_share.numpy()
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * n + 2.0), max(2.8, 0.3 * L + 1.6) if kind == "heatmap" else 3.5))
    else:
        fig = ax.figure
    x = np.arange(n)
    if kind == "heatmap":
        im = ax.imshow(share.T, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
        ax.set_yticks(np.arange(L))
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="attention on image tokens")
    else:
        for l in range(L):
            ax.plot(x, share[:, l], marker="o", ms=3, lw=1.2, label=f"layer {l}",
                    color=plt.cm.viridis(l / max(L - 1, 1)))
        keys_seen = len(trace.prompt_ids) + x  # the step for token i sees the prompt + i tokens
        ax.plot(x, len(trace.image_positions) / keys_seen, "k--", lw=1, label="uniform attention")
        ax.set_ylim(0, 1)
        ax.set_ylabel("attention on image tokens")
        ax.legend(fontsize=8, frameon=False, ncol=2 if L > 6 else 1)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    ax.set_xticks(x)
    ax.set_xticklabels([token_label(t) for t in trace.tokens], rotation=45, ha="right", family=font_family())
    ax.set_xlabel("answer token")
    ax.set_title(f"How much each answer token looks at the image\nQ: {escape(trace.question)}", fontsize=11,
                 family=font_family())
    fig.tight_layout()
    return fig
