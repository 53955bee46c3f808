"""The book: its chapters, the settings they share, and the headless runner.

The slow test executes every chapter in quick mode (jupytext -> nbclient, from the .py sources,
no stored outputs) into a temporary run folder, figures folder and output folder, so a reader's
runs/ and figures/ are never touched.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jupytext
import nbformat
import pytest

from minimind_v import book, chapters
from dataclasses import replace

from minimind_v.recipe import QUICK, STAGE_DIRS, Recipe, is_done

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "OMP_NUM_THREADS", "TORCHELASTIC_RUN_ID")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURE_CALL = re.compile(r"""save_figure\(\s*\w+\s*,\s*["']([^"']+)["']\s*\)""")
BOOK_ENV_VARS = ("MINIMIND_V_QUICK", "MINIMIND_V_RUN", "MINIMIND_V_FIGURES", "MINIMIND_V_NPROC", "MINIMIND_V_HOME")


@pytest.fixture
def clean_env(monkeypatch):
    """None of the book's variables set; whatever a test sets (directly or not) is undone after it."""
    for name in BOOK_ENV_VARS:
        monkeypatch.setenv(name, "")  # records the original state, so teardown restores it
        monkeypatch.delenv(name)
    return monkeypatch


def wait_until_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def figure_names(chapter: Path) -> list[str]:
    return FIGURE_CALL.findall(chapter.read_text(encoding="utf-8"))


def error_outputs(nb) -> list[str]:
    return [f"{o.get('ename')}: {o.get('evalue')}" for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


# ----------------------------------------------------------------------------- the chapters


def test_chapters_are_numbered_in_order_without_gaps():
    chapters = book.chapter_files()
    numbers = [int(p.name[:2]) for p in chapters]
    assert numbers == list(range(len(chapters))) and len(chapters) == 9, [p.name for p in chapters]


@pytest.mark.parametrize("chapter", book.chapter_files(), ids=lambda p: p.stem)
def test_chapter_is_a_notebook_with_text_code_and_figures(chapter):
    nb = jupytext.read(chapter)
    kinds = [c.cell_type for c in nb.cells]
    assert kinds[0] == "markdown" and nb.cells[0].source.startswith("# Chapter"), chapter.name
    assert "code" in kinds and kinds.count("markdown") >= 3
    assert not error_outputs(nb) and not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    # Every chapter saves at least one picture, each under a name that starts with its own number.
    names = figure_names(chapter)
    assert names and all(n.startswith(chapter.name[:3]) and n.endswith(".png") for n in names), names
    # The settings every chapter opens with, and no machine-specific path.
    first_code = next(c.source for c in nb.cells if c.cell_type == "code")
    assert "QUICK = None" in first_code and "NPROC = None" in first_code
    assert "use_quick_mode(QUICK)" in first_code or "open_chapter(QUICK, NPROC" in first_code
    assert not re.search(r"""["'](/home|/work|/tmp|/Users|[A-Z]:\\)""", chapter.read_text(encoding="utf-8"))


def test_figure_names_are_unique_across_the_book():
    names = [n for chapter in book.chapter_files() for n in figure_names(chapter)]
    assert len(names) == len(set(names)), sorted(names)


def test_select_chapters_by_number_or_name_keeps_book_order():
    chapters = book.chapter_files()
    picked = book.select_chapters(chapters, ["03", chapters[1].stem, "3"])
    assert picked == [chapters[1], chapters[3]]
    assert book.select_chapters(chapters, None) == chapters
    with pytest.raises(ValueError, match=r"no chapter '42'.*00_setup_and_data"):
        book.select_chapters(chapters, ["42"])


def test_cli_rejects_an_unknown_chapter_and_a_bad_timeout(capsys):
    with pytest.raises(SystemExit) as err:
        book.main(["--chapters", "99"])
    assert err.value.code == 2 and "no chapter '99'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        book.main(["--timeout", "0"])


# ----------------------------------------------------------------------------- shared settings


def test_run_folder_follows_quick_mode_and_the_environment(clean_env, tmp_path):
    assert chapters.use_quick_mode(None) is False and chapters.run_folder() == REPO / "runs/default"
    assert chapters.use_quick_mode(True) is True and chapters.run_folder() == REPO / "runs/quick"
    assert os.environ["MINIMIND_V_QUICK"] == "1"  # what the recipe and launched stages read
    clean_env.setenv("MINIMIND_V_RUN", "elsewhere/run")
    assert chapters.run_folder() == REPO / "elsewhere/run"
    clean_env.setenv("MINIMIND_V_HOME", str(tmp_path))
    assert chapters.run_folder() == tmp_path / "elsewhere/run" and chapters.figures_dir() == tmp_path / "figures"
    assert chapters.use_quick_mode(False) is False and os.environ["MINIMIND_V_QUICK"] == "0"


def test_run_folder_and_figures_do_not_follow_the_working_directory(clean_env):
    """JupyterLab starts a chapter's kernel in notebooks/; `python -m` may run from anywhere."""
    code = "from minimind_v import chapters; print(chapters.run_folder()); print(chapters.figures_dir())"
    env = {k: v for k, v in os.environ.items() if k not in BOOK_ENV_VARS}
    env["PYTHONPATH"] = str(REPO)
    seen = {subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                           check=True).stdout for cwd in (REPO, REPO / "notebooks", REPO / "tests")}
    assert seen == {f"{REPO / 'runs/default'}\n{REPO / 'figures'}\n"}


