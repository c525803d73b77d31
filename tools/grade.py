"""Grade every submission of one assignment: the instructor's one command.

Usage, from the repository root (the folder holding nbgrader_config.py):

    python tools/grade.py ASSIGNMENT [--submitted DIR] [extra nbgrader autograde options]

for example ``python tools/grade.py schedule_math`` or
``python tools/grade.py schedule_math --submitted ~/inbox --Execute.timeout=60``.

Submissions use nbgrader's layout, ``DIR/<student_id>/ASSIGNMENT/ASSIGNMENT.ipynb``; DIR
defaults to ``submitted/`` in the course root. The steps:

1. ``nbgrader generate_assignment`` records the assignment, its tests and hidden tests in the
   gradebook (the release it writes goes to a temporary folder: ``assignments/`` is untouched);
2. ``nbgrader autograde`` once per student (students are created as needed), so a submission
   that kills its kernel (``os._exit``, a segfault, memory) fails alone;
3. ``nbgrader generate_feedback`` writes HTML reports to ``feedback/`` (for the instructor);
4. ``nbgrader export`` writes every score to ``grades.csv``; a table is printed, with what the
   integrity check (tools/integrity.py, run inside step 2) found in each submission: a
   submission *held for review* tampered with the kernel, the interpreter or the tests, was not
   run and scored 0; an answer *not the student's own* delegated to the course's helpers, a
   library or a test's reference and lost those tests. The findings are in
   ``integrity/ASSIGNMENT/STUDENT.json``.

The exit status is 0 when every submission was graded and 1 when any failed, decided only
after everyone else has been graded and the grades exported.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

COURSE_ROOT = Path(__file__).resolve().parent.parent


def nbgrader(*args: str) -> subprocess.CompletedProcess:
    """Run ``python -m nbgrader ARGS`` in the course root and capture its log."""
    env = dict(os.environ)
    # nbgrader calls the `alembic` script when it creates a gradebook; it lives next to python.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=COURSE_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def check(step: str, result: subprocess.CompletedProcess) -> None:
    """Stop with nbgrader's log when a step that concerns everyone fails."""
    if result.returncode != 0:
        sys.exit(f"{result.stdout}\n`nbgrader {step}` failed (log above).")


def errors(log: str, limit: int = 15) -> str:
    """nbgrader's ERROR lines: enough to see why one student failed."""
    lines = [line for line in log.splitlines() if "ERROR" in line]
    return "\n".join(lines[:limit]) or log[-2000:]


def integrity_report(name: str, student: str) -> dict:
    """What tools/integrity.py found in one submission ({} if it has not been checked)."""
    path = COURSE_ROOT / "integrity" / name / f"{student}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("assignment", help="assignment name, e.g. schedule_math")
    parser.add_argument("--submitted", type=Path, default=COURSE_ROOT / "submitted",
                        help="folder of <student_id>/<assignment>/ (default: submitted/)")
    args, autograde_options = parser.parse_known_args()
    name, submitted = args.assignment, args.submitted.resolve()

    students = sorted(p.parent.name for p in submitted.glob(f"*/{name}") if p.is_dir())
    if not students:
        sys.exit(f"No submissions found: expected {submitted}/<student_id>/{name}/{name}.ipynb")

    with tempfile.TemporaryDirectory() as release:
        check("generate_assignment", nbgrader(
            "generate_assignment", name, "--force", f"--CourseDirectory.release_directory={release}"))

    failed = {}  # student -> reason
    for student in students:
        print(f"grading {student} ...", flush=True)
        result = nbgrader("autograde", name, f"--student={student}", "--create", "--force",
                          f"--CourseDirectory.submitted_directory={submitted}", *autograde_options)
        if result.returncode != 0:
            died = "Kernel died" in result.stdout
            failed[student] = "kernel died" if died else "could not grade"
            print(f"--- {student}: nbgrader errors ---\n{errors(result.stdout)}\n", file=sys.stderr)

    if len(failed) < len(students):
        check("generate_feedback", nbgrader("generate_feedback", name, "--force"))
    check("export", nbgrader("export", "--to", str(COURSE_ROOT / "grades.csv")))

    with open(COURSE_ROOT / "grades.csv", newline="") as f:
        rows = {r["student_id"]: r for r in csv.DictReader(f) if r["assignment"] == name}
    width = max(len(s) for s in students + ["student"])
    print(f"\n{'student':<{width}}  score ({name})")
    reports = {}
    for student in students:
        if student in failed:
            outcome = f"FAILED: {failed[student]}, scored 0 (see the errors above)"
        else:
            row = rows[student]
            outcome = f"{float(row['score']):g} / {float(row['max_score']):g}"
            reports[student] = report = integrity_report(name, student)
            if report.get("held_for_review"):
                outcome += "   HELD FOR REVIEW: tampering, not run"
            elif report.get("findings"):
                outcome += "   answers not the student's own lost their tests"
        print(f"{student:<{width}}  {outcome}")
    for student, report in reports.items():
        if report.get("findings"):
            print(f"\n{student}: {'held for review' if report['held_for_review'] else 'not their own answer'}")
            for f in report["findings"]:
                print(f"  - {f['kind']}: {f['cell']}, line {f['line']}: {f['what']}")
    print(f"\ngrades: {COURSE_ROOT / 'grades.csv'}   feedback: {COURSE_ROOT / 'feedback'}/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
