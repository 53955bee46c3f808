"""MiniMind-V, the book: a tiny LLaVA-style vision-language model, rebuilt part by part.

image -> CLIP patch tokens -> projection -> placeholder substitution -> MiniMind decoder -> answer

Importing the package registers its model types with transformers (``AutoConfig``,
``AutoModelForCausalLM``, ``AutoModelForImageTextToText``, ``AutoProcessor``), so a saved folder
loads with ``AutoModelForImageTextToText.from_pretrained(folder)`` and
``AutoProcessor.from_pretrained(folder)``: no remote code, nothing from the hub.
"""

__version__ = "0.1.0"

from .model.processing import register_auto_classes  # noqa: E402  (registers on import)

register_auto_classes()
