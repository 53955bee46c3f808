"""Run the book headless.

    python -m minimind_v.book                       # every chapter, in order (make book)
    python -m minimind_v.book --quick               # tiny sizes: the whole book in minutes
    python -m minimind_v.book --chapters 00 03      # only these chapters (by number or name)

Each chapter is a jupytext percent-format script (``notebooks/NN_name.py``). The runner reads it
as a notebook, executes it cell by cell in a fresh Python kernel (this interpreter, so the same
virtual environment), with the project root as working directory, and writes the executed
notebook to ``--out`` (default ``build/notebooks``). A failing cell stops the book with the
chapter's name, the cell and its error.

The chapters' shared settings (quick mode, the run folder, figures) live in
``minimind_v.chapters``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from .chapters import CHAPTER_NAME
from .recipe import ROOT, quick_mode

NOTEBOOKS = ROOT / "notebooks"
DEFAULT_OUT = "build/notebooks"
DEFAULT_CELL_TIMEOUT_S = 3600  # a training cell of the full book runs for many minutes
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# ----------------------------------------------------------------------------- the runner


class ChapterError(RuntimeError):
    """A chapter could not be run; the message names the chapter, the cell and the error."""


def chapter_files(notebooks: str | os.PathLike = NOTEBOOKS) -> list[Path]:
    """The chapters, in order: every ``NN_name.py`` in the notebooks folder."""
    folder = Path(notebooks)
    if not folder.is_dir():
        raise FileNotFoundError(f"no notebooks folder at {folder}")
    files = sorted(p for p in folder.iterdir() if CHAPTER_NAME.match(p.name))
    if not files:
        raise FileNotFoundError(f"{folder} holds no chapters (files named like 00_name.py)")
    return files


def select_chapters(files: list[Path], wanted: list[str] | None) -> list[Path]:
    """The chapters named in ``wanted`` (numbers like "03", or file stems), kept in book order."""
    if not wanted:
        return list(files)
    chosen = []
    for item in wanted:
        key = item.removesuffix(".py")
        matches = [p for p in files if p.stem == key or CHAPTER_NAME.match(p.name)["number"] == key.zfill(2)]
        if not matches:
            names = ", ".join(p.stem for p in files)
            raise ValueError(f"--chapters: no chapter {item!r}; the chapters are {names}")
        chosen += [p for p in matches if p not in chosen]
    return sorted(chosen)


def _kernel_manager(kernels_dir: Path):
    """A kernel manager whose "python3" kernel is this interpreter, whatever Jupyter has registered.

    A registered kernelspec may start a bare ``python`` from PATH (another environment, without
    this package); a private kernelspec naming sys.executable avoids that.
    """
    import zmq
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    spec_dir = kernels_dir / "python3"
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (minimind_v)", "language": "python",
            # Lets the manager hand the kernel CurveZMQ keys: encrypted traffic on the local TCP ports.
            "metadata": {"supported_encryption": ["curve"]}}
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")
    encryption = "auto" if zmq.has("curve") else "disabled"
    return AsyncKernelManager(kernel_name="python3", transport_encryption=encryption,
                              kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels_dir)]))


def _failing_cell(nb) -> tuple[int, dict] | None:
    """(index, cell) of the first code cell with an error output."""
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            return index, cell
    return None


def _failure_message(chapter: Path, nb, err: Exception, written: Path, tail_lines: int = 30) -> str:
    found = _failing_cell(nb)
    if found is None:  # not a cell error: a kernel that died, a timeout, ...
        return f"chapter {chapter.stem} failed: {type(err).__name__}: {err}\n  partial notebook: {written}"
    index, cell = found
    error = next(o for o in cell.outputs if o.get("output_type") == "error")
    code_number = sum(c.cell_type == "code" for c in nb.cells[: index + 1])
    source = cell.source.strip().splitlines()
    shown = "\n".join("    " + line for line in source[:6]) + ("\n    ..." if len(source) > 6 else "")
    traceback = _ANSI.sub("", "\n".join(error.get("traceback", []))).splitlines()
    tail = "\n".join(traceback[-tail_lines:])
    return (f"chapter {chapter.stem} failed in code cell {code_number} (cell {index} of the notebook): "
            f"{error.get('ename')}: {error.get('evalue')}\n  the cell:\n{shown}\n"
            f"  partial notebook: {written}\n--- traceback (last {min(tail_lines, len(traceback))} lines) ---\n{tail}")


def execute_chapter(chapter: Path, out_dir: Path, cwd: Path, timeout: int = DEFAULT_CELL_TIMEOUT_S,
                    env: dict | None = None) -> Path:
    """Execute one chapter in a fresh kernel and write the executed notebook to out_dir.

    Raises ChapterError (after writing the partial notebook) if a cell fails or times out.
    """
    import jupytext
    import nbformat
    from jupyter_core.utils import run_sync
    from nbclient import NotebookClient

    nb = jupytext.read(chapter)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = out_dir / f"{chapter.stem}.ipynb"
    kernel_env = dict(os.environ if env is None else env)
    # The kernel chooses its own inline backend; a parent's Agg would hide every figure.
    kernel_env.pop("MPLBACKEND", None)
    with tempfile.TemporaryDirectory(prefix="minimind-v-kernels-") as kernels:
        km = _kernel_manager(Path(kernels))
        client = NotebookClient(nb, timeout=timeout, km=km, resources={"metadata": {"path": str(cwd)}},
                                allow_errors=False)
        try:
            client.execute(env=kernel_env)
        except Exception as err:  # a cell error, a timeout, a dead kernel
            nbformat.write(nb, written)
            raise ChapterError(_failure_message(chapter, nb, err, written)) from None
        finally:
            # A kernel manager passed in is not shut down by nbclient; this chapter's kernel (and
            # the models it holds) must not outlive the chapter.
            if km.has_kernel:
                run_sync(km.shutdown_kernel)(now=True)
    nbformat.write(nb, written)
    return written


def run_book(chapters: list[Path], out_dir: str | os.PathLike = DEFAULT_OUT, cwd: str | os.PathLike = ROOT,
             quick: bool | None = None, timeout: int = DEFAULT_CELL_TIMEOUT_S) -> dict[str, float]:
    """Execute the chapters in order; returns {chapter: seconds}. Stops at the first failure."""
    cwd = Path(cwd)
    out_dir = Path(out_dir)
    if not out_dir.is_absolute():
        out_dir = cwd / out_dir
    env = dict(os.environ)
    if quick is not None:
        env["MINIMIND_V_QUICK"] = "1" if quick else "0"
    mode = "quick" if quick_mode(env) else "full"
    print(f"book: {len(chapters)} chapter(s), {mode} mode, executed notebooks -> {out_dir}", flush=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    for chapter in chapters:
        t0 = time.perf_counter()
        print(f"[{chapter.stem}] running ...", flush=True)
        written = execute_chapter(chapter, out_dir, cwd, timeout, env)
        timings[chapter.stem] = round(time.perf_counter() - t0, 1)
        print(f"[{chapter.stem}] done in {timings[chapter.stem]:.0f} s -> {written}", flush=True)
    total = time.perf_counter() - start
    # Timings differ between machines: the matmul speed lets a reader scale them to theirs.
    from .machine import describe_speed

    print(f"book: {len(timings)} chapter(s) in {total / 60:.1f} min ({mode} mode); this machine: "
          f"{describe_speed()}", flush=True)
    return timings


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(prog="python -m minimind_v.book", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (sets MINIMIND_V_QUICK=1 for the chapters)")
    p.add_argument("--chapters", nargs="+", metavar="NN", help="only these chapters (numbers or names)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the executed notebooks (default {DEFAULT_OUT})")
    p.add_argument("--notebooks", default=str(NOTEBOOKS), help="folder holding the chapter scripts")
    p.add_argument("--cwd", default=str(ROOT), help="working directory of the chapters (default: the project root)")
    p.add_argument("--timeout", type=int, default=DEFAULT_CELL_TIMEOUT_S, help="seconds one cell may run")
    ns = p.parse_args(argv)
    if ns.timeout < 1:
        p.error(f"--timeout must be >= 1 second, got {ns.timeout}")
    try:
        chapters = select_chapters(chapter_files(ns.notebooks), ns.chapters)
    except (FileNotFoundError, ValueError) as err:
        p.error(str(err))
    try:
        return run_book(chapters, ns.out, ns.cwd, quick=True if ns.quick else None, timeout=ns.timeout)
    except ChapterError as err:
        print(f"\nbook stopped: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
