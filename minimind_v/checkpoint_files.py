"""Reading a checkpoint file as data: a ``.pth`` through ``torch.load(weights_only=True)`` (never
running code pickled inside a downloaded file), a ``.safetensors`` file, or a folder holding one;
unwrapped from a training script's ``{"model": state_dict, ...}`` and cleaned of the prefixes
``torch.compile`` and DDP add and of buffers derived from the config. A file that is none of
these is an error saying what it is."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch


# Wrappers' prefixes: torch.compile adds "_orig_mod.", DistributedDataParallel "module.".
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


# Buffers computed from the config, not learned: rebuilt on load, so never part of the weights.
DERIVED_BUFFER = re.compile(r"^(pos_cis|freqs_cis|rope_cos|rope_sin|layers\.\d+\.attention\.mask)$")


# Where a checkpoint sits inside a training script's dict, e.g. {"model": state_dict, "step": ...}.
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")


# Files that may hold the weights inside a folder (a transformers folder, or our own).
FOLDER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


StateDict = dict[str, torch.Tensor]


def read_weights_file(path: Path) -> object:
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes): expected a PyTorch state dict (.pth) or a safetensors file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    try:
        # weights_only: a checkpoint is data; never run code pickled inside a downloaded file.
        with warnings.catch_warnings():  # torch's note on a raw pickle's protocol; refused below anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is long; its one informative line names what the unpickler refused.
        found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(err))
        # Its first sentence only: the rest advises allowlisting the global, which would run it.
        detail = found.group(1).split(". ")[0].strip().rstrip(".") if found else type(err).__name__
        raise ValueError(
            f"{path} is not a plain state dict (or no checkpoint at all): torch.load(weights_only=True) "
            f"refused it, so nothing in it was run ({detail}). Expected a state dict written by "
            "torch.save(model.state_dict(), path)."
        ) from err
    except MemoryError:
        raise  # a real file too big for this machine is not "damaged"
    except Exception as err:  # garbage makes the unpickler fail in any way (IndexError, KeyError, ...)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path} ({size} bytes) is not a PyTorch checkpoint, or is truncated or damaged: {detail}. "
            "Expected a state dict written by torch.save (a .pth file)."
        ) from err


def weights_file_in(folder: Path) -> Path:
    for name in FOLDER_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    pth = sorted(folder.glob("*.pth"))
    if len(pth) == 1:
        return pth[0]
    raise FileNotFoundError(
        f"{folder} holds no weights: expected one of {list(FOLDER_WEIGHT_FILES)} or a single *.pth file"
        + (f" (found several: {[p.name for p in pth]}; name one with its path)" if pth else "")
    )


def as_state_dict(obj: object, where: str) -> StateDict:
    """The {name: tensor} dict inside ``obj``, unwrapping {"model": state_dict, ...} once."""
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return as_state_dict(obj[key], f"{where}[{key!r}]")
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{where} is not a state dict: expected a non-empty dict of name -> tensor, "
                         f"got {type(obj).__name__}{' (empty)' if isinstance(obj, Mapping) else ''}")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"{where} is not a state dict: these entries are not tensors: {shown}")
    return dict(obj)


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Strip the ``_orig_mod.`` / ``module.`` prefixes and drop config-derived buffers."""
    cleaned: StateDict = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if DERIVED_BUFFER.match(name):
            continue
        if name in cleaned:
            raise ValueError(f"two entries become {name!r} once wrapper prefixes are stripped "
                             f"(one of them is {key!r})")
        cleaned[name] = value
    return cleaned


def load_v1_state_dict(path_or_dict) -> StateDict:
    """A v1 checkpoint as a clean {v1 name: tensor} dict.

    ``path_or_dict``: a ``.pth``/``.bin`` file (read with ``weights_only=True`` onto the CPU), a
    ``.safetensors`` file, a folder holding one of those, or an already loaded dict.
    """
    if isinstance(path_or_dict, Mapping):
        return clean_state_dict(as_state_dict(path_or_dict, "the given dict"))
    path = Path(path_or_dict)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        path = weights_file_in(path)
    return clean_state_dict(as_state_dict(read_weights_file(path), str(path)))
