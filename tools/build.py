"""Build the course: execute every notebook once with papermill, then build the website.

    python tools/build.py                 # everything (what `make book` runs)
    python tools/build.py --only 01       # execute only notebooks whose name contains "01"
    python tools/build.py --no-site       # execute, skip the website
    python tools/build.py --jobs 1        # one notebook at a time (default: two, one core each)
    python tools/build.py -p device cuda -p train_seconds 600   # papermill parameters
    python tools/build.py --profile gpu   # every chapter at its GPU-sized values (device cuda)
    python tools/build.py --profile gpu --dry-run   # print and check them, execute nothing

Pipeline (see DESIGN.md, "One execution, one build"):

    chapters/*.md --jupytext--> _build/notebooks/ --papermill--> _build/executed/
    _config.yml + _toc.yml + executed notebooks + assignments/ --jupyter-book--> _build/html

Solutions (solutions/*/*.ipynb) are executed too, to prove they run, but never published.
Notebooks run two at a time by default, each kernel with its share of the cores
(``OMP_NUM_THREADS``), so that two processes never fight over the same cores; the models they
share are trained once (``helpers.zoo.cache_lock``). The timings of every notebook, the wall
clock and the budgets they are held to are printed and written to ``_build/timings.json``.
Machines differ (the same commit ran 1.8x slower on one 2-core machine than on another), so the
build first times a fixed workload of the kind the chapters run and prints every notebook's time
also in reference seconds, the seconds it would have taken on the reference machine; the budgets
are held in those. MathJax, RequireJS and the widget manager are installed from npm
into ``_build/npm`` and copied into the site, so the pages load nothing from the internet.

GPU profile: a chapter's parameters cell documents its GPU-sized values at the end of a
parameter's comment, ``n_eval = 600  # digits per model | gpu: 5000``; ``--profile gpu``
executes every chapter with those values and ``device="cuda"`` (run-specific assertions hold
only for the defaults, so nothing fails for being bigger).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import multiprocessing
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build"
NOTEBOOKS, EXECUTED, SITE_SRC = BUILD / "notebooks", BUILD / "executed", BUILD / "site_src"
CHAPTER_BUDGET_S = 240  # DESIGN.md: each chapter at most 4 minutes on 2 CPU cores
COURSE_BUDGET_S = 30 * 60  # the whole course, chapters and solutions
# The reference machine: the speed workload below took this long there (one thread, quiet machine;
# this course's 2-core development machine, 2026-12-02). Reference seconds = seconds x REFERENCE_S /
# the workload's seconds here, so the same notebook reads about the same on a slower or faster machine.
REFERENCE_S = 1.23  # measured three times: 1.245, 1.226, 1.232 s
NPM_PACKAGES = ["mathjax@3.2.2", "@jupyter-widgets/html-manager@1.0.15", "requirejs@2.3.8"]


def is_notebook_source(path: Path) -> bool:
    """A MyST markdown file is a notebook when its front matter names a kernel."""
    head = path.read_text(encoding="utf-8")[:600]
    return head.startswith("---") and "kernelspec:" in head


def notebooks_to_execute(only: list[str] | None) -> list[tuple[Path, Path]]:
    """(source, runnable .ipynb) pairs: chapters converted by jupytext, solutions as they are."""
    import jupytext

    pairs = []
    for md in sorted((ROOT / "chapters").glob("*.md")):
        if is_notebook_source(md):
            target = NOTEBOOKS / "chapters" / f"{md.stem}.ipynb"
            target.parent.mkdir(parents=True, exist_ok=True)
            jupytext.write(jupytext.read(md), target)
            pairs.append((md, target))
    for nb in sorted((ROOT / "solutions").glob("*/*.ipynb")):
        pairs.append((nb, nb))
    return [p for p in pairs if only is None or any(o in p[0].name for o in only)]


# Which notebooks go first when they run side by side: those that train the models the others
# load (helpers.zoo: chapter 2 the digits model, 4 the tiny CLIP, 5 the VAE and miniature SD), then
# the longest. Any order is correct (the zoo's cache lock makes a notebook wait for a model that is
# being trained); this one keeps both workers busy.
FIRST = ["02_reverse", "04_guidance", "05_latent", "03_unet", "07_dit_flow", "06_ddim", "07_mmdit", "08_", "10_memorisation", "09_video_", "10_evaluation"]


def schedule(pairs: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    def rank(pair):
        name = pair[0].name
        return next((i for i, prefix in enumerate(FIRST) if name.startswith(prefix)), len(FIRST))

    return sorted(pairs, key=rank)  # stable: the rest keep their order


PROFILE_VALUE = re.compile(r"^(?P<name>[A-Za-z_]\w*)\s*=\s*(?P<default>.+?)\s*#.*\|\s*(?P<profile>\w+):\s*(?P<value>.+?)\s*$")


def parameters_cell(source: Path) -> str:
    """The source of a chapter's cell tagged ``parameters``."""
    import jupytext

    for cell in jupytext.read(source).cells:
        if "parameters" in cell.metadata.get("tags", []):
            return cell.source
    raise ValueError(f"{source.name} has no cell tagged 'parameters'")


