"""Shared fixtures: where the build put things, and the budgets printed after every run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def chapter_sources() -> list[Path]:
    """The notebook chapters: MyST markdown files whose front matter names a kernel."""
    return [
        p for p in sorted((ROOT / "chapters").glob("*.md"))
        if p.read_text(encoding="utf-8").startswith("---") and "kernelspec:" in p.read_text(encoding="utf-8")[:600]
    ]


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
    """Print the notebook budgets (seconds per notebook, from the last build) after every run."""
    run = build_timings()
    if run is None:
        return
    tr = terminalreporter
    speed = run.get("speed")  # older builds measured no machine speed: their seconds stand for reference seconds
    tr.section(f"notebook budgets (last build: {run['jobs']} at a time, {run['threads']} thread(s) each"
               + (f"; machine speed {speed:.2f}, budgets in reference seconds = seconds x {speed:.2f})" if speed else ")"))
    for row in run["notebooks"]:
        ref = row.get("reference_seconds", row["seconds"])
        flag = "" if ref <= row["budget"] else "  OVER BUDGET"
        tr.write_line(f"{row['notebook']:<52} {row['seconds']:>7.1f} s = {ref:>6.1f} ref. s / {row['budget']}{flag}")
    tr.write_line(f"{'sum of the notebooks':<52} {sum(r['seconds'] for r in run['notebooks']):>7.1f} s")
    ref_wall = run.get("reference_wall_seconds", run["wall_seconds"])
    flag = "" if ref_wall <= 1800 else "  OVER BUDGET"
    tr.write_line(f"{'wall clock (the course budget)':<52} {run['wall_seconds']:>7.1f} s = {ref_wall:>6.1f} ref. s / 1800{flag}")


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
