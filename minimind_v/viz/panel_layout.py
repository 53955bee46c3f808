"""The Q&A panel's widgets and how they are arranged, without behaviour.

``PanelLayout`` builds the widget tree (``view``) and names each control; ``QAWidget``
(``minimind_v.viz.widget``) adds what the controls do. Every control carries an ``mmv-*`` CSS
class, so a browser test can find it.
"""

from __future__ import annotations

from typing import Sequence

import ipywidgets as widgets

from ..data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, ShapesWorldConfig

# The shapes world puts 1 to 3 objects in a picture; a composed picture stays inside what the
# model was trained on.
MAX_OBJECTS = ShapesWorldConfig().max_objects
# Where the composition rows start: distinct cells, so ticking a second object is valid at once.
DEFAULT_OBJECTS = (
    dict(shape="circle", colour="red", size="large", position="top left"),
    dict(shape="square", colour="blue", size="small", position="center"),
    dict(shape="triangle", colour="green", size="large", position="bottom right"),
)


class PanelLayout:
    """The panel's controls, top to bottom: the model; the picture (demo pictures, an upload, or
    one composed of up to ``MAX_OBJECTS`` objects) beside its preview; the question; a message
    line; the answer and its top tokens; the attention (layer, head, token, the figure)."""

    def __init__(self, model_labels: Sequence[str], picture_labels: Sequence[str], preview_size: int = 224,
                 show_attention: bool = True):
        # --- the model
        self.model_select = widgets.Dropdown(options=list(model_labels), description="model",
                                             layout=widgets.Layout(width="420px"))
        self.model_select.add_class("mmv-model")
        # --- the picture: three ways to choose one
        self.image_select = widgets.Dropdown(options=list(picture_labels), description="picture", value=None)
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
