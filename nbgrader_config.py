"""nbgrader configuration for the course's assignments.

Instructors grade with ``python tools/grade.py ASSIGNMENT`` (see its docstring); the plain
``nbgrader`` commands also work when run from this folder.

* ``solutions/<assignment>/`` holds the source notebooks (answers and hidden tests);
  ``assignments/<assignment>/`` the released student versions, made by
  ``nbgrader generate_assignment <assignment>`` and committed (a test forbids drift).
* The gradebook is a throw-away SQLite file next to this config (git-ignored); set
  ``NBGRADER_DB_URL`` to use another database.
"""

import os

c = get_config()  # noqa: F821 (provided by traitlets when it loads this file)

course_root = os.path.dirname(os.path.abspath(__file__))

c.CourseDirectory.root = course_root
c.CourseDirectory.course_id = "diffusion-models"
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "assignments"
c.CourseDirectory.db_url = os.environ.get(
    "NBGRADER_DB_URL", "sqlite:///" + os.path.join(course_root, "gradebook.db")
)

# Students may delete or edit test cells; grading puts the instructor's versions back.
c.OverwriteCells.add_missing_cells = True

# A cell that runs longer than this is interrupted and counts as failed; the rest of the
# notebook still runs, so an infinite loop costs only the tests that call it.
c.Execute.timeout = 120
c.Execute.interrupt_on_timeout = True

# Grading the student's code cannot reach (tools/integrity.py): the submission's source is read
# before it runs; tampering is held for review and not run, an answer that delegates to the
# course's helpers, a library or a test's reference scores 0 on its tests, and a warning in a
# test cell no longer costs its points.
import sys  # noqa: E402

sys.path.insert(0, os.path.join(course_root, "tools"))
from integrity import IntegrityCheck, IntegrityScore  # noqa: E402
from nbconvert.preprocessors import ClearMetadataPreprocessor  # noqa: E402
from nbgrader.preprocessors import (  # noqa: E402
    AssignLatePenalties, CheckCellMetadata, Execute, IgnorePattern, LimitOutput, SaveAutoGrades)

c.Autograde.autograde_preprocessors = [
    IntegrityCheck, Execute, IntegrityScore, IgnorePattern, ClearMetadataPreprocessor, LimitOutput,
    SaveAutoGrades, AssignLatePenalties, CheckCellMetadata,
]
c.IntegrityCheck.source_directory = os.path.join(course_root, "solutions")
c.IntegrityCheck.report_directory = os.path.join(course_root, "integrity")
# What an assignment's text forbids, with the reason the student is shown.
c.IntegrityCheck.forbidden = {
    "video_patches": {
        name: "the tests compare with PyTorch's attention; the assignment asks you to write the softmax yourself"
        for name in ("scaled_dot_product_attention", "MultiheadAttention", "multi_head_attention_forward")
    },
}

# Feedback for students: hidden tests are not printed, failed tests show their message only.
from integrity import HideHiddenTests  # noqa: E402
from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor  # noqa: E402
from nbgrader.preprocessors import GetGrades  # noqa: E402

c.GenerateFeedback.preprocessors = [GetGrades, HideHiddenTests, CSSHTMLHeaderPreprocessor]
