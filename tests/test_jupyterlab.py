"""A student's session in JupyterLab, in headless Chromium.

The assignment: open it, run all cells, read the failing tests, answer one function (first
wrongly, then rightly) and see its test pass while the others still fail. The chapter: run it
and move the live ipywidgets slider, and the figure redraws. Each test starts its own
JupyterLab on 127.0.0.1 in a temporary folder with its own settings, and stops it afterwards.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT

ASSIGNMENT = "schedule_math"

# Settings a student would pick once: no news feed or update check (no dialogs, no network);
# every cell attached to the page, so outputs far below the fold can be read.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}

# Run All is finished when the first code cell has a new execution count, no cell waits ([*])
# and the kernel is idle. A failing cell stops the run; the cells after it go back to [ ].
RUN_FINISHED = """before => {
    const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]
        .map(p => p.textContent.trim());
    const first = parseInt(prompts.length ? prompts[0].replace(/\\D/g, '') : '') || 0;
    const idle = /\\|\\s*Idle/.test(document.querySelector('#jp-main-statusbar').textContent);
    return first > before && !prompts.some(p => p.includes('*')) && idle;
}"""


# -- the server -----------------------------------------------------------------------------

def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server (it shuts its kernels down), kill it if it hangs, then any stray kernel."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)  # kernels run in their own session
    except psutil.NoSuchProcess:
        children = []
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        child.kill()
    psutil.wait_procs(alive, timeout=10)


@contextmanager
def jupyterlab(root: Path, home: Path):
    """JupyterLab serving ``root``; its config, data, runtime and IPython folders live in ``home``.

    The venv's kernel spec is installed with --sys-prefix, so it is found without the user folders.
    Yields ``(base_url, token)``.
    """
    config = home / "config"
    for name, values in LAB_SETTINGS.items():
        path = config / "lab" / "user-settings" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(config), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), IPYTHONDIR=str(home / "ipython"), HF_HUB_OFFLINE="1")
    token = secrets.token_hex(16)
    log_path = home / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", "--port=0",
             f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
             "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log_tail() -> str:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])

    try:
        info, deadline = home / "runtime" / f"jpserver-{proc.pid}.json", time.monotonic() + 90
        while True:  # the server writes its port into the runtime file, then answers
            assert proc.poll() is None, f"JupyterLab exited with {proc.returncode}:\n{log_tail()}"
            assert time.monotonic() < deadline, f"JupyterLab did not start in 90 s:\n{log_tail()}"
            if info.exists():
                try:
                    url = json.loads(info.read_text())["url"]
                    request = urllib.request.Request(f"{url}api/status", headers={"Authorization": f"token {token}"})
                    with urllib.request.urlopen(request, timeout=5) as response:
                        if response.status == 200:
                            break
                except (OSError, ValueError, KeyError):
                    pass
            time.sleep(0.3)
        yield url, token
    finally:
        _stop(proc)



@contextmanager
def notebook_page(browser, url: str, token: str, name: str, n_cells: int, shots: Path):
    """The notebook ``name`` open in JupyterLab, its kernel idle; no request may leave 127.0.0.1."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    external, errors = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))

    def block_external(route):
        if route.request.url.startswith(url) or route.request.url.startswith("data:"):
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    page.route("**/*", block_external)
    try:
        page.goto(f"{url}lab/tree/{name}?token={token}")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        page.wait_for_function("/\\|\\s*Idle/.test(document.querySelector('#jp-main-statusbar').textContent)",
                               timeout=60_000)
        page.wait_for_function("n => document.querySelectorAll('.jp-Notebook .jp-Cell').length === n", arg=n_cells,
                               timeout=30_000)  # every cell is on the page
        yield page
        assert not external, f"JupyterLab made requests outside the machine: {external}"
        assert not errors, f"page errors: {errors}"
    except BaseException:
        try:
            page.screenshot(path=str(shots / f"{Path(name).stem}-failure.png"))  # kept in pytest's tmp_path
        except Exception:
            pass
        raise
    finally:
        page.close()


def run_all(page, timeout_s: float) -> None:
    """Run > Run All Cells, from the menu bar, and wait until the run has stopped."""
    prompt = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").first.text_content()
    before = int(re.sub(r"\D", "", prompt) or 0)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.wait_for_function(RUN_FINISHED, arg=before, timeout=timeout_s * 1000)


def run_cell(page, cell) -> None:
    """Select one cell, run it with Ctrl+Enter, and wait for its new execution count."""
    prompt = cell.locator(".jp-InputPrompt")
    before = int(re.sub(r"\D", "", prompt.text_content()) or 0)
    cell.locator(".cm-content").click()
    page.keyboard.press("Control+Enter")
    page.wait_for_function("([el, before]) => (parseInt(el.textContent.replace(/\\D/g, '')) || 0) > before "
                           "&& !el.textContent.includes('*')", arg=[prompt.element_handle(), before], timeout=60_000)


def output_text(cell) -> str:
    return cell.locator(".jp-OutputArea").inner_text()


def type_answer(page, cell, source: str) -> None:
    """Click into the answer cell's editor, select everything and type the new source over it."""
    cell.locator(".cm-content").click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(source)  # one input event, as a paste: no auto-indent of typed newlines


def cell_index(nb, grade_id: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)


def without_markers(source: str) -> str:
    return "\n".join(line for line in source.splitlines() if "### BEGIN SOLUTION" not in line
                     and "### END SOLUTION" not in line)


# -- the tests ------------------------------------------------------------------------------

