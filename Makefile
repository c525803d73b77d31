# The course's commands. Two of them do everything on a fresh machine (see README.md):
#   make book   set up, execute every notebook once, build the website into _build/html
#   make test   set up, build, and run every test (what CI runs)
# Others: make grade ASSIGNMENT=schedule_math (autograde submitted/), make assignments
# (regenerate the student notebooks from solutions/), make clean.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ASSIGNMENT ?= schedule_math

# Nothing in the course may download weights or data at run time.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Trained models (helpers.zoo) are cached inside the build, so a clean build retrains them all.
export COURSE_CACHE := $(CURDIR)/_build/cache

.PHONY: book test setup system grade assignments clean

setup: $(VENV)/.installed

# torch==2.13.0 (pinned in requirements.txt) resolves to the CPU wheel; the lock keeps every
# other package at the version the course was tested with.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --editable .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (course)" >/dev/null
	touch $@

# Debian packages: Node.js/npm to vendor MathJax at build time, Chromium for the site tests.
# Only what is missing: a Node.js from NodeSource already bundles npm and conflicts with Debian's.
system:
	@missing=""; \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

book: setup system
	$(PY) tools/build.py

test: book
	$(PY) -m pytest --durations=25

grade: setup
	$(PY) tools/grade.py $(ASSIGNMENT)

# Regenerate every student notebook in assignments/ from solutions/ (never edit them by hand).
assignments: setup
	for d in solutions/*/; do PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m nbgrader generate_assignment "$$(basename $$d)" --force; done

clean:
	rm -rf _build
