"""Where does the model look? Attention from each answer token to the picture's patches.

``answer_with_attention`` answers one question greedily with transformers' ``generate``
(``output_attentions=True, return_dict_in_generate=True``: the eager attention path, the key/value
cache as usual) and keeps, from every step, the attention weights of the query that chose the
token: layer by layer and head by head, over every key so far (prompt, image placeholders,
earlier answer tokens). The image part of those rows, with the CLS token dropped, is a g x g map
over the encoder's patch grid, which ``plot_attention_overlay`` lays over the picture the encoder
saw (``encoder_view``: the picture through the image processor's own resize and crop).

"Attention from a token" here means the attention of the position that *predicted* it: the
first answer token is chosen by the last prompt position ("assistant\\n"), token i by the
position holding token i-1. That is the attention paid while the model decided on the word.

Each step also keeps what else the model considered: the ``top_k`` most likely next tokens and
their probabilities (``AttentionTrace.candidates``), the distribution greedy decoding chose
from (``generate``'s scores, after its logits processors). A logits processor placed after
``generate``'s own reports each step as it is decided (``on_step``), and a streamer receives the
answer token by token, so a panel can show both while the answer is still being written. With
``image=None`` the question is asked as the text-only baseline asks it (the placeholders keep
their own embeddings, as in ``inference.answer(bundle, None, ...)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ..inference import DEFAULT_MAX_NEW_TOKENS, suppressed_ids
from ..model.processing import as_rgb
from ..model.vlm import placeholder_mask
from .tokens import escape, font_family, token_text

DEFAULT_TOP_K = 5


@dataclass
class Candidates:
    """One answer step: the token chosen and the ``top_k`` most likely tokens, best first.

    ``probs`` is the softmax of the step's logits once the tokens an answer may never contain
    (``inference.suppressed_ids``) are removed: what greedy decoding chose from, so
    ``ids[0] == chosen_id`` (up to ties). ``end`` marks the step that chose the end token: that
    token is not part of the answer.
    """

    chosen_id: int
    chosen: str  # the chosen token's text
    ids: list[int]
    tokens: list[str]
    probs: list[float]
    end: bool = False


@dataclass
class AttentionTrace:
    """One greedy answer and the attention behind each of its tokens.

    attention:        (n_generated, n_layers, n_heads, S) float32, each row sums to 1; S is the
                      prompt length plus n_generated - 1, and keys a step could not see yet
                      (later answer tokens) hold 0, exactly what causal attention gives them.
    image_attention:  (n_generated, n_layers, N) head-averaged attention on the N image tokens
                      (token 0 is CLS, 1.. the patch grid, row by row).
    image_share:      (n_generated, n_layers) total head-averaged attention on the image tokens.
    candidates:       one ``Candidates`` per step: each answer token's, then, if the answer
                      ended before ``max_new_tokens``, the step that chose to end it.
    with_image:       False for the text-only baseline: the "image" positions then hold the
                      placeholders' own embeddings, no picture.
    processor:        the ``MiniMindVProcessor`` that made the prompt and the pixels (None for a
                      trace built by hand): ``encoder_view`` shows the picture through it.
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
    candidates: list[Candidates] = field(default_factory=list)
    with_image: bool = True
    processor: object = field(default=None, repr=False, compare=False)  # made the prompt and the pixels

    @property
    def n_layers(self) -> int:
        return self.attention.shape[1]

    @property
    def n_heads(self) -> int:
        return self.attention.shape[2]

    def __repr__(self) -> str:
        n, L, H, S = self.attention.shape
        picture = "" if self.with_image else ", text only (no picture)"
        return (f"AttentionTrace(answer={self.answer!r}, {n} tokens, {L} layers x {H} heads, "
                f"{S} keys, {len(self.image_positions)} image tokens on a {self.grid}x{self.grid} grid{picture})")


def token_label(text: str) -> str:
    """A token as a short title: control characters made visible, outer spaces dropped."""
    shown = escape(text)
    return shown.strip() or shown.replace(" ", "·")


def _grid_side(num_image_tokens: int) -> int:
    g = math.isqrt(num_image_tokens - 1)
    if g * g + 1 != num_image_tokens:
        raise ValueError(f"{num_image_tokens} image tokens are not 1 CLS + a square patch grid")
    return g


def top_candidates(tokenizer, logits: torch.Tensor, top_k: int = DEFAULT_TOP_K, end: bool = False) -> Candidates:
    """The ``top_k`` most likely tokens of one step's (already suppressed) logits (V,)."""
    probs = torch.softmax(logits.float(), dim=-1)
    values, ids = probs.topk(min(top_k, probs.numel()))
    ids = ids.tolist()
    return Candidates(chosen_id=ids[0], chosen=token_text(tokenizer, ids[0]), ids=ids,
                      tokens=[token_text(tokenizer, i) for i in ids], probs=values.tolist(), end=end)


