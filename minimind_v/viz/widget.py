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
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image

from ..data.images import ImageError, load_image
from ..data.shapes import REFERENCE_IMAGE_SIZE, position_phrase, render_scene, validate_scene
from ..inference import DEFAULT_MAX_NEW_TOKENS, model_and_processor
from .attention import image_share, plot_attention_panel
from .panel_layout import MAX_OBJECTS, PanelLayout
from .panel_render import (CallbackStreamer, describe_scene, figure_png, image_from_bytes, picture_labels, png_bytes,
                           top_tokens_html)
from .tokens import token_label
from .trace import DEFAULT_TOP_K, Candidates, answer_with_attention

UPLOAD_PREFIX = "uploaded: "
COMPOSED_PREFIX = "composed: "
TEXT_ONLY_SUFFIX = ", without the picture (text only)"


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


class QAWidget(PanelLayout):
    """The question-and-answer panel: the layout (``PanelLayout``) with what its controls do.
    ``view`` is the widget tree; the instance displays itself.

    ``models``: one model (``inference.load_vlm``: the model and its processor) or {label: model},
    e.g. {"after pretraining": ..., "after SFT": ...}. ``text_only``: the label of the model also
    offered without the picture (default: the last one; None for none).
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
        for label, vlm in models.items():
            model_and_processor(vlm, f"qa_widget's model {label!r}")
        # label -> ((model, processor), whether the picture is given)
        self.models: dict[str, tuple[object, bool]] = {label: (vlm, True) for label, vlm in models.items()}
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
        self.sources: dict[str, Path | Image.Image] = dict(zip(picture_labels(paths), paths))
        self.current_image: Image.Image | None = None
        self.current_name: str | None = None
        self.last_answer: str | None = None
        self.last_trace = None
        self.last_top_tokens: list[list[tuple[str, float]]] = []
        self.last_image: Image.Image | None = None  # the picture the last answer was about
        self.messages: list[str] = []
        self._steps: list[Candidates] = []
        self._quiet = False  # set while the attention controls are rebuilt

        super().__init__(list(self.models), list(self.sources), preview_size, show_attention)
        self._wanted = {"layer": attention_layer, "head": attention_head}

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
    def chosen_model(self):
        """The chosen model: (model, processor)."""
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
        vlm, with_image = self.models[self.model_select.value]
        _, processor = vlm
        if with_image and self.current_image is None:
            self.say("Choose a picture first: a demo picture, an upload, or compose one.")
            return
        if not self._fits(vlm, question):
            return

        def show(text: str) -> None:
            self.answer_area.value = f"<b>Q:</b> {html.escape(question)}<br><b>A:</b> {html.escape(text)}"

        def step(candidates: Candidates) -> None:
            self._steps.append(candidates)
            self.top_view.value = top_tokens_html(self._steps)

        self.ask_button.disabled = True
        image = self.current_image if with_image else None
        try:
            trace = answer_with_attention(vlm, image, question, max_new_tokens=self.max_new_tokens,
                                          streamer=CallbackStreamer(processor.tokenizer, show),
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

    def _fits(self, vlm, question: str) -> bool:
        """Whether the question can be asked: no special-token text, and short enough that the
        prompt and a whole answer fit in the model's positions. Says why not."""
        model, processor = vlm
        cfg = model.config
        try:
            n = len(processor.question_ids(question))
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
    """The Q&A panel for one model or {label: model}, each as ``inference.load_vlm`` returns it
    (see :class:`QAWidget` for the options). Display the result."""
    return QAWidget(models, eval_images, **options)
