#!/usr/bin/env bash
# A smoke test of the GPU profile for a machine with a GPU: the fastest chapters at their GPU-sized
# values on device cuda (tools/build.py --profile gpu), one at a time, no website. Prints each
# notebook's seconds; fails if a chapter fails. On a machine without a GPU, run the dry form:
#   .venv/bin/python tools/build.py --profile gpu --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here: run the dry form (see above)')"
export HF_HUB_OFFLINE=1 COURSE_CACHE=${COURSE_CACHE:-$PWD/_build/cache}
"$PY" tools/build.py --profile gpu --only 01_forward --only 04_guidance --only 06_sde --only 09_video. --no-site --jobs 1
