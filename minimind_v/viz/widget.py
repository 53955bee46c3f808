"""Ask the model about a picture, in the notebook: an ipywidgets question-and-answer panel.

Pick one of the evaluation images or upload your own, type a question, press Ask: the answer
streams in token by token, and with "show attention" on, the attention of each answer token on
the image patches is drawn under it. Bad input (an empty question, a file that is not an image)
gets a short message in the panel, never a traceback.

Everything the panel shows lives in widget values (``answer_area.value``, ``message.value``,
``attention_view.value``) and in plain attributes (``last_answer``, ``last_trace``,
``messages``), so it can be driven and checked without a browser::

    panel = qa_widget(bundle, ["shapes/eval/0001.png", ...])
    panel                     # displays it in a notebook
    panel.question.value = "What colour is the circle?"
    panel.ask_button.click()
    panel.last_answer
"""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Callable, Sequence

import ipywidgets as widgets
from PIL import Image, UnidentifiedImageError
from transformers.generation.streamers import BaseStreamer

from ..data.images import ImageError, load_image, to_rgb
from ..inference import DEFAULT_MAX_NEW_TOKENS, answer
from .attention import answer_with_attention, plot_attention_overlay

UPLOAD_PREFIX = "uploaded: "


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
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now: a truncated file fails here, not later
            rgb = to_rgb(image)
            return rgb.copy() if rgb is image else rgb
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (first bytes: {bytes(data[:16])!r})") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"{name}: too large to decode safely ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"{name}: cannot decode the image, the file is truncated or corrupt ({err})") from None


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


