"""The book in a real browser: JupyterLab started as `make lab` starts it, driven by headless
Chromium through Playwright, on a quick-mode run folder built here.

A reader's session: the file browser opens on notebooks/; a double-click opens chapter 7 as a
notebook (jupytext, not a text editor); Run All Cells; the Q&A panel renders (no "Loading
widget...", no error in the browser console); compose a picture, type a question, press Ask,
read the answer and the top-5 tokens from the page; switch the attention layer. Every other
chapter is opened too and must render as a notebook. Screenshots go to build/browser/.

The browser is the system's Chromium (``MINIMIND_V_CHROMIUM``, default /usr/bin/chromium): no
browser is downloaded. Without one the test fails and says how to install it; it never skips.
JupyterLab, its kernels and the browser are stopped at the end, pass or fail, and the test
checks that no process it started is left.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env
from minimind_v.viz.attention import token_label

CHROMIUM = os.environ.get("MINIMIND_V_CHROMIUM", "/usr/bin/chromium")
INSTALL_BROWSER = "apt-get update && apt-get install -y chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOTS = REPO / "build" / "browser"
CHAPTER_7 = "07_evaluation_and_play.py"
TWO_RED_ONE_BLUE = [
    dict(shape="circle", colour="red", size="small", position="top left"),
    dict(shape="circle", colour="red", size="large", position="center"),
    dict(shape="circle", colour="blue", size="small", position="bottom right"),
]
QUESTION = "How many circles are there?"
# Test-only preferences, in the test's own user-settings folder; the defaults under test (the
# default viewer) come from jupyter/lab/settings/overrides.json, as in `make lab`.
USER_SETTINGS = {
    # Never write a chapter back: the chapters served are a copy, but keep even that unchanged.
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    # Every cell in the page, not only those scrolled into view, so the test can read them all.
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    # No news or update checks: nothing to reach on the network, no toast over the page.
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}

pytestmark = pytest.mark.slow
timings: dict[str, float] = {}  # written to build/browser/timings.json


# ----------------------------------------------------------------------------- processes


def process_table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, start time)} of every process (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (name) "
            if fields[0] != "Z":  # a zombie has ended; only its parent's bookkeeping is left
                table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def descendants(root: int) -> set[tuple[int, str]]:
    """(pid, start time) of every process below ``root``; the start time tells a reused pid apart."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.add((pid, table[pid][1]))
            todo.append(pid)
    return found


def still_running(processes: set[tuple[int, str]]) -> list[int]:
    table = process_table()
    return sorted(pid for pid, started in processes if table.get(pid, (None, None))[1] == started)


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server started with jupyter/lab.sh (the `make lab` launcher)."""

    def __init__(self, folder: Path, run: Path):
        self.folder, self.run = folder, run
        self.token, self.port = secrets.token_hex(16), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        book = folder / "book"  # a copy of the chapters: nothing the browser does reaches the project
        shutil.copytree(REPO / "notebooks", book / "notebooks", ignore=shutil.ignore_patterns("*.ipynb", ".*"))
        settings = folder / "user-settings"
        for name, values in USER_SETTINGS.items():
            path = settings / f"{name}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values), encoding="utf-8")
        # A "python3" kernel of another interpreter on the reader's JUPYTER_PATH, where it would
        # win over every installed one: the book's must win over it.
        decoy = folder / "elsewhere" / "kernels" / "python3" / "kernel.json"
        decoy.parent.mkdir(parents=True)
        decoy.write_text(json.dumps({"argv": [str(folder / "no-such-python"), "-m", "ipykernel_launcher", "-f",
                                              "{connection_file}"],
                                     "display_name": "Python 3 (another environment)", "language": "python"}))
        env = {k: v for k, v in subprocess_env().items()
               if not k.startswith(("MINIMIND_V_", "JUPYTER")) and k != "MPLBACKEND"}
        env.update({
            # Jupyter's own folders, away from the user's: config, data, runtime, settings, workspaces.
            "JUPYTER_CONFIG_DIR": str(folder / "config"), "JUPYTER_DATA_DIR": str(folder / "data"),
            "JUPYTER_RUNTIME_DIR": str(folder / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(settings),
            "JUPYTERLAB_WORKSPACES_DIR": str(folder / "workspaces"), "IPYTHONDIR": str(folder / "ipython"),
            "JUPYTER_PATH": str(folder / "elsewhere"),
            # The kernels run the chapters on the quick run folder built here.
            "MINIMIND_V_QUICK": "1", "MINIMIND_V_HOME": str(folder), "MINIMIND_V_RUN": str(run),
            "MINIMIND_V_NPROC": "1",
        })
        args = ["--no-browser", "--ip=127.0.0.1", f"--port={self.port}", f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={book}", "--ServerApp.port_retries=0"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--allow-root")  # CI runs as root
        self.log = folder / "jupyterlab.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(["sh", str(REPO / "jupyter" / "lab.sh"), sys.executable, *args],
                                            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(self.url + path, method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with status {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.api("/api/status")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise RuntimeError(f"JupyterLab did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Shut down through the API (the server stops its kernels), then signal if need be."""
        if self.process.poll() is None:
            try:
                self.api("/api/shutdown", method="POST")
                self.process.wait(timeout=30)
            except (urllib.error.URLError, ConnectionError, TimeoutError, subprocess.TimeoutExpired):
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                break
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass


def require_browser():
    """Playwright's sync API, once both it and the browser are known to be there; else fail (never skip)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail('the browser test needs Playwright: .venv/bin/pip install -e ".[dev]"')
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"no Chromium at {CHROMIUM}: install one with `{INSTALL_BROWSER}` (as root, Debian/Ubuntu), "
                    "or point MINIMIND_V_CHROMIUM at a Chromium or Chrome executable")
    return sync_playwright


@contextmanager
def chromium():
    """Headless Chromium (the system's) under Playwright; closed on the way out, pass or fail."""
    playwright = require_browser()().start()
    try:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        playwright.stop()


# ----------------------------------------------------------------------------- the session


class Session:
    """The page, the console errors seen on it, and the moves of a reader."""

    def __init__(self, browser, lab: Lab):
        self.lab, self.errors = lab, []
        self.page = browser.new_page(viewport={"width": 1500, "height": 1000})
        self.page.set_default_timeout(60_000)
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.goto(f"{lab.url}/?token={lab.token}")  # JupyterLab's own default URL: /lab/tree/notebooks
        self.page.locator(".jp-DirListing-item", has_text=CHAPTER_7).wait_for()

    def screenshot(self, name: str, element=None) -> Path:
        path = SCREENSHOTS / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (element or self.page).screenshot(path=str(path))
        return path

    def open_by_double_click(self, name: str):
        """Double-click a chapter in the file browser; returns the notebook panel it opened."""
        self.page.locator(".jp-DirListing-item", has_text=name).dblclick()
        tab = self.page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current")
        tab.filter(has_text=name).wait_for()
        current = self.page.locator("#jp-main-dock-panel > .jp-MainAreaWidget:not(.lm-mod-hidden)")
        current.locator(".jp-Notebook, .jp-FileEditor").first.wait_for()
        assert current.locator(".jp-FileEditor").count() == 0, f"{name} opened in a text editor, not as a notebook"
        assert "jp-NotebookPanel" in current.get_attribute("class"), f"{name} did not open as a notebook"
        current.locator(".jp-Cell").first.wait_for()
        return current

    def run_all(self, panel, timeout: float = 600) -> float:
        """Run > Run All Cells from the menu bar; wait until every code cell has run. Seconds taken."""
        # The kernel the chapter names starts as the notebook opens; Run All before it is up
        # would ask which kernel to use.
        panel.locator(".jp-Toolbar-kernelName", has_text=re.compile(r"^\s*Python 3\s*$")).wait_for()
        panel.locator(".jp-Notebook-ExecutionIndicator[data-status=idle]").wait_for()
        start = time.monotonic()
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        self.page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        deadline = start + timeout
        while time.monotonic() < deadline:
            state = panel.evaluate("""node => ({
                prompts: [...node.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim()),
                errors: [...node.querySelectorAll('.jp-OutputArea-output')].map(o => o.innerText)
                        .filter(t => t.includes('Traceback (most recent call last)')),
            })""")
            if self.page.locator(".jp-Dialog").count():
                pytest.fail(f"a dialog interrupted Run All: {self.page.locator('.jp-Dialog').inner_text()}")
            if state["errors"]:
                pytest.fail(f"a cell of chapter 7 failed in the browser:\n{state['errors'][0][-3000:]}")
            if state["prompts"] and all(re.fullmatch(r"\[\d+\]:", p) for p in state["prompts"]):
                return time.monotonic() - start
            time.sleep(1)
        pytest.fail(f"chapter 7 did not finish within {timeout:.0f} s; prompts: {state['prompts']}")


def build_quick_run(run: Path) -> Path:
    """A quick-mode run folder, as a reader builds it: python -m minimind_v.recipe."""
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("MINIMIND_V_")}
    env["MINIMIND_V_QUICK"] = "1"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "minimind_v.recipe", "--run", str(run)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"the quick recipe failed:\n{(done.stdout + done.stderr)[-4000:]}"
    timings["quick recipe (s)"] = round(time.monotonic() - start, 1)
    return run


