"""The assignments grade fairly: nbgrader, our config and tools/grade.py, end to end.

Each test builds a throw-away course in tmp_path from the repository's nbgrader_config.py,
solutions/ and tools/grade.py, submits notebooks to it as students would, runs the real
``nbgrader`` commands and reads the scores back from the gradebook. Most submissions share
one ``nbgrader autograde`` run (kernels take seconds to start). Nothing is written to the
repository.
"""

from __future__ import annotations

import copy
import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbgrader.api import Gradebook
from traitlets.config.loader import PyFileConfigLoader

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENT = "schedule_math"
NOTEBOOK = f"{ASSIGNMENT}.ipynb"
SOURCE = ROOT / "solutions" / ASSIGNMENT / NOTEBOOK
RELEASE = ROOT / "assignments" / ASSIGNMENT / NOTEBOOK
COURSE_ID = PyFileConfigLoader("nbgrader_config.py", path=str(ROOT)).load_config().CourseDirectory.course_id


# ------------------------------------------------------------------------------ helpers
def make_course(path: Path) -> Path:
    """A course directory like the repository's, minus everything grading does not need."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "nbgrader_config.py", path)
    shutil.copytree(ROOT / "solutions", path / "solutions")
    (path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "grade.py", path / "tools")
    return path


def env(course: Path) -> dict:
    """Offline, with this venv's scripts on PATH (nbgrader calls `alembic`), and a gradebook in tmp."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "NBGRADER_DB_URL": f"sqlite:///{course / 'gradebook.db'}",
    }


