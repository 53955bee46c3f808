"""The whole model in one picture, drawn from its config: picture -> frozen CLIP -> 50 patch
tokens -> projection -> placeholders in the prompt -> MiniMind decoder blocks -> tied head."""

from __future__ import annotations

import matplotlib.patches as patches
from matplotlib.figure import Figure

FROZEN, TRAINED, DATA = "#dfe7f2", "#fbe3c8", "#eeeeee"


def _box(ax, x, y, w, h, text, colour, fontsize=8.5):
    ax.add_patch(patches.FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                        facecolor=colour, edgecolor="#555555", linewidth=0.8))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, start, end, text=""):
    ax.annotate("", end, start, arrowprops=dict(arrowstyle="-|>", color="#444444", lw=1))
    if text:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, text, ha="center", va="bottom",
                fontsize=7.5, color="#444444")


def plot_architecture(config, vision_layers: int | None = None, image_size: int = 224, patch_size: int = 32) -> Figure:
    """MiniMind-V's data flow with the sizes of ``config`` (a ``VLMConfig``): blue parts are frozen,
    orange ones train (the decoder as ``--freeze`` says). ``vision_layers``: the encoder's depth,
    when known."""
    n, width, dim = config.num_image_tokens, config.vision_width, config.dim
    grid = image_size // patch_size
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.set(xlim=(0, 11), ylim=(0, 4.2))
    ax.axis("off")

    # The picture's path (top row).
    _box(ax, 0.1, 2.9, 1.3, 0.9, f"picture\n{image_size}×{image_size} RGB", DATA)
    layers = f", {vision_layers} layers" if vision_layers else ""
    _box(ax, 2.0, 2.9, 2.1, 0.9, f"CLIP vision encoder\n(frozen{layers})\n{grid}×{grid} patches + CLS", FROZEN)
    _box(ax, 4.7, 2.9, 1.6, 0.9, f"{n} patch tokens\n({n}, {width})\nits last hidden state", DATA, fontsize=8)
    _box(ax, 6.9, 2.9, 1.7, 0.9, f"projection\n{config.projector}: {width} → {dim}", TRAINED)
    _arrow(ax, (1.4, 3.35), (2.0, 3.35))
    _arrow(ax, (4.1, 3.35), (4.7, 3.35))
    _arrow(ax, (6.3, 3.35), (6.9, 3.35))

    # The prompt's path (middle row): the placeholders' embeddings are overwritten.
    _box(ax, 0.1, 1.5, 3.0, 0.9, f"prompt ids: <s>user …\n{n} × <image placeholder> … question\n"
                                 f"→ token embeddings (T, {dim})", DATA, fontsize=8)
    _box(ax, 4.2, 1.5, 4.4, 0.9, f"substitution: the {n} placeholder rows ← the {n} projected vectors\n"
                                 "(one masked_scatter; words and patches now look alike)", DATA, fontsize=8)
    _arrow(ax, (3.1, 1.95), (4.2, 1.95))
    _arrow(ax, (7.75, 2.9), (7.75, 2.4))

    # The decoder (right column) and its output.
    heads = f"{config.n_heads} heads, {config.n_kv_heads} KV heads"
    block = (f"MiniMind decoder × {config.n_layers}\n\nRMSNorm → attention (RoPE,\n{heads}, causal)\n"
             f"RMSNorm → SwiGLU\n({dim} → {config.hidden_dim} → {dim})\n+ residuals")
    _box(ax, 9.0, 1.2, 1.9, 2.6, block, TRAINED, fontsize=7.5)
    _arrow(ax, (8.6, 1.95), (9.0, 1.95))
    _box(ax, 9.0, 0.1, 1.9, 0.8, f"RMSNorm → head\n(tied to the embeddings)\n{dim} → vocab {config.vocab_size}",
         TRAINED, fontsize=7.5)
    _arrow(ax, (9.95, 1.2), (9.95, 0.9))
    _box(ax, 4.2, 0.1, 4.4, 0.8, "the answer, one token at a time (the loss: on answer tokens only)", DATA, fontsize=8)
    _arrow(ax, (9.0, 0.5), (8.6, 0.5))

    legend = [patches.Patch(facecolor=FROZEN, edgecolor="#555555", label="frozen"),
              patches.Patch(facecolor=TRAINED, edgecolor="#555555", label="trained"),
              patches.Patch(facecolor=DATA, edgecolor="#555555", label="data")]
    ax.legend(handles=legend, loc="lower left", fontsize=8, frameon=False)
    ax.set_title("MiniMind-V: what the chapters build", fontsize=11)
    return fig
