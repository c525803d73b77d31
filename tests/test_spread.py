"""tools/spread.py: a chapter's asserts become recorded checks that report values and never stop the run."""

from __future__ import annotations

import json
import sys

import nbformat
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import spread  # noqa: E402

CHAPTER = """---
jupytext:
  text_representation: {extension: .md, format_name: myst}
kernelspec: {display_name: Python 3, language: python, name: python3}
---

```{code-cell} ipython3
x = 3
assert x < 5 and x > 4, "the second term fails"
for k in (1, 2):
    assert k * x >= 3
def inner(v):
    assert v > 0  # inside a function: stays an assert
    return v
assert inner(x) == 3
```
"""


@pytest.fixture()
def checks(tmp_path, monkeypatch):
    source, target, results = tmp_path / "ch.md", tmp_path / "ch.ipynb", tmp_path / "checks.jsonl"
    source.write_text(CHAPTER)
    spread.instrument(source, target)
    monkeypatch.setenv("SPREAD_RESULTS", str(results))
    monkeypatch.setenv("SPREAD_THREADS", "1")
    import torch

    threads = torch.get_num_threads()
    nb = nbformat.read(target, as_version=4)
    scope: dict = {}
    try:
        for cell in nb.cells:  # what the kernel would run, in order: the recorder first
            exec(cell.source, scope)
    finally:
        torch.set_num_threads(threads)
    return nb, scope, [json.loads(line) for line in results.read_text().splitlines()]


def test_the_recorder_runs_first_and_asserts_are_rewritten(checks):
    nb, _, _ = checks
    assert "_spread_check" in nb.cells[0].source and "set_num_threads" in nb.cells[0].source
    body = nb.cells[1].source
    assert body.count("_spread_check(") == 3
    assert "assert v > 0" in body  # the function's own assert is left alone


def test_a_failing_term_is_recorded_and_does_not_stop_the_notebook(checks):
    _, scope, records = checks
    assert scope["x"] == 3  # the cell ran to its end although a check failed
    first = [r for r in records if r["source"].startswith("x < 5")]
    assert [(r["term"], r["ok"]) for r in first] == [("x < 5", True), ("x > 4", False)]
    assert first[0]["values"] == [3.0, 5.0] and first[0]["margin"] == pytest.approx(2 / 5)
    assert first[1]["margin"] == pytest.approx(-1 / 4)  # negative slack: by how much it failed


def test_a_check_in_a_loop_is_recorded_once_per_pass(checks):
    _, _, records = checks
    loop = [r for r in records if r["source"] == "k * x >= 3"]
    assert [(r["instance"], r["values"], r["ok"]) for r in loop] == [(1, [3.0, 3.0], True), (2, [6.0, 3.0], True)]
    assert loop[0]["margin"] == 0 and loop[1]["margin"] == pytest.approx(0.5)
    assert next(r for r in records if r["source"] == "inner(x) == 3")["ok"]


def test_the_report_aligns_runs_by_check_text_and_fails_on_any_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(spread, "OUT", tmp_path)

    def run(seed, where, value, ok):
        check = {"where": where, "instance": 1, "source": "a < 1", "term": "a < 1", "ok": ok,
                 "values": [value, 1.0], "margin": (1.0 - value) / max(abs(value), 1.0)}
        folder = tmp_path / "09_demo"
        folder.mkdir(exist_ok=True)
        (folder / f"seed{seed}-t1.json").write_text(json.dumps(
            {"chapter": "09_demo", "seed": seed, "threads": 1, "seconds": 1.0, "error": None, "checks": [check]}))

    run(1, "3:4", 0.5, True)
    run(2, "5:4", 0.8, True)  # the same check, in a cell that moved between the runs
    assert spread.report()
    rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| `a < 1`")]
    assert len(rows) == 1 and "0.5 vs 1" in rows[0] and "0.8 vs 1" in rows[0] and rows[0].endswith("+20% |")
    run(2, "5:4", 1.5, False)
    assert not spread.report() and "**FAIL** 1.5 vs 1" in (tmp_path / "report.md").read_text()