def run(course: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a command in the course directory; stdout and stderr together in .stdout."""
    return subprocess.run(args, cwd=course, env=env(course), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    return run(course, sys.executable, "-m", "nbgrader", *args)


def submit(course: Path, student: str, nb) -> None:
    folder = course / "submitted" / student / ASSIGNMENT
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / NOTEBOOK)


def grade_id(cell) -> str | None:
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def cell(nb, gid: str):
    return next(c for c in nb.cells if grade_id(c) == gid)


def source_nb():
    return nbformat.read(SOURCE, as_version=4)


def edited(gid: str, old: str, new: str, nb=None):
    """The solution notebook with one answer cell edited (a plausible student mistake)."""
    nb = copy.deepcopy(nb or source_nb())
    answer = cell(nb, gid)
    assert old in answer.source, f"the solution of {gid} changed: update this test's edit"
    answer.source = answer.source.replace(old, new)
    return nb


def scores(course: Path, student: str) -> tuple[float, float, dict[str, float]]:
    """(score, max_score, {test cell: score}) from the gradebook."""
    with Gradebook(env(course)["NBGRADER_DB_URL"], COURSE_ID) as gb:
        submission = gb.find_submission(ASSIGNMENT, student)
        nb = gb.find_notebook(Path(NOTEBOOK).stem, ASSIGNMENT)
        grades = {g.name: gb.find_grade(g.name, nb.name, ASSIGNMENT, student).score for g in nb.grade_cells}
        return submission.score, submission.max_score, grades


def points() -> dict[str, float]:
    """Points of every graded test cell, from the source notebook."""
    return {grade_id(c): c.metadata.nbgrader["points"] for c in source_nb().cells
            if c.metadata.get("nbgrader", {}).get("grade")}


def lost(course: Path, student: str) -> set[str]:
    """The test cells on which this student lost points."""
    _, _, grades = scores(course, student)
    return {name for name, score in grades.items() if score < points()[name]}


# Plausible wrong answers, and the test cells each must fail (and only those: the tests of
# one function do not punish a student twice for a mistake made elsewhere, except the
# "putting it together" test, which is about linear_betas + alpha_bar by design).
MISTAKES = {
    "alpha_bar_off_by_one": (  # alpha_bar[0] = 1: forgets that step 0 already adds noise
        ("alpha_bar", "return torch.cumprod(1 - betas, dim=0)",
         "return torch.cat([torch.ones(1, dtype=betas.dtype), torch.cumprod(1 - betas, dim=0)[:-1]])"),
        {"test_alpha_bar", "test_linear_alpha_bar_first_step"}),
    "q_sample_no_sqrt": (  # mixes with variances instead of standard deviations
        ("q_sample", "alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps",
         "alpha_bar_t * x0 + (1 - alpha_bar_t) * eps"),
        {"test_q_sample"}),
    "linear_reversed": (  # ramps from beta_end down to beta_start
        ("linear_betas", "torch.linspace(beta_start, beta_end, T", "torch.linspace(beta_end, beta_start, T"),
        {"test_linear_betas", "test_linear_alpha_bar_first_step"}),
    "snr_inverted": (  # noise over signal
        ("snr", "return alpha_bar / (1 - alpha_bar)", "return (1 - alpha_bar) / alpha_bar"),
        {"test_snr"}),
    "cosine_uncapped": (  # forgets max_beta, so the last beta is 1
        ("cosine_betas", "return betas.clamp(max=max_beta)", "return betas"),
        {"test_cosine_betas"}),
    "first_step_not_strict": (  # <= instead of <
        ("first_step_below", "(values < threshold)", "(values <= threshold)"),
        {"test_first_step_below"}),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> Path:
    """One course, many students, one `nbgrader autograde` run."""
    course = make_course(tmp_path_factory.mktemp("course"))
    generated = nbgrader(course, "generate_assignment", ASSIGNMENT, "--force")
    assert generated.returncode == 0, generated.stdout

    submit(course, "solution", source_nb())
    submit(course, "release", nbformat.read(RELEASE, as_version=4))
    for student, (edit, _) in MISTAKES.items():
        submit(course, student, edited(*edit))

    # The inverted snr, and the student "fixes" the failing test by gutting it.
    nb = edited(*MISTAKES["snr_inverted"][0])
    cell(nb, "test_snr").source = "pass"
    submit(course, "snr_inverted_test_gutted", nb)

    # The missing square roots, and the student deletes the failing test.
    nb = edited(*MISTAKES["q_sample_no_sqrt"][0])
    nb.cells.remove(cell(nb, "test_q_sample"))
    submit(course, "q_sample_no_sqrt_test_deleted", nb)

    # A correct notebook without its last test cell (which follows a markdown cell).
    nb = source_nb()
    nb.cells.remove(cell(nb, "test_linear_alpha_bar_first_step"))
    submit(course, "last_test_deleted", nb)

    result = nbgrader(course, "autograde", ASSIGNMENT, "--create")
    assert result.returncode == 0, result.stdout
    return course


# ------------------------------------------------------------------------------ the tests
def test_solution_scores_full_marks(graded):
    """The instructor's own answers must pass every visible and hidden test, or the tests are wrong."""
    score, max_score, _ = scores(graded, "solution")
    assert max_score == sum(points().values()) > 0
    assert score == max_score


def test_untouched_release_scores_zero(graded):
    """Submitting the release unchanged earns nothing: no test passes on `raise NotImplementedError()`."""
    score, max_score, grades = scores(graded, "release")
    assert max_score == sum(points().values())
    assert score == 0, grades


@pytest.mark.parametrize("student", sorted(MISTAKES))
def test_plausible_mistake_loses_the_points_of_its_tests(graded, student):
    """Each common mistake fails the tests aimed at its function (hidden tests included), and only those."""
    score, max_score, _ = scores(graded, student)
    expected = MISTAKES[student][1]
    assert lost(graded, student) == expected
    assert score == max_score - sum(points()[name] for name in expected)


def test_gutted_test_cell_is_restored(graded):
    """Replacing a test's body with `pass` does not help: grading runs the instructor's test cell."""
    assert lost(graded, "snr_inverted_test_gutted") == {"test_snr"}


def test_deleted_test_cell_is_restored_and_still_counts(graded):
    """Deleting a failing test does not shrink the maximum: the cell is put back, run and failed."""
    score, max_score, _ = scores(graded, "q_sample_no_sqrt_test_deleted")
    assert max_score == sum(points().values())
    assert lost(graded, "q_sample_no_sqrt_test_deleted") == {"test_q_sample"}
    assert score == max_score - points()["test_q_sample"]


def test_deleted_test_after_markdown_is_restored(graded):
    """nbgrader 0.9.6 crashes restoring a test whose previous source cell is locked markdown; ours avoid that."""
    score, max_score, _ = scores(graded, "last_test_deleted")
    assert score == max_score == sum(points().values())


def test_infinite_loop_costs_only_its_answer(graded):
    """A cell past the timeout is interrupted and fails; every other test still runs and earns its points."""
    submit(graded, "loops", edited("q_sample", "### BEGIN SOLUTION", "while True:\n        pass"))
    result = nbgrader(graded, "autograde", ASSIGNMENT, "--student=loops", "--create", "--Execute.timeout=10")
    assert result.returncode == 0, result.stdout
    assert "Timeout waiting for execute reply" in result.stdout
    score, max_score, _ = scores(graded, "loops")
    assert lost(graded, "loops") == {"test_q_sample"}
    assert score == max_score - points()["test_q_sample"]


def test_grade_py_survives_a_crashing_student(tmp_path):
    """tools/grade.py grades everyone, reports the student whose kernel died, exports, then exits 1."""
    course = make_course(tmp_path / "course")
    inbox = tmp_path / "inbox"  # --submitted: a folder outside the course
    for student, nb in [("good", source_nb()),
                        ("crashes", edited("alpha_bar", "### BEGIN SOLUTION", "import os; os._exit(1)"))]:
        (inbox / student / ASSIGNMENT).mkdir(parents=True)
        nbformat.write(nb, inbox / student / ASSIGNMENT / NOTEBOOK)

    result = run(course, sys.executable, "tools/grade.py", ASSIGNMENT, "--submitted", str(inbox))
    assert result.returncode == 1, result.stdout
    table = dict(re.findall(r"^(good|crashes) +(.+)$", result.stdout, re.M))
    total = sum(points().values())
    assert table["good"] == f"{total:g} / {total:g}", result.stdout
    assert table["crashes"].startswith("FAILED: kernel died"), result.stdout

    assert scores(course, "good")[0] == total
    with open(course / "grades.csv", newline="") as f:
        rows = {row["student_id"]: row for row in csv.DictReader(f) if row["assignment"] == ASSIGNMENT}
    assert float(rows["good"]["score"]) == float(rows["good"]["max_score"]) == total, rows
    assert (course / "feedback" / "good" / ASSIGNMENT / f"{ASSIGNMENT}.html").exists()
    assert not (tmp_path / "course" / "assignments").exists(), "grade.py must not rewrite the release"


def test_release_is_generated_from_solutions(graded):
    """assignments/ is exactly what `nbgrader generate_assignment` makes of solutions/: no drift."""
    fresh = nbformat.read(graded / "assignments" / ASSIGNMENT / NOTEBOOK, as_version=4)
    committed = nbformat.read(RELEASE, as_version=4)
    assert fresh.metadata == committed.metadata
    assert [(c.cell_type, c.source, c.metadata) for c in fresh.cells] == \
        [(c.cell_type, c.source, c.metadata) for c in committed.cells]
    assert all(not c.get("outputs") for c in committed.cells), "commit the release without outputs"


def block(source: str, name: str) -> list[str]:
    """The stripped, non-blank lines between ### BEGIN name and ### END name."""
    found = re.findall(rf"### BEGIN {name}\n(.*?)### END {name}", source, re.S)
    return [line.strip() for text in found for line in text.splitlines() if line.strip()]


def test_release_contains_no_answers_or_hidden_tests():
    """Students must not find the answers or the hidden tests in the notebook they are given."""
    text = RELEASE.read_text()
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
        assert marker not in text
    release = {grade_id(c): c.source for c in nbformat.read(RELEASE, as_version=4).cells}
    checked = 0
    for source_cell in source_nb().cells:
        src = source_cell.source
        secret = block(src, "SOLUTION") + block(src, "HIDDEN TESTS")
        if not secret:
            continue
        outside = re.sub(r"### BEGIN (SOLUTION|HIDDEN TESTS)\n.*?### END \1", "", src, flags=re.S)
        public = {line.strip() for line in outside.splitlines()}  # e.g. `else:` may be in both
        released = {line.strip() for line in release[grade_id(source_cell)].splitlines()}
        for line in secret:
            if line not in public:
                assert line not in released, f"{grade_id(source_cell)} leaks: {line}"
                checked += 1
    assert checked > 50, "the check found almost no solution or hidden-test lines to look for"
