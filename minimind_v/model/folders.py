"""Finding a model and checking it before anything in it is loaded.

A name is a local folder or a Hugging Face hub id. A hub id is read from the local cache first,
and downloaded only after one quick check that the hub answers. A local folder must say, in its
config.json, that it is the kind of model asked for, hold its weights as safetensors (a pickle
could run code when loaded), and be marked complete if training ever wrote a checkpoint there.
"""

from __future__ import annotations

import json
import os
import contextlib
import socket
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlparse

from transformers.utils import logging as hf_logging

from ..runfiles import COMPLETE, is_complete


# The weights files this package reads from a local folder: safetensors only. A pickled
# pytorch_model.bin can run code when it is unpickled, so a folder holding only one is refused.
SAFE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class HubUnreachableError(OSError):
    """A hub id that is neither a local folder nor in the Hugging Face cache, while the hub cannot be reached."""


_T = TypeVar("_T")


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set (in the environment now, or as huggingface_hub read it at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached, or None when it may be. huggingface_hub retries a failed
    request for ~20 s before giving up; one TCP connection answers the question in milliseconds
    (or ``timeout`` seconds). Behind a proxy the direct connection says nothing, so it is skipped."""
    from huggingface_hub import constants

    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return None
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"{constants.ENDPOINT} cannot be reached ({err})"
    return None


def load_hub_id(name: str, load: Callable[..., _T], what: str) -> _T:
    """``load(local_files_only=...)`` for a hub id: from the Hugging Face cache when it is there,
    else from the hub, but only after checking the hub answers: no 20 s of retries to learn that
    a machine is offline. Raises :class:`HubUnreachableError` saying there is no such local folder."""
    try:
        return load(local_files_only=True)
    except (OSError, ValueError):  # not cached, or only partly (tokenizers say so with a ValueError)
        pass
    reason = hub_unreachable_reason()
    if reason is not None:
        raise HubUnreachableError(
            f"{what} {name!r}: there is no local folder of that name, it is not in the Hugging Face cache, "
            f"and the hub cannot be reached: {reason}"
        )
    return load(local_files_only=False)


def check_safe_weights(folder: str | os.PathLike, what: str = "model folder") -> Path:
    """The safetensors weights file of a local model folder; refuses a folder whose only weights
    are a pickle (pytorch_model.bin), which could run code when loaded."""
    folder = Path(folder)
    for name in SAFE_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    pickles = [name for name in PICKLE_WEIGHT_FILES if (folder / name).is_file()]
    if pickles:
        raise ValueError(
            f"{folder} holds {pickles[0]} and no model.safetensors: a .bin file is a pickle, which can run "
            f"code when it is loaded, so this {what} is refused. Convert it with a tool you trust "
            "(e.g. load it yourself and call save_pretrained, which writes model.safetensors)."
        )
    raise FileNotFoundError(f"{folder} holds no model.safetensors: this {what} has no weights")


def looks_like_local_path(source: str) -> bool:
    """A hub id is 'name' or 'owner/name'; anything else (absolute, ./, ~, deeper) is meant as a folder."""
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
    )


TRAINING_CHECKPOINT = "checkpoint.pt"  # the trainer's resume file (train/checkpoint.py)


# What a folder is, by the model_type in its config.json.
FOLDER_KINDS = {
    "minimind": "a MiniMind text LM folder",
    "minimind_v": "a MiniMind-V folder",
    "clip": "a CLIP folder (a vision encoder)",
    "clip_vision_model": "a CLIP folder (a vision encoder)",
}


class ModelFolderError(ValueError):
    """A folder that is not the model asked for: another kind of model, or a damaged config.json."""


class IncompleteModelWarning(UserWarning):
    """A model folder whose training started but never finished (checkpoint.pt, no complete.json)."""


def read_folder_config(folder: str | os.PathLike, what: str = "model folder") -> dict:
    """The parsed config.json of a local model folder, or an error saying what is missing or damaged."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"no {what} at {folder}: the folder does not exist")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is a file, not a {what}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        why = (f" (it holds {TRAINING_CHECKPOINT}: training started but never saved the model; resume it "
               "with --resume)" if (folder / TRAINING_CHECKPOINT).is_file() else "")
        raise FileNotFoundError(f"{folder} is not a saved {what} (no config.json){why}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelFolderError(f"{config_file} is not readable JSON ({err}): the folder's configuration is damaged") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{config_file} holds a JSON {type(config).__name__}, not the object of a model config")
    return config


def describe_model_type(model_type) -> str:
    if model_type in FOLDER_KINDS:
        return FOLDER_KINDS[model_type]
    return f"a folder of model_type {model_type!r}" if model_type else "a folder whose config.json names no model_type"


def check_model_folder(
    folder: str | os.PathLike,
    expected: Sequence[str],
    hints: Mapping[str, str] | None = None,
    require_complete: bool = False,
) -> dict:
    """Check a local folder before anything in it is loaded; return its config.json.

    The folder must name one of the ``expected`` model types (``hints[found]`` says what to do
    instead), hold its weights as safetensors (a pickle could run code), and, when it holds a
    training checkpoint, be marked complete: otherwise :class:`IncompleteModelWarning`, or an
    error with ``require_complete``.
    """
    folder = Path(folder)
    want = " or ".join(describe_model_type(t) for t in expected)
    config = read_folder_config(folder, want.removeprefix("a ").removeprefix("an "))
    model_type = config.get("model_type")
    if model_type not in expected:
        hint = (hints or {}).get(model_type)
        raise ModelFolderError(f"{folder} is {describe_model_type(model_type)}, not {want}" + (f": {hint}" if hint else ""))
    if (folder / TRAINING_CHECKPOINT).is_file() and not is_complete(folder):
        message = (f"{folder} holds {TRAINING_CHECKPOINT} but no {COMPLETE}: its training never finished "
                   "(interrupted, or still running), so its weights are an intermediate save")
        if require_complete:
            raise ModelFolderError(message + "; finish the training (--resume) first")
        warnings.warn(message, IncompleteModelWarning, stacklevel=3)
    check_safe_weights(folder)
    return config


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load reports and weight-loading bars for the duration (restored after).

    Loading a vision tower from a full CLIPModel folder prints a long table of unused text
    weights; we check for missing weights ourselves instead.
    """
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
