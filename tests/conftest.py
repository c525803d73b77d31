"""Shared fixtures: where the build put things, and the budgets printed after every run."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from build import budget_lines, is_notebook_source  # noqa: E402  (tools/build.py)

BUILD = ROOT / "_build"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def chapter_sources() -> list[Path]:
    """The notebook chapters: MyST markdown files whose front matter names a kernel."""
    return [p for p in sorted((ROOT / "chapters").glob("*.md")) if is_notebook_source(p)]


@pytest.fixture(scope="session")
def executed_dir() -> Path:
    path = BUILD / "executed"
    if not path.exists():
        pytest.fail("no executed notebooks: run `make book` (or `make test`, which builds first)")
    return path


@pytest.fixture(scope="session")
def site_dir() -> Path:
    path = BUILD / "html"
    if not (path / "index.html").exists():
        pytest.fail("no website in _build/html: run `make book` (or `make test`, which builds first)")
    return path


def build_timings() -> dict | None:
    """The last full build's ``{"jobs", "threads", "wall_seconds", "notebooks": [rows]}`` (tools/build.py)."""
    path = BUILD / "timings.json"
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    if isinstance(run, list):  # written by an older build.py: one at a time, rows only
        run = {"jobs": 1, "threads": "all", "wall_seconds": sum(r["seconds"] for r in run), "notebooks": run}
    return run


def pytest_terminal_summary(terminalreporter):
    """Print the notebook budgets after every run: the table the last build printed (tools/build.py)."""
    run = build_timings()
    if run is None:
        return
    header, *table = budget_lines(run)
    terminalreporter.section(f"notebook budgets (last build: {header})")
    for line in table:
        terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's), one per test module: the site tests and the JupyterLab tests."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium not found: `make system` installs Debian's chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        yield browser
        browser.close()
