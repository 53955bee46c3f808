"""In what precision the training steps multiply: bfloat16 where the hardware does it natively.

The weights, the optimizer and every sum that can overflow stay in float32; only the matrix
products run in bfloat16 (``torch.autocast``), which a recent CPU with AVX512-BF16 or AMX does
about four times as fast as float32 (2048² products on the 2-core machines this book is measured
on: ~165 GFLOP/s in float32, ~620 in bfloat16). A GPU with bfloat16 gets the same.

``MINIMIND_V_PRECISION`` chooses: ``auto`` (the default: bf16 where it is native, else fp32),
``bf16`` or ``fp32``. The choice is part of a stage's settings, so a run does not resume in the
other precision unnoticed, and the training log says which one ran.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

PRECISIONS = ("auto", "bf16", "fp32")
ENV = "MINIMIND_V_PRECISION"


def native_bf16(device: torch.device | str) -> bool:
    """Does this device multiply bfloat16 matrices in hardware?"""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        return bool(probe() or amx())
    return False


def chosen_precision(environ=None) -> str:
    """``MINIMIND_V_PRECISION`` (default "auto"), checked."""
    value = (os.environ if environ is None else environ).get(ENV, "") or "auto"
    if value not in PRECISIONS:
        raise ValueError(f"{ENV} must be one of {PRECISIONS}, got {value!r}")
    return value


def training_precision(device: torch.device | str, choice: str | None = None) -> str:
    """"bf16" or "fp32": what a training step on ``device`` runs in, for ``choice`` (default: the
    environment's)."""
    choice = chosen_precision() if choice is None else choice
    if choice not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {choice!r}")
    if choice == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return choice


def autocast(device: torch.device | str, precision: str):
    """The context a forward pass runs in: bfloat16 products for "bf16", nothing for "fp32"."""
    device = torch.device(device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
