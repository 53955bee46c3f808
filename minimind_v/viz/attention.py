"""Where does the model look? Attention from each answer token to the picture's patches.

``answer_with_attention`` answers one question greedily, one token at a time with the key/value
cache, and at every step keeps the attention weights of the query that chose the token: layer by
layer and head by head, over every key so far (prompt, image placeholders, earlier answer
tokens). The image part of those rows, with the CLS token dropped, is a g x g map over the
encoder's patch grid, which ``plot_attention_overlay`` lays over the picture the encoder saw.

"Attention from a token" here means the attention of the position that *predicted* it: the
first answer token is chosen by the last prompt position ("assistant\\n"), token i by the
position holding token i-1. That is the attention paid while the model decided on the word.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers.cache_utils import DynamicCache

from ..inference import DEFAULT_MAX_NEW_TOKENS, as_images, prompt_ids, suppressed_ids
from ..model.vlm import placeholder_mask
from .tokens import escape, font_family, token_text


@dataclass
class AttentionTrace:
    """One greedy answer and the attention behind each of its tokens.

    attention:        (n_generated, n_layers, n_heads, S) float32, each row sums to 1; S is the
                      prompt length plus n_generated - 1, and keys a step could not see yet
                      (later answer tokens) hold 0, exactly what causal attention gives them.
    image_attention:  (n_generated, n_layers, N) head-averaged attention on the N image tokens
                      (token 0 is CLS, 1.. the patch grid, row by row).
    image_share:      (n_generated, n_layers) total head-averaged attention on the image tokens.
    """

    question: str
    prompt_ids: list[int]
    token_ids: list[int]  # the generated answer tokens (the final </s> is not kept)
    tokens: list[str]  # each answer token's text
    answer: str  # the decoded answer, as ``inference.answer`` returns it
    image_positions: torch.Tensor  # (N,) where the image tokens sit in the prompt
    attention: torch.Tensor
    image_attention: torch.Tensor
    image_share: torch.Tensor
    grid: int  # patches per side: N = 1 + grid * grid
    image_size: int  # the encoder's input side in pixels

    @property
    def n_layers(self) -> int:
        return self.attention.shape[1]

    def __repr__(self) -> str:
        n, L, H, S = self.attention.shape
        return (f"AttentionTrace(answer={self.answer!r}, {n} tokens, {L} layers x {H} heads, "
                f"{S} keys, {len(self.image_positions)} image tokens on a {self.grid}x{self.grid} grid)")


def token_label(text: str) -> str:
    """A token as a short title: control characters made visible, outer spaces dropped."""
    shown = escape(text)
    return shown.strip() or shown.replace(" ", "·")


def _grid_side(num_image_tokens: int) -> int:
    g = math.isqrt(num_image_tokens - 1)
    if g * g + 1 != num_image_tokens:
        raise ValueError(f"{num_image_tokens} image tokens are not 1 CLS + a square patch grid")
    return g


@torch.no_grad()
def answer_with_attention(
    bundle,
    image,
    question: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    image_tokens: torch.Tensor | None = None,
    streamer=None,
) -> AttentionTrace:
    """Answer ``question`` about ``image`` (a path or PIL image) greedily and trace the attention.

    Runs the eager attention path (``output_attentions=True``) with the KV cache, so every step
    costs one token's forward pass. ``image_tokens`` (1, N, width) may replace ``image``.
    ``streamer`` (a transformers streamer) receives the prompt, then each new token, as in
    ``generate``.
    """
    model, tok = bundle.model, bundle.tokenizer
    cfg = model.config
    device = model.device
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    if image_tokens is None:
        if image is None:
            raise ValueError("pass an image (path or PIL image) or image_tokens")
        pixels = bundle.encoder.preprocess(as_images([image])).to(device)
        image_tokens = bundle.encoder(pixels)  # (1, 3, S, S) -> (1, N, width)
    image_tokens = image_tokens.to(device)
    if image_tokens.dim() != 3 or image_tokens.shape[0] != 1:
        raise ValueError(f"image_tokens must be (1, N, width) for one image, got {tuple(image_tokens.shape)}")

    ids = torch.tensor([prompt_ids(tok, question, cfg.num_image_tokens)], device=device)  # (1, T)
    pattern = torch.tensor(cfg.image_token_ids, device=device)
    image_positions = placeholder_mask(ids, pattern)[0].nonzero().squeeze(1).cpu()  # (N,)
    T = ids.shape[1]
    if streamer is not None:
        streamer.put(ids.cpu())

    cache = DynamicCache(config=cfg)
    step_input = dict(input_ids=ids, image_tokens=image_tokens)  # the picture enters once
    rows, generated = [], []
    for _ in range(max_new_tokens):
        out = model(**step_input, cache=cache, use_cache=True, output_attentions=True, logits_to_keep=1)
        # Each layer: (1, H, t, S) -> the last query's row (H, S); stacked: (L, H, S)
        rows.append(torch.stack([a[0, :, -1, :] for a in out.attentions]).float().cpu())
        logits = out.logits[0, -1]
        logits[suppressed_ids(tok)] = float("-inf")  # as answer() does
        next_id = int(logits.argmax())
        if next_id == tok.eos_token_id:
            rows.pop()  # the attention that chose </s> belongs to no answer token
            break
        generated.append(next_id)
        if streamer is not None:
            streamer.put(torch.tensor([next_id]))
        step_input = dict(input_ids=torch.tensor([[next_id]], device=device))
    if streamer is not None:
        streamer.end()

    # Pad every row to the longest key length with zeros (keys not yet written).
    S = T + max(len(rows) - 1, 0)
    L, H = cfg.n_layers, cfg.n_heads
    attention = torch.zeros(len(rows), L, H, S)
    for i, row in enumerate(rows):  # once per answer token, after generation
        attention[i, :, :, : row.shape[-1]] = row
    image_attention = attention[..., image_positions].mean(2)  # (n, L, H, N) -> (n, L, N)
    image_share = image_attention.sum(-1)  # (n, L)
    return AttentionTrace(
        question=question,
        prompt_ids=ids[0].tolist(),
        token_ids=generated,
        tokens=[token_text(tok, i) for i in generated],
        answer=tok.decode(generated, skip_special_tokens=True).strip(),
        image_positions=image_positions,
        attention=attention,
        image_attention=image_attention,
        image_share=image_share,
        grid=_grid_side(cfg.num_image_tokens),
        image_size=int(getattr(bundle.encoder, "image_size", 224)),
    )


# ----------------------------------------------------------------------------- maps


def _select_layers(trace: AttentionTrace, layer) -> tuple[torch.Tensor, str]:
    """image_attention restricted to one layer or averaged over all: (n, N), and a label."""
    if layer == "mean":
        return trace.image_attention.mean(1), "mean over layers"
    if isinstance(layer, int) and -trace.n_layers <= layer < trace.n_layers:
        return trace.image_attention[:, layer], f"layer {layer % trace.n_layers}"
    raise ValueError(f"layer must be 'mean' or an int in [-{trace.n_layers}, {trace.n_layers}), got {layer!r}")


def _select_tokens(trace: AttentionTrace, tokens) -> list[int]:
    n = len(trace.token_ids)
    if isinstance(tokens, str) and tokens == "all":
        return list(range(n))
    picked = list(tokens)
    bad = [t for t in picked if not isinstance(t, int) or not -n <= t < n]
    if bad:
        raise ValueError(f"tokens must be 'all' or answer-token indices in [-{n}, {n}), got {bad}")
    return [t % n for t in picked]


def patch_grid(trace: AttentionTrace, token: int | Sequence[int] | str = "all", layer="mean") -> np.ndarray:
    """The attention on the patch grid as a (g, g) array, patch (r, c) at [r, c].

    ``token``: one answer-token index, a list of them (averaged) or "all" (the whole answer).
    CLS (image token 0) has no place on the grid and is left out.
    """
    per_token, _ = _select_layers(trace, layer)  # (n, N)
    picked = _select_tokens(trace, [token] if isinstance(token, int) else token)
    if not picked:
        raise ValueError("the answer has no tokens to draw")
    patches = per_token[picked].mean(0)[1:]  # drop CLS: (N,) -> (g*g,)
    return patches.reshape(trace.grid, trace.grid).numpy()  # row-major, as the encoder flattens


def encoder_view(image, size: int) -> Image.Image:
    """What a CLIP-style encoder sees: shortest side resized to ``size``, then the centre square."""
    image = as_images([image])[0]
    w, h = image.size
    # The long side is truncated, not rounded, as CLIPImageProcessor does.
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def _draw_overlay(ax, view: Image.Image, grid: np.ndarray, title: str, alpha: float, cmap: str):
    size = view.width
    ax.imshow(view)
    # One cell per patch, stretched over the picture; nearest keeps patch edges honest.
    ax.imshow(grid, extent=(0, size, size, 0), cmap=cmap, alpha=alpha, interpolation="nearest",
              vmin=0, vmax=max(float(grid.max()), 1e-12))
    ax.set_title(title, fontsize=10, family=font_family())
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def plot_attention_overlay(trace: AttentionTrace, image, layer="mean", tokens="all", ax=None,
                           ncols: int = 6, alpha: float = 0.55, cmap: str = "inferno"):
    """Attention on the patch grid laid over the picture: one panel per answer token, then one
    for the whole answer. Each panel's colours run from 0 to its own maximum; titles give the
    token and the share of its attention that went to the image at all.

    With ``ax``, draws only the averaged panel (over ``tokens``) into it. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    picked = _select_tokens(trace, tokens)
    if not picked:
        raise ValueError("the answer has no tokens to draw")
    _, layer_label = _select_layers(trace, layer)
    share = trace.image_share.mean(1) if layer == "mean" else trace.image_share[:, layer]  # (n,)
    view = encoder_view(image, trace.image_size)

    if ax is not None:
        _draw_overlay(ax, view, patch_grid(trace, picked, layer),
                      f"{escape(trace.answer)}\n{share[picked].mean():.0%} of attention on the image", alpha, cmap)
        return ax.figure

    panels = [(patch_grid(trace, t, layer), f"{token_label(trace.tokens[t])}\n{share[t]:.0%} on image") for t in picked]
    if len(picked) > 1:
        panels.append((patch_grid(trace, picked, layer),
                       f"whole answer\n{share[picked].mean():.0%} on image"))
    cols = min(ncols, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows + 0.5), squeeze=False)
    for a, (grid, title) in zip(axes.flat, panels):
        _draw_overlay(a, view, grid, title, alpha, cmap)
    for a in axes.flat[len(panels):]:
        a.axis("off")
    fig.suptitle(f"Q: {escape(trace.question)}   A: {escape(trace.answer)}   ({layer_label})", fontsize=11,
                 family=font_family())
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