@contextmanager
def lab_session(folder: Path, run: Path):
    """JupyterLab + Chromium + a page; everything stopped on the way out, pass or fail, and then
    checked: no process started here (the browser, the server, its kernels) may be left."""
    started: set[tuple[int, str]] = set()
    try:
        with chromium() as browser:
            lab = Lab(folder, run)
            try:
                yield Session(browser, lab)
            finally:
                started |= descendants(os.getpid())  # the browser, JupyterLab and its kernels
                lab.stop()
    finally:
        if Path("/proc").is_dir():
            left = still_running(started | descendants(os.getpid()))
            lines = ["; ".join(" ".join(command_line(pid)) or str(pid) for pid in left)]
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            assert not left, f"processes left behind (now killed): {lines[0]}"


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    require_browser()  # before minutes of training, not after
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    run = build_quick_run(tmp_path_factory.mktemp("browser-run") / "runs" / "quick")
    try:
        with lab_session(tmp_path_factory.mktemp("browser-lab"), run) as opened:
            yield opened
    finally:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        (SCREENSHOTS / "timings.json").write_text(json.dumps(timings, indent=1), encoding="utf-8")


def reference_answer(run: Path) -> dict:
    """What the SFT model says about the composed picture, computed here, outside the browser."""
    from minimind_v.data.shapes import render_scene
    from minimind_v.inference import answer, load_vlm
    from minimind_v.viz import answer_with_attention

    bundle = load_vlm(run / "sft")
    image = render_scene(TWO_RED_ONE_BLUE)
    trace = answer_with_attention(bundle, image, QUESTION)
    assert trace.answer == answer(bundle, [image], [QUESTION])[0]
    return {"answer": trace.answer, "top": [list(zip(c.tokens, c.probs)) for c in trace.candidates]}


# ----------------------------------------------------------------------------- the tests