@pytest.mark.slow
def test_a_chapter_run_from_notebooks_and_from_the_root_shares_one_run_folder(tmp_path):
    """Chapter 00 executed with the kernel in notebooks/ (as JupyterLab does) builds the world in
    the home's run folder; executed again from the project root, it reuses that world."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS + BOOK_ENV_VARS}
    env.update(PYTHONPATH=str(REPO), MINIMIND_V_HOME=str(tmp_path), MINIMIND_V_QUICK="1")
    chapter = [c for c in book.chapter_files() if c.stem.startswith("00")]
    outputs = []
    for cwd in (REPO / "notebooks", REPO):
        book.execute_chapter(chapter[0], tmp_path / f"out-{cwd.name}", cwd, timeout=600, env=env)
        nb = nbformat.read(tmp_path / f"out-{cwd.name}" / f"{chapter[0].stem}.ipynb", as_version=4)
        outputs.append("".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                               for o in c.get("outputs", [])))
    world = tmp_path / "runs/quick/world"
    assert (world / "world.json").exists() and (tmp_path / "figures/00_shapes_world.png").exists()
    assert "[world] building" in outputs[0] and "no result yet" in outputs[0]
    assert f"[world] reusing {world}: same settings and inputs" in outputs[1]
    assert not (REPO / "notebooks/runs").exists() and not (REPO / "notebooks/figures").exists()


def test_save_figure_writes_a_png_where_the_environment_says(clean_env, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean_env.setenv("MINIMIND_V_FIGURES", str(tmp_path / "figs"))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = chapters.save_figure(fig, "03_line.png")
    assert path == tmp_path / "figs" / "03_line.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    for bad in ("line.png", "03_line.svg", "3_line.png"):
        with pytest.raises(ValueError, match="NN_what.png"):
            chapters.save_figure(fig, bad)
    plt.close(fig)


def test_default_nproc_reads_the_environment(clean_env):
    import torch

    expected = max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    assert chapters.default_nproc() == expected
    clean_env.setenv("MINIMIND_V_NPROC", "3")
    assert chapters.default_nproc() == 3
    clean_env.setenv("MINIMIND_V_NPROC", "two")
    with pytest.raises(ValueError, match="MINIMIND_V_NPROC"):
        chapters.default_nproc()


def test_read_metrics_and_plot_loss(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"total_steps": 2}\n{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n')
    records = chapters.read_metrics(metrics)
    assert records == [{"total_steps": 2}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    fig = chapters.plot_loss(records, "a stage")
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [1, 2] and list(line.get_ydata()) == [2.0, 1.5]
    with pytest.raises(ValueError, match="no \\(step, loss\\)"):
        chapters.plot_loss([{"total_steps": 2}], "empty")
    metrics.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        chapters.read_metrics(metrics)
    with pytest.raises(FileNotFoundError, match="has the stage run"):
        chapters.read_metrics(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- the runner


def write_chapter(folder: Path, name: str, code: str) -> Path:
    path = folder / name
    path.write_text("# %% [markdown]\n# # Chapter\n\n# %%\n" + textwrap.dedent(code), encoding="utf-8")
    return path


def test_runner_executes_in_this_interpreter_from_the_given_folder(clean_env, tmp_path):
    notebooks, work = tmp_path / "notebooks", tmp_path / "work"
    notebooks.mkdir()
    work.mkdir()
    write_chapter(notebooks, "00_where.py", """
        import os, sys
        from pathlib import Path
        Path("seen.txt").write_text("\\n".join([os.getcwd(), sys.executable, os.environ["MINIMIND_V_QUICK"],
                                                str(os.getpid())]))
        print("hello from the kernel")
    """)
    timings = book.run_book(book.chapter_files(notebooks), out_dir="out", cwd=work, quick=True, timeout=120)
    assert list(timings) == ["00_where"]
    cwd, executable, quick, pid = (work / "seen.txt").read_text().splitlines()
    assert Path(cwd).resolve() == work.resolve()
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert quick == "1"
    nb = nbformat.read(work / "out" / "00_where.ipynb", as_version=4)
    assert "hello from the kernel" in nb.cells[1].outputs[0]["text"]
    assert wait_until_gone(int(pid)), "the chapter's kernel outlived its chapter"


def test_runner_stops_at_a_failing_cell_and_names_it(clean_env, tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_chapter(notebooks, "00_fine.py", "x = 1\n")
    write_chapter(notebooks, "01_broken.py", """
        def deep():
            raise ValueError("unique-failure-marker")
        deep()
    """)
    write_chapter(notebooks, "02_never.py", "open('never-ran', 'w').close()\n")
    with pytest.raises(book.ChapterError) as err:
        book.run_book(book.chapter_files(notebooks), out_dir=tmp_path / "out", cwd=tmp_path, timeout=120)
    message = str(err.value)
    assert "chapter 01_broken failed in code cell 1" in message
    assert "ValueError: unique-failure-marker" in message and "deep()" in message
    assert "\x1b[" not in message  # no terminal colour codes in the report
    partial = nbformat.read(tmp_path / "out" / "01_broken.ipynb", as_version=4)
    assert error_outputs(partial) == ["ValueError: unique-failure-marker"]
    assert not (tmp_path / "never-ran").exists()


@pytest.mark.slow
def test_every_chapter_runs_in_quick_mode(tmp_path):
    """The whole book, headless, on a fresh quick run: no cell fails, every figure is written and
    every stage of the recipe ends up done."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS + BOOK_ENV_VARS}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
               MINIMIND_V_RUN=str(tmp_path / "run"), MINIMIND_V_FIGURES=str(tmp_path / "figures"))
    out = tmp_path / "notebooks"
    run = subprocess.run([sys.executable, "-m", "minimind_v.book", "--quick", "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    for chapter in book.chapter_files():
        nb = nbformat.read(out / f"{chapter.stem}.ipynb", as_version=4)
        assert not error_outputs(nb), chapter.stem
        assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code"), chapter.stem
        for name in figure_names(chapter):
            figure = tmp_path / "figures" / name
            assert figure.exists() and figure.read_bytes()[:8] == PNG_MAGIC, name
    quick = replace(Recipe(), **QUICK)
    assert all(is_done(tmp_path / "run", stage, quick) for stage in STAGE_DIRS)