class _StepReporter(LogitsProcessor):
    """The last of ``generate``'s logits processors: it sees each step's scores as greedy
    decoding will read them (the suppressed tokens already at -inf), keeps that step's
    ``Candidates`` and hands them to ``on_step`` before the token is streamed. It changes no score."""

    def __init__(self, tokenizer, top_k: int, on_step: Callable[[Candidates], None] | None):
        self.tokenizer, self.top_k, self.on_step = tokenizer, top_k, on_step
        self.steps: list[Candidates] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.steps and self.steps[-1].end:
            return scores  # a deferred stop check (generate on "mps") runs one step past the end, then undoes it
        logits = scores[0]  # (V,) float32, one answer at a time
        next_id = int(logits.argmax())  # generate's own choice: argmax of these very scores
        step = top_candidates(self.tokenizer, logits, self.top_k, end=next_id == self.tokenizer.eos_token_id)
        step.chosen_id, step.chosen = next_id, token_text(self.tokenizer, next_id)  # argmax decides ties
        self.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)
        return scores


class _AnswerStreamer(BaseStreamer):
    """Passes the prompt, then each answer token, to the caller's streamer; the end token that
    closes the answer is not part of it and is not passed on."""

    def __init__(self, streamer, eos_token_id: int | None):
        self.streamer, self.eos_token_id = streamer, eos_token_id
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen and value.numel() == 1 and int(value.reshape(-1)[0]) == self.eos_token_id:
            return
        self._prompt_seen = True
        self.streamer.put(value)

    def end(self):
        self.streamer.end()


@torch.no_grad()
def answer_with_attention(
    bundle,
    image,
    question: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    image_tokens: torch.Tensor | None = None,
    streamer=None,
    top_k: int = DEFAULT_TOP_K,
    on_step: Callable[[Candidates], None] | None = None,
) -> AttentionTrace:
    """Answer ``question`` about ``image`` (a path or PIL image) greedily and trace the attention.

    One call of ``generate(output_attentions=True, return_dict_in_generate=True)``: the eager
    attention path with the KV cache, each step one token's forward pass. The prompt is the
    processor's (``bundle.processor.question_ids``), the pixels too (``bundle.processor(images=...)``).
    ``image_tokens`` (1, N, width) may replace ``image``; with neither, the model answers without
    a picture (the text-only baseline). ``streamer`` (a transformers streamer) receives the
    prompt, then each answer token, as in ``generate``; ``on_step`` receives each step's
    ``Candidates`` as soon as it is chosen. The answer stops at the end token, after
    ``max_new_tokens``, or where the model's positions run out.
    """
    model, processor = bundle.model, bundle.processor
    cfg = model.config
    device = model.device
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if processor is None:
        raise ValueError("this bundle has no processor (no vision encoder was given): pass VLMBundle(model, "
                         "tokenizer, encoder) or one built by load_vlm")
    tok = processor.tokenizer
    if image_tokens is None and image is not None:
        pixels = processor(images=[image])["pixel_values"].to(device)  # (1, 3, S, S)
        image_tokens = bundle.encoder(pixels)  # (1, N, width)
    if image_tokens is not None:
        image_tokens = image_tokens.to(device)
        if image_tokens.dim() != 3 or image_tokens.shape[0] != 1:
            raise ValueError(f"image_tokens must be (1, N, width) for one image, got {tuple(image_tokens.shape)}")

    ids = torch.tensor([processor.question_ids(question)], device=device)  # (1, T)
    T = ids.shape[1]
    room = cfg.max_position_embeddings - T + 1  # the last answer token needs no position of its own
    if room < 1:
        raise ValueError(f"the question is too long: its prompt is {T} tokens ({cfg.num_image_tokens} of them "
                         f"for the picture) and the model reads at most {cfg.max_position_embeddings}")
    pattern = torch.tensor(cfg.image_token_ids, device=device)
    image_positions = placeholder_mask(ids, pattern)[0].nonzero().squeeze(1).cpu()  # (N,)

    reporter = _StepReporter(tok, top_k, on_step)
    relay = None if streamer is None else _AnswerStreamer(streamer, tok.eos_token_id)
    steps = min(max_new_tokens, room)
    if steps < 1:  # nothing to generate (generate refuses max_new_tokens=0)
        attentions, generated = (), []
        if relay is not None:
            relay.put(ids.cpu())
            relay.end()
    else:
        # GenerationMixin.generate itself: the model's own generate keeps one position back for the
        # last token (room - 1 new tokens at most), where this trace has always gone to the last position.
        out = GenerationMixin.generate(
            model, ids, attention_mask=torch.ones_like(ids), image_tokens=image_tokens,
            max_new_tokens=steps, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or 0,
            suppress_tokens=suppressed_ids(tok) or None, logits_processor=LogitsProcessorList([reporter]),
            streamer=relay, output_attentions=True, return_dict_in_generate=True,
        )
        attentions = out.attentions  # one tuple per step: each layer's (1, H, t, S)
        generated = out.sequences[0, T:].tolist()
    candidates = reporter.steps
    if candidates and candidates[-1].end:
        generated = generated[:-1]  # the end token is not part of the answer ...
        attentions = attentions[:-1]  # ... and the attention that chose it belongs to no answer token

    # Each step: the last query's row (H, S) of each layer, stacked (L, H, S); padded to the
    # longest key length with zeros (keys not yet written).
    S = T + max(len(attentions) - 1, 0)
    L, H = cfg.n_layers, cfg.n_heads
    attention = torch.zeros(len(attentions), L, H, S)
    for i, layers in enumerate(attentions):
        row = torch.stack([a[0, :, -1, :] for a in layers]).float().cpu()
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
        candidates=candidates,
        with_image=image_tokens is not None,
        processor=processor,
    )


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
