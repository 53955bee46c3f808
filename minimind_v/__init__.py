"""MiniMind-V, the book: a tiny LLaVA-style vision-language model, rebuilt part by part.

image -> CLIP patch tokens -> projection -> placeholder substitution -> MiniMind decoder -> answer
"""

__version__ = "0.1.0"
