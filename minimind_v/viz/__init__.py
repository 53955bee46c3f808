"""Pictures of the model at work: attention on the image, token strips, an interactive Q&A panel.

The Q&A panel needs ipywidgets (installed with the ``dev`` extras); it is imported on first use.
"""

from .architecture import plot_architecture
from .attention import (
    encoder_view,
    image_share,
    patch_grid,
    plot_attention_overlay,
    plot_attention_panel,
    plot_image_share,
    plot_patch_maps,
)
from .tokens import describe_tokens, plot_token_strip
from .trace import AttentionTrace, Candidates, answer_with_attention

__all__ = [
    "AttentionTrace",
    "Candidates",
    "QAWidget",
    "answer_with_attention",
    "describe_tokens",
    "encoder_view",
    "image_share",
    "patch_grid",
    "plot_architecture",
    "plot_attention_overlay",
    "plot_attention_panel",
    "plot_image_share",
    "plot_patch_maps",
    "plot_token_strip",
    "qa_widget",
]


def __getattr__(name):
    if name in ("QAWidget", "qa_widget"):
        from . import widget

        return getattr(widget, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
