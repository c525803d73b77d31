"""tools/build.py's GPU profile (in its dry form, which a CPU can run) and its machine-speed units."""

import subprocess
import sys

import build  # tools/build.py (conftest puts tools/ on the path)
import pytest

from conftest import ROOT, chapter_sources

HEADER = ("---\njupytext:\n  text_representation:\n    extension: .md\n    format_name: myst\n"
          "kernelspec:\n  display_name: Python 3\n  language: python\n  name: python3\n---\n\n")
CHAPTERS = chapter_sources()


@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_documents_gpu_values_of_its_own_parameters(source):
    values = build.profile_parameters(source, "gpu")  # raises on a value that is no literal or of another type
    assert values, f"{source.name}: no parameter documents a GPU value ('# ... | gpu: VALUE')"
    names = {line.split("=")[0].strip() for line in build.parameters_cell(source).splitlines() if "=" in line}
    assert set(values) <= names


def test_the_dry_run_prints_every_chapter_at_its_gpu_values_on_cuda():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "build.py"), "--profile", "gpu", "--dry-run"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    lines = dict(line.split(": ", 1) for line in out.splitlines() if line.startswith("chapters/"))
    assert set(lines) == {str(p.relative_to(ROOT)) for p in CHAPTERS}
    assert all('"device": "cuda"' in v for v in lines.values())


def test_a_profile_value_of_the_wrong_type_or_no_literal_is_named(tmp_path):
    page = tmp_path / "page.md"
    for line, message in [("n_eval = 600  # digits | gpu: 5000.5", "n_eval = 600 but its gpu value is 5000.5"),
                          ("steps = [1, 2]  # steps | gpu: 4", "steps = \\[1, 2\\] but its gpu value is 4"),
                          ("n = 3  # n | gpu: big", "n's gpu value 'big' is not a literal")]:
        page.write_text(HEADER + f"```{{code-cell}} ipython3\n:tags: [parameters]\n\n{line}\n```\n")
        with pytest.raises(ValueError, match=message):
            build.profile_parameters(page, "gpu")
    page.write_text(page.read_text().replace("n = 3  # n | gpu: big", "model_id = None  # a folder | gpu: \"runwayml/sd\""))
    assert build.profile_parameters(page, "gpu") == {"model_id": "runwayml/sd"}


def test_the_speed_workload_is_short_and_the_reference_is_set():
    assert build.REFERENCE_S > 0
    here = build.speed_workload(1)
    assert 0 < here < 60, here


def test_the_budgets_are_held_in_reference_seconds():
    """A 300 s notebook on a machine at speed 0.7 is 210 reference seconds: within 240; at speed 1, over."""
    row = {"notebook": "chapters/x.ipynb", "seconds": 300.0, "budget": build.CHAPTER_BUDGET_S}
    slow = {"jobs": 2, "threads": 1, "wall_seconds": 300.0, "speed": 0.7, "reference_wall_seconds": 210.0,
            "notebooks": [row | {"reference_seconds": 210.0}]}
    assert not any("OVER BUDGET" in line for line in build.budget_lines(slow))
    fast = slow | {"speed": 1.0, "notebooks": [row | {"reference_seconds": 300.0}]}
    assert "OVER BUDGET" in next(line for line in build.budget_lines(fast) if line.startswith("chapters/x"))