def _labels_for(paths: Sequence[Path]) -> list[str]:
    """Short dropdown labels: file names, with the parent folder where names repeat."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


class QAWidget:
    """The question-and-answer panel. ``view`` is the widget tree; the instance displays itself."""

    def __init__(
        self,
        bundle,
        eval_images: Sequence[str | Path] = (),
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        show_attention: bool = False,
        attention_layer="mean",
        preview_size: int = 224,
    ):
        self.bundle = bundle
        self.max_new_tokens = max_new_tokens
        self.attention_layer = attention_layer
        self.preview_size = preview_size
        paths = [Path(p) for p in eval_images]
        # label -> a path (evaluation images, loaded when chosen) or a PIL image (uploads)
        self.sources: dict[str, Path | Image.Image] = dict(zip(_labels_for(paths), paths))
        self.current_image: Image.Image | None = None
        self.current_name: str | None = None
        self.last_answer: str | None = None
        self.last_trace = None
        self.messages: list[str] = []

        self.image_select = widgets.Dropdown(options=list(self.sources), description="image",
                                             value=None)
        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="your image")
        self.preview = widgets.Image(format="png", width=preview_size)
        self.question = widgets.Text(placeholder="Ask about the picture, e.g. What colour is the circle?",
                                     description="question", layout=widgets.Layout(width="420px"))
        self.ask_button = widgets.Button(description="Ask", button_style="primary", icon="comment")
        self.show_attention = widgets.Checkbox(value=show_attention, description="show attention",
                                               indent=False)
        self.answer_area = widgets.HTML()
        self.attention_view = widgets.Image(format="png", layout=widgets.Layout(display="none"))
        self.message = widgets.HTML()
        self.output = widgets.VBox([self.answer_area, self.attention_view, self.message])
        self.view = widgets.VBox([
            widgets.HBox([self.image_select, self.upload]),
            self.preview,
            widgets.HBox([self.question, self.ask_button, self.show_attention]),
            self.output,
        ])

        self.image_select.observe(self.on_select, names="value")
        self.upload.observe(self.on_upload, names="value")
        self.ask_button.on_click(self.on_ask)
        if self.sources:
            self.image_select.value = next(iter(self.sources))  # fires on_select

    # ----------------------------------------------------------------- display

    def _repr_mimebundle_(self, **kwargs):
        return self.view._repr_mimebundle_(**kwargs)

    # ----------------------------------------------------------------- messages

    def say(self, text: str) -> None:
        """Show a short message under the answer (and keep it in ``messages``)."""
        self.messages.append(text)
        self.message.value = f"<span style='color:#b45309'>{html.escape(text)}</span>"

    def _clear(self) -> None:
        self.message.value = ""
        self.answer_area.value = ""
        self.attention_view.value = b""
        self.attention_view.layout.display = "none"

    def _show_image(self, image: Image.Image | None, name: str | None) -> None:
        self.current_image, self.current_name = image, name
        self.preview.value = png_bytes(image, self.preview_size) if image is not None else b""

    # ----------------------------------------------------------------- callbacks

    def on_select(self, change=None) -> None:
        """A dropdown choice: load that image into the preview."""
        label = self.image_select.value
        if label is None:
            return
        self._clear()
        source = self.sources[label]
        try:
            image = source if isinstance(source, Image.Image) else load_image(source)
        except ImageError as err:
            self._show_image(None, None)
            self.say(f"This image cannot be used: {err}")
            return
        self._show_image(image, label)

    def on_upload(self, change=None) -> None:
        """A file from the upload button: use it if it is an image, else explain why not."""
        files = self.upload.value
        if not files:
            return  # the reset below, or nothing chosen
        item = files[-1]
        self.load_upload(item["name"], bytes(item["content"]))
        self.upload.value = ()  # so the same file can be uploaded again

    def load_upload(self, name: str, data: bytes) -> bool:
        """Add an uploaded file as the current image. Returns whether it was an image."""
        self._clear()
        try:
            image = image_from_bytes(data, name)
        except ImageError as err:
            self.say(f"That upload is not a picture I can read: {err}. Please upload a PNG or JPEG image.")
            return False
        label = UPLOAD_PREFIX + name
        self.sources[label] = image
        if label not in self.image_select.options:
            self.image_select.options = [*self.image_select.options, label]
        if self.image_select.value == label:
            self.on_select()  # same name uploaded again: the observer would not fire
        else:
            self.image_select.value = label
        return True

    def on_ask(self, button=None) -> None:
        """The Ask button: check the input, stream the answer, draw the attention if asked."""
        self._clear()
        question = self.question.value.strip()
        if not question:
            self.say("Type a question about the picture first.")
            return
        if self.current_image is None:
            self.say("Choose an image from the list or upload one first.")
            return

        def show(text: str) -> None:
            self.answer_area.value = f"<b>A:</b> {html.escape(text)}"

        streamer = CallbackStreamer(self.bundle.tokenizer, show)
        self.ask_button.disabled = True
        try:
            if self.show_attention.value:
                trace = answer_with_attention(self.bundle, self.current_image, question,
                                              max_new_tokens=self.max_new_tokens, streamer=streamer)
                self.last_trace, reply = trace, trace.answer
                if trace.token_ids:
                    fig = plot_attention_overlay(trace, self.current_image, layer=self.attention_layer)
                    self.attention_view.value = figure_png(fig)
                    self.attention_view.layout.display = ""
            else:
                self.last_trace = None
                reply = answer(self.bundle, [self.current_image], [question],
                               max_new_tokens=self.max_new_tokens, streamer=streamer)[0]
        except ValueError as err:  # a question the prompt cannot hold (special tokens, too long)
            self.say(f"That question cannot be asked: {err}")
            return
        except Exception as err:  # the panel reports, it does not crash the notebook
            self.say(f"Something went wrong while answering: {type(err).__name__}: {err}")
            return
        finally:
            self.ask_button.disabled = False
        self.last_answer = reply
        show(reply)
        if not reply:
            self.say("The model answered with nothing (it ended its answer at once).")


def qa_widget(bundle, eval_images: Sequence[str | Path] = (), **options) -> QAWidget:
    """The Q&A panel for ``bundle`` (see :class:`QAWidget` for the options). Display the result."""
    return QAWidget(bundle, eval_images, **options)