def profile_parameters(source: Path, profile: str) -> dict:
    """A chapter's values for ``profile`` (``| gpu: VALUE`` at the end of a parameter's comment), checked.

    Each value must be a Python literal of its default's type (an int for an int, a list for a
    list; a string may replace ``None``), so a profile cannot pass a parameter the chapter lacks
    or a value it cannot read.
    """
    values = {}
    for line in parameters_cell(source).splitlines():
        match = PROFILE_VALUE.match(line.strip())
        if not match or match["profile"] != profile:
            continue
        name = match["name"]
        try:
            default, value = ast.literal_eval(match["default"]), ast.literal_eval(match["value"])
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"{source.name}: {name}'s {profile} value {match['value']!r} is not a literal") from error
        same_type = type(value) is type(default) or (default is None and isinstance(value, str)) or (
            isinstance(default, float) and isinstance(value, int))
        if not same_type:
            raise ValueError(f"{source.name}: {name} = {default!r} but its {profile} value is {value!r} "
                             f"({type(value).__name__}, not {type(default).__name__})")
        values[name] = value
    return values


def speed_workload(threads: int | None) -> float:
    """Seconds of a fixed workload of the kind the chapters run: training steps of the digits U-Net.

    The best of three repetitions of eight AdamW steps at batch 128 on 8 x 8 digits, after warm-up,
    in a fresh process with ``threads`` threads (as one notebook's kernel gets them).
    """
    code = (
        "import time, torch\n"
        "from helpers import models\n"
        "torch.manual_seed(0)\n"
        "model = models.digits_unet(widths=(32, 64, 64), attention=True)\n"
        "opt = torch.optim.AdamW(model.parameters(), lr=1e-3)\n"
        "x, t = torch.randn(128, 1, 8, 8), torch.randint(0, 1000, (128,))\n"
        "def steps(n):\n"
        "    for _ in range(n):\n"
        "        loss = (model(x, t).sample - x).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()\n"
        "steps(2)\n"
        "best = float('inf')\n"
        "for _ in range(3):\n"
        "    start = time.perf_counter(); steps(8); best = min(best, time.perf_counter() - start)\n"
        "print(best)\n"
    )
    env = dict(os.environ)
    if threads is not None:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_job(jobs: int) -> int | None:
    """Threads each notebook's kernel may use: the cores shared out, unless the user set OMP_NUM_THREADS.

    Two processes that each use every core collapse on a small machine (chapter 2 ran 6.8x slower
    beside a grading job); one thread each on two cores runs both at nearly full speed.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return int(os.environ["OMP_NUM_THREADS"])
    return None if jobs == 1 else max(1, usable_cpus() // jobs)


def execute_one(source: Path, runnable: Path, parameters: dict, threads: int | None) -> dict:
    """Execute one notebook with papermill (in a worker process); its timing row, or the error."""
    import papermill

    if threads is not None:  # the kernel papermill starts inherits these
        os.environ.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    rel = source.relative_to(ROOT).with_suffix(".ipynb")
    output = EXECUTED / rel
    output.parent.mkdir(parents=True, exist_ok=True)
    print(f"--- executing {rel}", flush=True)
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(runnable),
            str(output),
            parameters=parameters,
            cwd=str(source.parent),
            kernel_name="python3",
            progress_bar=False,
        )
    except Exception as error:  # papermill's errors do not all survive pickling: send the text
        return {"notebook": str(rel), "error": f"{type(error).__name__}: {error}"}
    seconds = time.perf_counter() - start
    print(f"    {rel}: {seconds:.1f} s", flush=True)
    return {"notebook": str(rel), "seconds": round(seconds, 1), "budget": CHAPTER_BUDGET_S,
            "threads": threads or usable_cpus()}


def notebook_parameters(pairs: list[tuple[Path, Path]], parameters: dict, profile: str | None) -> dict[Path, dict]:
    """Each notebook's papermill parameters: its profile's values (and the profile's device), then ``-p``'s."""
    chosen = {}
    for source, _ in pairs:
        if source.suffix != ".md":
            chosen[source] = {}  # solutions take no parameters
            continue
        values = {"device": "cuda", **profile_parameters(source, profile)} if profile == "gpu" else {}
        chosen[source] = {**values, **parameters}
    return chosen


def execute(pairs: list[tuple[Path, Path]], parameters: dict, jobs: int, profile: str | None = None) -> dict:
    """Execute the notebooks, ``jobs`` at a time, each in its own process and kernel.

    Returns ``{"jobs", "threads", "wall_seconds", "speed", "notebooks": [timing rows in course order]}``;
    ``speed`` is the reference machine's workload seconds over this machine's (below 1: slower).
    A failed notebook stops the build once the ones already running have finished.
    """
    # Offline; and training prints one summary line, not a live bar's redraws, on the pages.
    env_note = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COURSE_PROGRESS": "summary"}
    os.environ.update(env_note)
    os.environ.setdefault("COURSE_CACHE", str(BUILD / "cache"))  # helpers.zoo: retrained by a clean build
    threads = threads_per_job(jobs)
    chosen = notebook_parameters(pairs, parameters, profile)
    workload = speed_workload(threads)
    speed = round(REFERENCE_S / workload, 3)  # the one factor timings.json records, so rows recompute exactly
    print(f"machine speed: the reference workload took {workload:.2f} s here, {REFERENCE_S:.2f} s on the reference "
          f"machine (speed {speed:.2f}; reference seconds = seconds x {speed:.2f})", flush=True)
    print(f"executing {len(pairs)} notebooks, {jobs} at a time"
          + (f", {threads} thread(s) each" if threads else "") + (f", profile {profile}" if profile else ""), flush=True)
    start = time.perf_counter()
    rows, failed = {}, []
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked torch state
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(execute_one, source, runnable, chosen[source], threads) for source, runnable in schedule(pairs)]
        for future in as_completed(futures):
            if future.cancelled():
                continue
            row = future.result()
            if "error" in row:
                failed.append(row)
                print(f"FAILED {row['notebook']}: {row['error']}", flush=True)
                for other in futures:
                    other.cancel()  # those not started; the running ones finish
            else:
                rows[row["notebook"]] = row | {"reference_seconds": round(row["seconds"] * speed, 1)}
    if failed:
        sys.exit(f"{len(failed)} notebook(s) failed: {', '.join(r['notebook'] for r in failed)} (errors above)")
    order = [str(source.relative_to(ROOT).with_suffix(".ipynb")) for source, _ in pairs]
    wall = time.perf_counter() - start
    return {"jobs": jobs, "threads": threads or usable_cpus(), "wall_seconds": round(wall, 1), "speed": speed,
            "reference_wall_seconds": round(wall * speed, 1), "profile": profile, "notebooks": [rows[name] for name in order]}


def budget_lines(run: dict) -> list[str]:
    """The timing table (the build prints it, and pytest's summary again): seconds here, reference
    seconds (what the budgets hold) and the budget. A build older than the machine-speed
    measurement has no reference seconds: its seconds stand in for them."""
    timings, speed = run["notebooks"], run.get("speed")
    ref = [t.get("reference_seconds", t["seconds"]) for t in timings]
    lines = [f"{run['jobs']} at a time, {run['threads']} thread(s) each"
             + (f"; machine speed {speed:.2f}: reference seconds = seconds x {speed:.2f}; the budgets are in reference seconds"
                if speed else ""),
             f"{'notebook':<52} {'seconds':>8} {'ref. s':>8} {'budget':>7}"]
    for t, r in zip(timings, ref):
        lines.append(f"{t['notebook']:<52} {t['seconds']:>8.1f} {r:>8.1f} {t['budget']:>7}"
                     + ("" if r <= t["budget"] else "  OVER BUDGET"))
    lines.append(f"{'sum of the notebooks':<52} {sum(t['seconds'] for t in timings):>8.1f} {sum(ref):>8.1f}")
    wall = run.get("reference_wall_seconds", run["wall_seconds"])
    lines.append(f"{'wall clock (the course budget)':<52} {run['wall_seconds']:>8.1f} {wall:>8.1f} {COURSE_BUDGET_S:>7}"
                 + ("" if wall <= COURSE_BUDGET_S else "  OVER BUDGET"))
    return lines


def print_budgets(run: dict) -> None:
    header, *table = budget_lines(run)
    print(f"\nNotebook execution times ({header})", *table, "", sep="\n", flush=True)


def vendor_javascript() -> Path:
    """Install MathJax, RequireJS and the widget manager from npm (once) and return the folder."""
    npm = BUILD / "npm"
    marker = npm / "installed.json"
    if not marker.exists() or json.loads(marker.read_text()) != NPM_PACKAGES:
        npm.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--prefix", str(npm), "--no-audit", "--no-fund", "--loglevel=error", *NPM_PACKAGES],
            check=True,
        )
        marker.write_text(json.dumps(NPM_PACKAGES))
    vendor = SITE_SRC / "vendor"  # copied into the site's _static/ by html_static_path
    shutil.rmtree(vendor, ignore_errors=True)
    modules = npm / "node_modules"
    shutil.copytree(modules / "mathjax" / "es5", vendor / "mathjax")
    shutil.copy(modules / "requirejs" / "require.js", vendor / "require.js")
    shutil.copy(modules / "@jupyter-widgets" / "html-manager" / "dist" / "embed-amd.js", vendor / "embed-amd.js")
    shutil.copy(ROOT / "tools" / "course.css", vendor / "course.css")  # the course's own styles (_config.yml)
    return vendor


def stage_site() -> None:
    """Lay out the book's sources: config, bibliography, plain pages, executed notebooks, assignments."""
    shutil.rmtree(SITE_SRC, ignore_errors=True)
    SITE_SRC.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml", "references.bib"):
        shutil.copy(ROOT / name, SITE_SRC / name)
    shutil.copytree(ROOT / "chapters" / "images", SITE_SRC / "chapters" / "images")
    for md in (ROOT / "chapters").glob("*.md"):
        target = SITE_SRC / "chapters" / md.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not is_notebook_source(md):
            shutil.copy(md, target)
    for nb in (EXECUTED / "chapters").glob("*.ipynb"):
        shutil.copy(nb, SITE_SRC / "chapters" / nb.name)
    shutil.copytree(ROOT / "assignments", SITE_SRC / "assignments")
    (SITE_SRC / "_ext").mkdir()
    shutil.copy(ROOT / "tools" / "sphinx_alt_text.py", SITE_SRC / "_ext" / "sphinx_alt_text.py")  # figures' alt text
    vendor_javascript()


def build_site() -> None:
    stage_site()
    out = BUILD / "book"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(
        [str(Path(sys.executable).parent / "jupyter-book"), "build", str(SITE_SRC), "--path-output", str(out), "-W", "-n", "--keep-going"],
        check=True,
    )
    shutil.rmtree(BUILD / "html", ignore_errors=True)
    shutil.move(str(out / "_build" / "html"), str(BUILD / "html"))
    pages = len(list((BUILD / "html").rglob("*.html")))
    print(f"website: {BUILD / 'html' / 'index.html'} ({pages} HTML files)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", help="execute only notebooks whose file name contains this (repeatable)")
    parser.add_argument("--no-site", action="store_true", help="skip the website build")
    parser.add_argument("--no-execute", action="store_true", help="reuse _build/executed")
    parser.add_argument("--jobs", type=int, default=min(2, usable_cpus()),
                        help="notebooks executed at a time, each with its share of the cores (default: 2, "
                             "or 1 on a one-core machine); OMP_NUM_THREADS, if set, is each one's thread count")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a papermill parameter for every chapter (value parsed as JSON if it can be)")
    parser.add_argument("--profile", choices=["gpu"], help="execute every chapter at its profile's values (see above)")
    parser.add_argument("--dry-run", action="store_true", help="print and check each notebook's parameters, execute nothing")
    args = parser.parse_args(argv)

    parameters = {}
    for name, value in args.p:
        try:
            parameters[name] = json.loads(value)
        except json.JSONDecodeError:
            parameters[name] = value

    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1; got {args.jobs}")
    if args.dry_run:
        pairs = notebooks_to_execute(args.only)
        for source, chosen in notebook_parameters(pairs, parameters, args.profile).items():
            print(f"{source.relative_to(ROOT)}: {json.dumps(chosen)}")
        return
    start = time.perf_counter()
    if not args.no_execute:
        run = execute(notebooks_to_execute(args.only), parameters, args.jobs, args.profile)
        if args.only is None and args.profile is None:  # the budgets are for the default parameters
            (BUILD / "timings.json").write_text(json.dumps(run, indent=1))
        print_budgets(run)
    if not args.no_site:
        build_site()
    print(f"build finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
