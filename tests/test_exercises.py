"""Every worked solution of the chapters' exercises runs and passes its own checks.

The solutions live in ``notebooks/solutions/NN_solutions.py``, one function ``exercise_K`` per
exercise at the end of chapter NN. Each builds what it needs (small, random, seconds at most) and
asserts its answer, so running it is the test. The chapters' "Exercises" sections and the
solution files must also agree on how many exercises there are.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SOLUTIONS = REPO / "notebooks" / "solutions"
SOLUTION_FILE = re.compile(r"^(\d\d)_solutions\.py$")


def solution_files() -> list[Path]:
    return sorted(p for p in SOLUTIONS.iterdir() if SOLUTION_FILE.match(p.name))


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"solutions_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exercise_names(module) -> list[str]:
    names = [n for n in vars(module) if re.fullmatch(r"exercise_\d+", n) and callable(getattr(module, n))]
    return sorted(names, key=lambda n: int(n.split("_")[1]))


def chapter_of(path: Path) -> Path:
    number = SOLUTION_FILE.match(path.name).group(1)
    (chapter,) = (REPO / "notebooks").glob(f"{number}_*.py")
    return chapter


def all_exercises() -> list[tuple[Path, str]]:
    return [(path, name) for path in solution_files() for name in exercise_names(load(path))]


def test_every_chapter_has_solutions():
    chapters = {p.name[:2] for p in (REPO / "notebooks").glob("[0-9][0-9]_*.py")}
    assert chapters and chapters == {p.name[:2] for p in solution_files()}


@pytest.mark.parametrize("path", solution_files(), ids=lambda p: p.stem)
def test_the_chapter_lists_as_many_exercises_as_its_solutions_file(path):
    names = exercise_names(load(path))
    assert names == [f"exercise_{k}" for k in range(1, len(names) + 1)] and 3 <= len(names) <= 5, names
    text = chapter_of(path).read_text(encoding="utf-8")
    exercises = text[text.index("# ## Exercises"):]
    listed = re.findall(r"^# (\d+)\. \*\*", exercises, flags=re.M)
    assert listed == [str(k) for k in range(1, len(names) + 1)], listed
    assert f"notebooks/solutions/{path.name}" in exercises


@pytest.mark.parametrize(("path", "name"), all_exercises(), ids=lambda v: v.stem if isinstance(v, Path) else v)
def test_exercise_solution_runs_and_checks_its_answer(path, name, capsys):
    module = load(path)
    state = torch.get_rng_state()
    getattr(module, name)()
    # A solution draws its random numbers from its own generators: it never moves the global one.
    assert torch.equal(state, torch.get_rng_state()), f"{path.name}:{name} used the global random generator"
    assert capsys.readouterr().out.strip(), f"{path.name}:{name} printed no answer"
