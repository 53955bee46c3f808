"""Ask the model about a picture, in the notebook: an ipywidgets panel worth playing with.

- **model**: each model given (e.g. after pretraining, after SFT), and one of them once more
  without the picture (the text-only baseline: the question alone);
- **picture**: a demo picture, an upload of your own, or one composed from up to three objects
  of the shapes world (shape, colour, size, grid cell), drawn by the world's own renderer, so
  the case you doubt ("two red circles and a blue one") can be asked about exactly;
- **ask**: the answer streams in token by token, with the five most likely next tokens and
  their probabilities at each step (what else the model considered);
- **attention**: where the answer looked, for one layer and head or their mean, over the whole
  answer or one of its tokens; the picture beside the overlay, a colour bar, and the share of
  the attention that went to the picture at all.

Every bad input (no picture, a file that is not an image, an empty or overlong question, an
impossible picture) gets a short message in the panel, never a traceback.

Everything the panel shows lives in widget values (``answer_area.value``, ``top_view.value``,
``share_view.value``, ``attention_view.value``, ``message.value``) and plain attributes
(``last_answer``, ``last_top_tokens``, ``last_trace``, ``messages``), so it can be driven and
checked without a browser::

    panel = qa_widget({"after pretraining": pre, "after SFT": sft}, demo_paths)
    panel                                   # displays it in a notebook
    panel.compose([dict(shape="circle", colour="red", size="small", position="top left"),
                   dict(shape="circle", colour="blue", size="large", position="center")])
    panel.question.value = "How many circles are there?"
    panel.ask_button.click()
    panel.last_answer, panel.last_top_tokens[0]
"""

from __future__ import annotations

import functools
import html
import io
from pathlib import Path
from typing import Callable, Mapping, Sequence

import ipywidgets as widgets
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from ..data.images import ImageError, decode_picture, load_image
from ..data.shapes import (
    COLOURS,
    POSITIONS,
    REFERENCE_IMAGE_SIZE,
    SHAPES,
    SIZES,
    ShapesWorldConfig,
    describe_object,
    position_phrase,
    render_scene,
    validate_scene,
)
from ..inference import DEFAULT_MAX_NEW_TOKENS
from .attention import DEFAULT_TOP_K, Candidates, answer_with_attention, image_share, plot_attention_panel, token_label

UPLOAD_PREFIX = "uploaded: "
COMPOSED_PREFIX = "composed: "
TEXT_ONLY_SUFFIX = ", without the picture (text only)"
# The shapes world puts 1 to 3 objects in a picture; a composed picture stays inside what the
# model was trained on.
MAX_OBJECTS = ShapesWorldConfig().max_objects
# Where the composition rows start: distinct cells, so ticking a second object is valid at once.
DEFAULT_OBJECTS = (
    dict(shape="circle", colour="red", size="large", position="top left"),
    dict(shape="square", colour="blue", size="small", position="center"),
    dict(shape="triangle", colour="green", size="large", position="bottom right"),
)


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


def _labels_for(paths: Sequence[Path]) -> list[str]:
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


def _reported(callback):
    """Run a widget callback so that any failure becomes a message in the panel, not a traceback
    in the notebook's log."""

    @functools.wraps(callback)
    def run(self, *args, **kwargs):
        try:
            return callback(self, *args, **kwargs)
        except Exception as err:  # the panel reports, it does not crash the notebook
            self.say(f"Something went wrong: {type(err).__name__}: {err}")
            return None

    return run


