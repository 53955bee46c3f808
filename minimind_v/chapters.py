"""The few settings the chapters share, so one switch serves every chapter:

- ``MINIMIND_V_QUICK=1``   tiny sizes (``python -m minimind_v.book --quick`` sets it for the kernels);
- ``MINIMIND_V_HOME``      the folder holding ``runs/`` and ``figures/`` (default: the project root,
                           whatever the working directory: a chapter opened from notebooks/ in
                           JupyterLab finds the same run folder as ``make book``);
- ``MINIMIND_V_RUN``       the run folder (default ``runs/quick`` in quick mode, else ``runs/default``);
- ``MINIMIND_V_FIGURES``   where chapters save their pictures (default ``figures/``);
                           relative values of these three are taken from the project root;
- ``MINIMIND_V_NPROC``     training processes per stage (default: one per GPU, else 1).

A chapter starts with ``open_chapter()`` and ends with ``close_chapter()`` (its minutes and the
machine's matmul speed); ``save_figure`` writes its pictures, ``read_metrics`` and ``plot_loss``
read and draw a stage's training curve.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Sequence

from .metrics import plot_loss, read_metrics  # noqa: F401  (the chapters import them from here)
from .recipe import default_run_folder, home, quick_mode

FIGURE_DPI = 110
CHAPTER_NAME = re.compile(r"^(?P<number>\d\d)_[\w-]+\.py$")


# ----------------------------------------------------------------------------- chapter settings


def use_quick_mode(quick: bool | None) -> bool:
    """Set quick mode for this process (None leaves the environment as it is); returns it.

    The recipe reads ``MINIMIND_V_QUICK``, so setting it here decides the sizes of every stage
    this chapter runs or launches (the training processes inherit the environment).
    """
    if quick is not None:
        os.environ["MINIMIND_V_QUICK"] = "1" if quick else "0"
    return quick_mode()


def run_folder() -> Path:
    """Where every stage leaves its result: ``MINIMIND_V_RUN``, else runs/quick or runs/default,
    in the project root (or ``MINIMIND_V_HOME``)."""
    return default_run_folder()


def figures_dir() -> Path:
    """Where chapters save their pictures: ``MINIMIND_V_FIGURES``, else figures/ in the project root
    (or ``MINIMIND_V_HOME``)."""
    return home() / (os.environ.get("MINIMIND_V_FIGURES") or "figures")


def save_figure(fig, name: str) -> Path:
    """Save a matplotlib figure under its stable name (e.g. "01_patch_grid.png") in figures_dir()."""
    if not isinstance(name, str) or not CHAPTER_NAME.match(Path(name).stem + ".py") or Path(name).suffix != ".png":
        raise ValueError(f"figure name must look like 'NN_what.png' (chapter number first), got {name!r}")
    path = figures_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=FIGURE_DPI, bbox_inches="tight")
    return path


_chapter_started = time.perf_counter()  # reset by open_chapter; read by close_chapter


def close_chapter() -> float:
    """Every chapter's last cell: how long the chapter took here, next to this machine's matmul
    speed, so a reader can scale the minutes to their own machine. Returns the minutes."""
    from .machine import describe_speed

    minutes = (time.perf_counter() - _chapter_started) / 60
    print(f"this chapter: {minutes:.1f} min on this machine ({describe_speed()})")
    return minutes


def open_chapter(quick: bool | None = None, nproc: int | None = None, needs: Sequence[str] = ()):
    """Every chapter's first cell: settle quick mode, the run folder and the processes per stage,
    and run the earlier stages this chapter ``needs`` if they are not done yet.

    Returns ``(recipe, run_folder, nproc)``.
    """
    from .recipe import default_recipe, run_recipe

    global _chapter_started
    _chapter_started = time.perf_counter()
    quick = use_quick_mode(quick)
    nproc = nproc or default_nproc()
    recipe, run = default_recipe(), run_folder()
    print(f"quick mode: {quick}; run folder: {run}; training processes per stage: {nproc}")
    if needs:  # the results of earlier chapters: reused when they match these settings
        run_recipe(run, recipe, stages=list(needs), nproc=nproc)
    return recipe, run, nproc


def default_nproc() -> int:
    """Training processes per stage: ``MINIMIND_V_NPROC``, else one per GPU, else 1.

    On a CPU every process gets cores // nproc threads (processes x threads <= cores), so on a
    small machine more processes only split the same cores and add the cost of syncing gradients.
    """
    chosen = os.environ.get("MINIMIND_V_NPROC")
    if chosen:
        if not chosen.isdigit() or int(chosen) < 1:
            raise ValueError(f"MINIMIND_V_NPROC must be a positive integer, got {chosen!r}")
        return int(chosen)
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
