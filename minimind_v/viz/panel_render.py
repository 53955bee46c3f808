"""What the Q&A panel shows, made displayable: the answer streamed as text, pictures and
figures as PNG bytes, each step's top tokens as an HTML table, uploads decoded."""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image
from transformers.generation.streamers import BaseStreamer

from ..data.images import ImageError, decode_picture
from ..data.shapes import describe_object, position_phrase
from .tokens import token_label
from .trace import Candidates


class CallbackStreamer(BaseStreamer):
    """A transformers streamer that hands the answer so far (decoded text) to ``on_text``.

    ``generate`` first puts the prompt (skipped here), then each new token. The whole answer is
    decoded again at each step, so a character split over two byte-level tokens appears whole.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("CallbackStreamer streams one answer at a time (batch size 1)")
        self.ids.extend(value.reshape(-1).tolist())
        self.on_text(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def end(self):
        pass


def image_from_bytes(data: bytes, name: str) -> Image.Image:
    """Decode an uploaded file to an RGB image, or raise ImageError naming the file."""
    if not data:
        raise ImageError(f"{name}: the file is empty")
    return decode_picture(bytes(data), name)


def png_bytes(image: Image.Image, max_side: int | None = None) -> bytes:
    if max_side is not None and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def figure_png(fig, dpi: int = 100) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)  # drawn into the widget; keep pyplot from holding (or showing) it
    return buffer.getvalue()


def picture_labels(paths: Sequence[Path]) -> list[str]:
    """Short dropdown labels: file names, with the parent folder where names repeat."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def describe_scene(scene: Sequence[dict]) -> str:
    """'small red circle in the top left, large blue circle in the center'"""
    return ", ".join(f"{describe_object(o)} {position_phrase(o['position'])}" for o in scene)


def top_tokens_html(steps: Sequence[Candidates]) -> str:
    """A small table: one row per answer step, the chosen token first, then what else the model
    considered, each with its probability."""
    if not steps:
        return ""
    k = max(len(s.ids) for s in steps)
    head = "".join(f"<th style='padding:0 8px'>#{i + 1}</th>" for i in range(k))
    rows = []
    for n, step in enumerate(steps, 1):
        cells = []
        for i, (token, p) in enumerate(zip(step.tokens, step.probs)):
            shown = html.escape(token_label(token))
            style = "font-weight:bold" if step.ids[i] == step.chosen_id else "color:#555"
            cells.append(f"<td style='padding:0 8px;{style}'><code>{shown}</code> {p:.2f}</td>")
        step_label = f"{n}" + (" (end)" if step.end else "")
        rows.append(f"<tr><td style='padding:0 8px;color:#777'>{step_label}</td>{''.join(cells)}</tr>")
    return ("<table class='mmv-top-table' style='border-collapse:collapse;font-size:12px'>"
            f"<tr><th style='padding:0 8px'>step</th>{head}</tr>{''.join(rows)}</table>")