class QAWidget:
    """The question-and-answer panel. ``view`` is the widget tree; the instance displays itself.

    ``models``: one bundle (``inference.load_vlm``) or {label: bundle}, e.g. {"after
    pretraining": ..., "after SFT": ...}. ``text_only``: the label of the model also offered
    without the picture (default: the last one; None for none).
    """

    def __init__(
        self,
        models,
        eval_images: Sequence[str | Path] = (),
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        show_attention: bool = True,
        attention_layer="mean",
        attention_head="mean",
        preview_size: int = 224,
        top_k: int = DEFAULT_TOP_K,
        text_only: str | None | bool = True,
    ):
        if not isinstance(models, Mapping):
            models = {"model": models}
        if not models:
            raise ValueError("qa_widget needs at least one model")
        # label -> (bundle, whether the picture is given)
        self.models: dict[str, tuple[object, bool]] = {label: (b, True) for label, b in models.items()}
        if text_only is True:
            text_only = list(models)[-1]
        if text_only:
            if text_only not in models:
                raise ValueError(f"text_only={text_only!r} is none of the models {list(models)}")
            self.models[text_only + TEXT_ONLY_SUFFIX] = (models[text_only], False)
        self.max_new_tokens = max_new_tokens
        self.top_k = top_k
        self.preview_size = preview_size
        paths = [Path(p) for p in eval_images]
        # label -> a path (demo pictures, loaded when chosen) or a PIL image (uploads)
        self.sources: dict[str, Path | Image.Image] = dict(zip(_labels_for(paths), paths))
        self.current_image: Image.Image | None = None
        self.current_name: str | None = None
        self.last_answer: str | None = None
        self.last_trace = None
        self.last_top_tokens: list[list[tuple[str, float]]] = []
        self.last_image: Image.Image | None = None  # the picture the last answer was about
        self.messages: list[str] = []
        self._steps: list[Candidates] = []
        self._quiet = False  # set while the attention controls are rebuilt

        # --- the model
        self.model_select = widgets.Dropdown(options=list(self.models), description="model",
                                             layout=widgets.Layout(width="420px"))
        self.model_select.add_class("mmv-model")
        # --- the picture: three ways to choose one
        self.image_select = widgets.Dropdown(options=list(self.sources), description="picture", value=None)
        self.image_select.add_class("mmv-demo")
        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="your picture")
        self.upload.add_class("mmv-upload")
        self.object_rows = [self._object_row(i, DEFAULT_OBJECTS[i % len(DEFAULT_OBJECTS)], on=i == 0)
                            for i in range(MAX_OBJECTS)]
        self.draw_button = widgets.Button(description="Draw it", icon="paint-brush")
        self.draw_button.add_class("mmv-draw")
        compose_box = widgets.VBox([
            widgets.HTML(f"Up to {MAX_OBJECTS} objects, one per cell of the 3×3 grid, drawn by the shapes world:"),
            *[row["box"] for row in self.object_rows], self.draw_button])
        self.source_tabs = widgets.Tab(
            children=[widgets.VBox([self.image_select]), widgets.VBox([self.upload]), compose_box])
        for i, title in enumerate(("demo pictures", "upload", "compose one")):
            self.source_tabs.set_title(i, title)
        self.picture_label = widgets.HTML("<i>no picture yet</i>")
        self.picture_label.add_class("mmv-picture-label")
        self.preview = widgets.Image(format="png", width=preview_size)
        self.preview.add_class("mmv-preview")
        # --- the question and the answer
        self.question = widgets.Text(placeholder="Ask about the picture, e.g. What colour is the circle?",
                                     description="question", layout=widgets.Layout(width="480px"))
        self.question.add_class("mmv-question")
        self.ask_button = widgets.Button(description="Ask", button_style="primary", icon="comment")
        self.ask_button.add_class("mmv-ask")
        self.answer_area = widgets.HTML()
        self.answer_area.add_class("mmv-answer")
        self.top_view = widgets.HTML()
        self.top_view.add_class("mmv-top")
        # --- the attention
        self.show_attention = widgets.Checkbox(value=show_attention, description="show attention", indent=False)
        self.show_attention.add_class("mmv-show-attention")
        self.layer_select = widgets.Dropdown(options=[("mean over layers", "mean")], description="layer")
        self.layer_select.add_class("mmv-layer")
        self.head_select = widgets.Dropdown(options=[("mean over heads", "mean")], description="head")
        self.head_select.add_class("mmv-head")
        self.token_select = widgets.Dropdown(options=[("whole answer", "all")], description="token")
        self.token_select.add_class("mmv-token")
        self._wanted = {"layer": attention_layer, "head": attention_head}
        self.share_view = widgets.HTML()
        self.share_view.add_class("mmv-share")
        self.attention_view = widgets.Image(format="png")
        self.attention_view.add_class("mmv-attention")
        self.attention_box = widgets.VBox([
            widgets.HBox([self.layer_select, self.head_select, self.token_select]),
            self.share_view, self.attention_view], layout=widgets.Layout(display="none"))
        self.message = widgets.HTML()
        self.message.add_class("mmv-message")

        self.view = widgets.VBox([
            self.model_select,
            widgets.HBox([self.source_tabs, widgets.VBox([self.picture_label, self.preview])],
                         layout=widgets.Layout(align_items="flex-start")),
            widgets.HBox([self.question, self.ask_button, self.show_attention]),
            self.message,
            widgets.HBox([self.answer_area]),
            self.top_view,
            self.attention_box,
        ])
        self.view.add_class("mmv-panel")

        self.model_select.observe(self.on_model, names="value")
        self.image_select.observe(self.on_select, names="value")
        self.upload.observe(self.on_upload, names="value")
        self.draw_button.on_click(self.on_draw)
        self.ask_button.on_click(self.on_ask)
        self.show_attention.observe(self.on_attention_choice, names="value")
        for control in (self.layer_select, self.head_select, self.token_select):
            control.observe(self.on_attention_choice, names="value")
        if self.sources:
            self.image_select.value = next(iter(self.sources))  # fires on_select

    # ----------------------------------------------------------------- display

    def _repr_mimebundle_(self, **kwargs):
        return self.view._repr_mimebundle_(**kwargs)

    def _object_row(self, index: int, start: dict, on: bool) -> dict:
        row = {
            "use": widgets.Checkbox(value=on, description=f"object {index + 1}", indent=False,
                                    layout=widgets.Layout(width="90px")),
            "shape": widgets.Dropdown(options=SHAPES, value=start["shape"], layout=widgets.Layout(width="95px")),
            "colour": widgets.Dropdown(options=COLOURS, value=start["colour"], layout=widgets.Layout(width="85px")),
            "size": widgets.Dropdown(options=SIZES, value=start["size"], layout=widgets.Layout(width="75px")),
            "position": widgets.Dropdown(options=POSITIONS, value=start["position"],
                                         layout=widgets.Layout(width="120px")),
        }
        for name, control in row.items():
            control.add_class(f"mmv-{name}")
        row["box"] = widgets.HBox([row[k] for k in ("use", "shape", "colour", "size", "position")])
        row["box"].add_class(f"mmv-object-{index + 1}")
        return row

    # ----------------------------------------------------------------- messages

    def say(self, text: str) -> None:
        """Show a short message in the panel (and keep it in ``messages``)."""
        self.messages.append(text)
        self.message.value = f"<span style='color:#b45309'>{html.escape(text)}</span>"

    def _clear_message(self) -> None:
        self.message.value = ""

    def _clear_answer(self) -> None:
        self._clear_message()
        self.answer_area.value = ""
        self.top_view.value = ""
        self.share_view.value = ""
        self.attention_view.value = b""
        self.attention_box.layout.display = "none"
        self.last_answer, self.last_trace, self.last_top_tokens, self.last_image = None, None, [], None
        self._steps = []

    def _show_image(self, image: Image.Image | None, name: str | None) -> None:
        self.current_image, self.current_name = image, name
        self.preview.value = png_bytes(image, self.preview_size) if image is not None else b""
        self.picture_label.value = (f"<b>picture:</b> {html.escape(name)}" if name is not None
                                    else "<i>no picture yet</i>")

    @property
    def bundle(self):
        """The bundle of the chosen model."""
        return self.models[self.model_select.value][0]

    @property
    def with_image(self) -> bool:
        """Whether the chosen model is given the picture."""
        return self.models[self.model_select.value][1]

    # ----------------------------------------------------------------- choosing a picture

    @_reported
    def on_model(self, change=None) -> None:
        """A model choice: clear the old answer; say so when the picture will not be used."""
        self._clear_answer()
        if not self.with_image:
            self.say("This model is not shown the picture: it answers from the question alone.")

    @_reported
    def on_select(self, change=None) -> None:
        """A dropdown choice: load that picture into the preview."""
        label = self.image_select.value
        if label is None:
            return  # cleared, e.g. by a composed picture
        self._clear_message()
        source = self.sources[label]
        try:
            image = source if isinstance(source, Image.Image) else load_image(source)
        except ImageError as err:
            self._show_image(None, None)
            self.say(f"This picture cannot be used: {err}")
            return
        self._show_image(image, label)

    @_reported
    def on_upload(self, change=None) -> None:
        """A file from the upload button: use it if it is an image, else explain why not."""
        files = self.upload.value
        if not files:
            return  # the reset below, or nothing chosen
        item = files[-1]
        self.load_upload(item["name"], bytes(item["content"]))
        self.upload.value = ()  # so the same file can be uploaded again

    def load_upload(self, name: str, data: bytes) -> bool:
        """Add an uploaded file as the current picture. Returns whether it was an image."""
        self._clear_message()
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

    def chosen_objects(self) -> list[dict]:
        """The objects ticked in the composition rows."""
        return [{k: row[k].value for k in ("shape", "colour", "size", "position")}
                for row in self.object_rows if row["use"].value]

    @_reported
    def on_draw(self, button=None) -> None:
        """The Draw button: compose the ticked objects."""
        self.compose(self.chosen_objects())

    def compose(self, objects: Sequence[Mapping]) -> bool:
        """Draw a picture of ``objects`` (dicts with shape, colour, size and position, as in the
        shapes world) with the world's renderer and make it the current picture. An impossible
        picture (none, more than MAX_OBJECTS, two in one cell, an unknown word) gets a message
        and leaves the current picture as it was. Returns whether it was drawn."""
        self._clear_message()
        objects = [dict(o) for o in objects]
        if not objects:
            self.say("Tick at least one object to draw.")
            return False
        if len(objects) > MAX_OBJECTS:
            self.say(f"A picture of the shapes world holds at most {MAX_OBJECTS} objects; "
                     f"you asked for {len(objects)}.")
            return False
        cells: dict[str, int] = {}
        for number, obj in enumerate(objects, 1):
            where = obj.get("position")
            if where in cells:
                self.say(f"Objects {cells[where]} and {number} are both {position_phrase(where)}: "
                         "each object needs a cell of its own.")
                return False
            cells[where] = number
        try:
            validate_scene(objects, "your picture")
        except ValueError as err:
            self.say(f"That picture cannot be drawn: {err}")
            return False
        image = render_scene(objects, REFERENCE_IMAGE_SIZE)
        # Not in the dropdown, so that choosing a demo picture again fires on_select.
        self.image_select.value = None
        self._show_image(image, COMPOSED_PREFIX + describe_scene(objects))
        return True

    # ----------------------------------------------------------------- asking

    @_reported
    def on_ask(self, button=None) -> None:
        """The Ask button: check the input, stream the answer and the top tokens, draw the attention."""
        self._clear_answer()
        question = self.question.value.strip()
        if not question:
            self.say("Type a question about the picture first.")
            return
        bundle, with_image = self.models[self.model_select.value]
        if with_image and self.current_image is None:
            self.say("Choose a picture first: a demo picture, an upload, or compose one.")
            return
        if not self._fits(bundle, question):
            return

        def show(text: str) -> None:
            self.answer_area.value = f"<b>Q:</b> {html.escape(question)}<br><b>A:</b> {html.escape(text)}"

        def step(candidates: Candidates) -> None:
            self._steps.append(candidates)
            self.top_view.value = top_tokens_html(self._steps)

        self.ask_button.disabled = True
        image = self.current_image if with_image else None
        try:
            trace = answer_with_attention(bundle, image, question, max_new_tokens=self.max_new_tokens,
                                          streamer=CallbackStreamer(bundle.tokenizer, show),
                                          top_k=self.top_k, on_step=step)
        except ValueError as err:  # a question the prompt cannot hold (special tokens, too long)
            self.say(f"That question cannot be asked: {err}")
            return
        finally:
            self.ask_button.disabled = False
        self.last_trace, self.last_answer, self.last_image = trace, trace.answer, image
        self.last_top_tokens = [list(zip(c.tokens, c.probs)) for c in trace.candidates]
        show(trace.answer)
        self.top_view.value = top_tokens_html(trace.candidates)
        if not trace.answer:
            self.say("The model answered with nothing (it ended its answer at once).")
        self._rebuild_attention_controls(trace)
        self.draw_attention()

    def _fits(self, bundle, question: str) -> bool:
        """Whether the question can be asked: no special-token text, and short enough that the
        prompt and a whole answer fit in the model's positions. Says why not."""
        cfg = bundle.model.config
        try:
            n = len(bundle.processor.question_ids(question))
        except ValueError as err:
            self.say(f"That question cannot be asked: {err}")
            return False
        limit = cfg.max_position_embeddings - self.max_new_tokens
        if n > limit:
            self.say(f"That question is too long: with the picture its prompt is {n} tokens, and this model "
                     f"reads at most {limit} before its answer (of up to {self.max_new_tokens} tokens). "
                     "Please ask something shorter.")
            return False
        return True

    # ----------------------------------------------------------------- attention

    def _rebuild_attention_controls(self, trace) -> None:
        """Options for this answer's layers, heads and tokens; keep the reader's choices."""
        self._quiet = True
        try:
            for name, control, count in (("layer", self.layer_select, trace.n_layers),
                                         ("head", self.head_select, trace.n_heads)):
                wanted = self._wanted[name]
                if isinstance(wanted, int) and -count <= wanted < count:
                    wanted %= count  # -1: the last layer
                control.options = [(f"mean over {name}s", "mean")] + [(f"{name} {i}", i) for i in range(count)]
                control.value = wanted if wanted in [v for _, v in control.options] else "mean"
            self.token_select.options = [("whole answer", "all")] + [
                (f"{i + 1}: {token_label(t)}", i) for i, t in enumerate(trace.tokens)]
            self.token_select.value = "all"
        finally:
            self._quiet = False

    @_reported
    def on_attention_choice(self, change=None) -> None:
        """A new layer, head or token (or the checkbox): redraw from the last answer, no new question."""
        if self._quiet:
            return
        if change is not None and change.get("owner") in (self.layer_select, self.head_select):
            self._wanted["layer"], self._wanted["head"] = self.layer_select.value, self.head_select.value
        self.draw_attention()

    def draw_attention(self) -> None:
        """Draw the last answer's attention with the chosen layer, head and token."""
        trace = self.last_trace
        if not self.show_attention.value or trace is None:
            self.attention_box.layout.display = "none"
            return
        if not trace.with_image or not trace.token_ids:
            self.share_view.value = ("<i>This answer was given without the picture: there is no attention on it "
                                     "to draw.</i>" if not trace.with_image else
                                     "<i>The answer has no tokens, so no attention to draw.</i>")
            self.attention_view.layout.display = "none"  # an empty image would show as a broken one
            self.attention_box.layout.display = ""
            return
        layer, head, token = self.layer_select.value, self.head_select.value, self.token_select.value
        picked = list(range(len(trace.token_ids))) if token == "all" else [token]
        share = float(image_share(trace, layer, head)[picked].mean())
        where = ("mean over layers" if layer == "mean" else f"layer {layer}") + ", " + \
                ("mean over heads" if head == "mean" else f"head {head}")
        what = "the whole answer" if token == "all" else f"token {token + 1}"
        picture = figure_png(plot_attention_panel(trace, self.last_image, layer=layer, head=head, token=token))
        # The old picture stays until the new one is ready: no blank in between.
        self.attention_view.value = picture
        self.share_view.value = (f"<b>{share:.0%}</b> of the attention of {html.escape(what)} went to the picture "
                                 f"({where})")
        self.attention_view.layout.display = ""
        self.attention_box.layout.display = ""


def qa_widget(models, eval_images: Sequence[str | Path] = (), **options) -> QAWidget:
    """The Q&A panel for one bundle or {label: bundle} (see :class:`QAWidget` for the options).
    Display the result."""
    return QAWidget(models, eval_images, **options)