def test_a_student_runs_the_assignment_and_answers_one_function(browser, tmp_path):
    start = time.monotonic()
    root, home = tmp_path / "work", tmp_path / "jupyter"
    root.mkdir()
    notebook = root / f"{ASSIGNMENT}.ipynb"
    shutil.copy(ROOT / "assignments" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", notebook)
    release = nbformat.read(notebook, as_version=4)
    solution = nbformat.read(ROOT / "solutions" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", as_version=4)
    answers = ["linear_betas", "cosine_betas", "alpha_bar", "snr", "q_sample", "first_step_below"]
    right = without_markers(solution.cells[cell_index(solution, "linear_betas")].source)
    wrong = right.replace("beta_end, T,", "beta_end, T - 1,")  # off by one: T - 1 values
    assert wrong != right, "the solution of linear_betas still calls torch.linspace(beta_start, beta_end, T, ...)"

    with jupyterlab(root, home) as (url, token), \
            notebook_page(browser, url, token, notebook.name, len(release.cells), tmp_path) as page:
        cells = page.locator(".jp-Notebook .jp-Cell")
        answer_cell = {name: cells.nth(cell_index(release, name)) for name in answers}
        test_cell = {name: cells.nth(cell_index(release, f"test_{name}")) for name in answers}

        # Run all: the first test fails on the unanswered linear_betas, and the run stops there.
        run_all(page, timeout_s=60)
        first = output_text(test_cell["linear_betas"])
        assert "NotImplementedError" in first and "def linear_betas(" in first, first
        assert test_cell["cosine_betas"].locator(".jp-InputPrompt").text_content().strip() == "[ ]:"

        # Run the rest one answer and test at a time: each test names its unanswered function.
        for name in answers[1:]:
            run_cell(page, answer_cell[name])
            run_cell(page, test_cell[name])
            text = output_text(test_cell[name])
            assert "NotImplementedError" in text and f"def {name}(" in text, f"test_{name} shows:\n{text}"

        # A wrong answer: the test says in plain words what is wrong.
        type_answer(page, answer_cell["linear_betas"], wrong)
        run_all(page, timeout_s=60)
        text = output_text(test_cell["linear_betas"])
        assert "AssertionError" in text and "expected T = 1000 values, shape (1000,); got (999,)" in text, text

        # The right answer, saved: its test passes quietly; the next function's test still fails.
        type_answer(page, answer_cell["linear_betas"], right)
        tab = page.locator("#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current")
        assert "jp-mod-dirty" in tab.get_attribute("class"), "typing marks the notebook unsaved"
        page.keyboard.press("Control+s")
        page.locator("#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current:not(.jp-mod-dirty)").wait_for(timeout=20_000)
        saved = nbformat.read(notebook, as_version=4).cells[cell_index(release, "linear_betas")].source
        assert saved == right, f"the notebook file holds the typed answer:\n{saved}"
        run_all(page, timeout_s=60)
        passed = test_cell["linear_betas"]
        assert re.fullmatch(r"\[\d+\]:", passed.locator(".jp-InputPrompt").text_content().strip()), "the test ran"
        assert passed.locator(".jp-OutputArea-output").count() == 0, \
            f"a passing test prints nothing:\n{output_text(passed)}"
        text = output_text(test_cell["cosine_betas"])
        assert "NotImplementedError" in text and "def cosine_betas(" in text, text
        passed.scroll_into_view_if_needed()
        page.screenshot(path=str(tmp_path / "student-run.png"))  # what the student sees, kept in pytest's tmp_path
    print(f"\nassignment in JupyterLab: {time.monotonic() - start:.1f} s; screenshot {tmp_path / 'student-run.png'}")


def test_the_chapter_slider_redraws_the_figure_live(browser, tmp_path):
    import jupytext
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    start = time.monotonic()
    root, home = tmp_path / "work", tmp_path / "jupyter"
    root.mkdir()
    chapter = jupytext.read(ROOT / "chapters" / "01_forward_process.md")
    notebook = root / "01_forward_process.ipynb"
    jupytext.write(chapter, notebook)
    slider = next(i for i, c in enumerate(chapter.cells) if "plot.timestep_slider(" in c.source)

    with jupyterlab(root, home) as (url, token), \
            notebook_page(browser, url, token, notebook.name, len(chapter.cells), tmp_path) as page:
        run_all(page, timeout_s=240)
        prompts = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").all_text_contents()
        unrun = [i for i, p in enumerate(prompts) if not re.fullmatch(r"\[\d+\]:", p.strip())]
        if unrun:
            failed = page.locator(".jp-Notebook .jp-CodeCell").nth(max(unrun[0] - 1, 0))
            pytest.fail(f"Run All stopped: code cells {unrun} did not run:\n{output_text(failed)}")

        cell = page.locator(".jp-Notebook .jp-Cell").nth(slider)
        readout = cell.locator(".widget-slider .widget-readout")
        image = cell.locator(".widget-output img")
        image.wait_for(timeout=30_000)
        assert readout.inner_text().strip() == "0"
        first = image.get_attribute("src")
        assert first.startswith("data:image/png;base64,")

        handle = cell.locator(".widget-slider .noUi-handle")
        handle.focus()
        page.keyboard.press("End")  # the slider's keyboard control: jump to the last step
        try:
            page.wait_for_function("([img, src]) => img.isConnected ? img.src !== src : true",
                                   arg=[image.element_handle(), first], timeout=30_000)
        except PlaywrightTimeout:
            pytest.fail(f"moving the slider (readout {readout.inner_text()!r}) did not redraw the figure in 30 s")
        image.wait_for(timeout=30_000)  # the new figure (the output is cleared, then redrawn)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                               timeout=10_000)
        assert readout.inner_text().strip() == "999"
        assert image.get_attribute("src") != first, "moving the slider redraws the figure"
    print(f"\nchapter slider in JupyterLab: {time.monotonic() - start:.1f} s")