def test_chapter_7_panel_in_jupyterlab(session):
    t0 = time.monotonic()
    page, lab = session.page, session.lab
    session.screenshot("01_file_browser.png")
    spec = lab.api("/api/kernelspecs")["kernelspecs"]["python3"]["spec"]
    assert spec["display_name"] == "Python 3", f"the python3 kernel is not the book's (jupyter/kernels/python3): {spec}"

    notebook = session.open_by_double_click(CHAPTER_7)
    seconds = session.run_all(notebook)
    # The kernel is the environment this test runs in (the project's .venv), as `make lab` makes it.
    kernels = [pid for pid, _ in descendants(lab.process.pid) if "ipykernel_launcher" in command_line(pid)]
    assert kernels and all(command_line(p)[0] == sys.executable for p in kernels), \
        [command_line(p) for p in kernels]

    panel = notebook.locator(".mmv-panel")
    panel.wait_for()
    text = notebook.inner_text()
    assert "Loading widget" not in text and "Error displaying widget" not in text
    panel.scroll_into_view_if_needed()
    # The cell drove the panel from code: its answer and top tokens are on the page.
    panel.locator(".mmv-answer", has_text="A:").wait_for()
    assert panel.locator(".mmv-top table tr").count() >= 2
    session.screenshot("02_panel_after_run_all.png")

    # A reader composes two red circles and a blue one ...
    panel.locator(".lm-TabBar-tab", has_text="compose one").click()
    for number, obj in enumerate(TWO_RED_ONE_BLUE, 1):
        row = panel.locator(f".mmv-object-{number}")
        row.locator(".mmv-use input[type=checkbox]").check()
        for key, value in obj.items():
            row.locator(f".mmv-{key} select").select_option(value)
    panel.locator("button.mmv-draw").click()
    panel.locator(".mmv-picture-label", has_text="small blue circle in the bottom right").wait_for()
    # ... types a question and asks the model after SFT.
    panel.locator(".mmv-model select").select_option("after SFT")
    panel.locator(".mmv-question input").fill(QUESTION)
    panel.locator("button.mmv-ask").click()
    # The answer area names the new question once the old answer is cleared; the share of
    # attention on the picture is written last.
    panel.locator(".mmv-answer", has_text=f"Q: {QUESTION}").wait_for()
    panel.locator(".mmv-share", has_text="went to the picture").wait_for()
    shown_answer = panel.locator(".mmv-answer").inner_text().split("A:", 1)[1].strip()
    top = panel.locator(".mmv-top table").evaluate("""table => [...table.rows].slice(1).map(row =>
        [...row.cells].slice(1).map(cell => [cell.querySelector('code').textContent,
                                             parseFloat(cell.textContent.trim().split(' ').pop())]))""")
    assert shown_answer, "the quick SFT model answered with nothing: no attention to draw"
    assert not panel.locator(".mmv-message").inner_text().strip(), panel.locator(".mmv-message").inner_text()
    attention = panel.locator("img.mmv-attention")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=attention.element_handle())
    panel.locator(".mmv-answer").evaluate("node => node.scrollIntoView({block: 'start'})")
    session.screenshot("03_panel_answer_top_tokens_attention.png")

    # The page shows what the model says: the same answer and top tokens, computed here.
    expected = reference_answer(lab.run)
    assert shown_answer == expected["answer"]
    assert len(top) == len(expected["top"]) and all(len(step) == 5 for step in top)
    for step, want in zip(top, expected["top"]):
        assert [t for t, _ in step] == [token_label(t) for t, _ in want]
        assert [p for _, p in step] == [round(p, 2) for _, p in want]

    # Switching the attention layer redraws the map for that layer, from the same answer.
    before = attention.get_attribute("src")
    panel.locator(".mmv-layer select").select_option(label="layer 1")
    panel.locator(".mmv-share", has_text="layer 1").wait_for()
    page.wait_for_function("([img, before]) => img.src !== before && img.complete && img.naturalWidth > 0",
                           arg=[attention.element_handle(), before])
    panel.locator(".mmv-answer").evaluate("node => node.scrollIntoView({block: 'start'})")
    session.screenshot("04_panel_attention_layer_1.png")
    # The whole panel in a taller window: the picture for the README.
    page.set_viewport_size({"width": 1500, "height": 1500})
    panel.evaluate("node => node.scrollIntoView({block: 'start'})")
    session.screenshot("05_panel_in_jupyterlab.png")
    assert not session.errors, "errors in the browser console:\n" + "\n".join(session.errors)
    timings["chapter 7: run all cells (s)"] = round(seconds, 1)
    timings["chapter 7 test (s)"] = round(time.monotonic() - t0, 1)


def test_every_chapter_opens_as_a_notebook(session):
    t0 = time.monotonic()
    chapters = sorted(p for p in (REPO / "notebooks").glob("[0-9][0-9]_*.py"))
    assert len(chapters) >= 8
    for chapter in chapters:
        title = re.search(r"^# # (.+)$", chapter.read_text(encoding="utf-8"), re.MULTILINE).group(1)
        notebook = session.open_by_double_click(chapter.name)  # fails if it opens in a text editor
        # Cells, and the markdown rendered: the chapter's title is a heading.
        notebook.locator(".jp-MarkdownCell h1", has_text=title).first.wait_for()
        assert notebook.locator(".jp-CodeCell").count() >= 2
        session.screenshot(f"chapters/{chapter.stem}.png")
    for running in session.lab.api("/api/sessions"):  # the kernels the chapters started
        session.lab.api(f"/api/sessions/{running['id']}", method="DELETE")
    assert not session.errors, "errors in the browser console:\n" + "\n".join(session.errors)
    timings["every chapter opened (s)"] = round(time.monotonic() - t0, 1)
