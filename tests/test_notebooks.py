"""The executed notebooks of the last build: complete, error-free, their own checks passed."""

from __future__ import annotations

import json

import nbformat
import pytest

from conftest import ROOT, build_timings, chapter_sources

CHAPTERS = chapter_sources()


def test_there_are_chapters_to_check():
    assert CHAPTERS, "no notebook chapters found in chapters/"


@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_executed_cleanly_with_figures_and_checks(source, executed_dir):
    path = executed_dir / "chapters" / f"{source.stem}.ipynb"
    assert path.exists(), f"{source.name} was not executed by the last build"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"error outputs in {path.name}: {[e['ename'] for e in errors]}"
    # Every cell that should run did run (skip-execution cells are the live-only ones).
    for cell in code:
        if "skip-execution" not in cell.metadata.get("tags", []):
            assert cell.get("execution_count") is not None or cell.metadata.get("papermill", {}).get("status") == "completed"
    tags = [t for c in code for t in c.metadata.get("tags", [])]
    assert tags.count("parameters") == 1, "exactly one papermill parameters cell"
    if source.stem[0].isdigit():  # a chapter trains or samples, so it takes the device (the errata page computes on the CPU)
        assert "device" in next(c.source for c in code if "parameters" in c.metadata.get("tags", []))
    pngs = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    assert pngs >= 3, "a chapter shows its figures"
    stdout = "".join(o.get("text", "") for o in code[-1].get("outputs", []) if o.get("name") == "stdout")
    assert "checks passed" in stdout, "the chapter's last cell checks its own numbers"


def test_chapter_sources_are_text_without_outputs():
    """Chapters are MyST markdown (diffable); notebooks in git carry no outputs."""
    for source in CHAPTERS:
        assert source.suffix == ".md"
    assert not list((ROOT / "chapters").glob("*.ipynb"))
    for nb_path in list((ROOT / "solutions").rglob("*.ipynb")) + list((ROOT / "assignments").rglob("*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), nb_path


def test_no_chapter_output_is_a_widget(executed_dir):
    """Widget outputs (e.g. a library's tqdm bar) need a kernel or the widget manager's fonts: not on a static page."""
    for source in CHAPTERS:
        nb = nbformat.read(executed_dir / "chapters" / f"{source.stem}.ipynb", as_version=4)
        widgets = [o["data"].get("text/plain", "")[:60] for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
        assert not widgets, f"{source.name}: widget outputs {widgets}"


def test_every_solution_notebook_executed_without_errors(executed_dir):
    for nb_path in sorted((ROOT / "solutions").glob("*/*.ipynb")):
        out = executed_dir / nb_path.relative_to(ROOT)
        assert out.exists(), f"{nb_path} was not executed by the last build"
        nb = nbformat.read(out, as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{out.name}: {[e['ename'] + ': ' + e['evalue'] for e in errors]}"


def test_build_recorded_a_time_for_every_notebook():
    run = build_timings()
    assert run is not None, "no _build/timings.json: run `make book`"
    timings = run["notebooks"]
    recorded = {t["notebook"] for t in timings}
    expected = {f"chapters/{p.stem}.ipynb" for p in CHAPTERS}
    expected |= {str(p.relative_to(ROOT)) for p in (ROOT / "solutions").glob("*/*.ipynb")}
    assert expected <= recorded
    assert all(t["seconds"] > 0 for t in timings)
    assert 0 < run["wall_seconds"] <= sum(t["seconds"] for t in timings) + 60  # side by side, never slower than in turn
    # the budgets are held in reference seconds: this machine's seconds times its measured speed
    assert 0 < run["speed"] and all(abs(t["reference_seconds"] - t["seconds"] * run["speed"]) <= 0.1 for t in timings)
