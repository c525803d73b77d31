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
