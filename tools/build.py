"""Build the course: execute every notebook once with papermill, then build the website.

    python tools/build.py                 # everything (what `make book` runs)
    python tools/build.py --only 01       # execute only notebooks whose name contains "01"
    python tools/build.py --no-site       # execute, skip the website
    python tools/build.py -p device cuda -p train_seconds 600   # papermill parameters

Pipeline (see DESIGN.md, "One execution, one build"):

    chapters/*.md --jupytext--> _build/notebooks/ --papermill--> _build/executed/
    _config.yml + _toc.yml + executed notebooks + assignments/ --jupyter-book--> _build/html

Solutions (solutions/*/*.ipynb) are executed too, to prove they run, but never published.
The timings of every notebook and the budgets they are held to are printed and written to
``_build/timings.json``. MathJax, RequireJS and the widget manager are installed from npm
into ``_build/npm`` and copied into the site, so the pages load nothing from the internet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build"
NOTEBOOKS, EXECUTED, SITE_SRC = BUILD / "notebooks", BUILD / "executed", BUILD / "site_src"
CHAPTER_BUDGET_S = 240  # DESIGN.md: each chapter at most 4 minutes on 2 CPU cores
COURSE_BUDGET_S = 30 * 60  # the whole course, chapters and solutions
NPM_PACKAGES = ["mathjax@3.2.2", "@jupyter-widgets/html-manager@1.0.15", "requirejs@2.3.8"]


def is_notebook_source(path: Path) -> bool:
    """A MyST markdown file is a notebook when its front matter names a kernel."""
    head = path.read_text(encoding="utf-8")[:600]
    return head.startswith("---") and "kernelspec:" in head


def notebooks_to_execute(only: str | None) -> list[tuple[Path, Path]]:
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
    return [p for p in pairs if only is None or only in p[0].name]


def execute(pairs: list[tuple[Path, Path]], parameters: dict) -> list[dict]:
    import papermill

    env_note = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    os.environ.update(env_note)
    os.environ.setdefault("COURSE_CACHE", str(BUILD / "cache"))  # helpers.zoo: retrained by a clean build
    timings = []
    for source, runnable in pairs:
        rel = source.relative_to(ROOT).with_suffix(".ipynb")
        output = EXECUTED / rel
        output.parent.mkdir(parents=True, exist_ok=True)
        print(f"--- executing {rel}", flush=True)
        start = time.perf_counter()
        papermill.execute_notebook(
            str(runnable),
            str(output),
            parameters=parameters if source.suffix == ".md" else {},
            cwd=str(source.parent),
            kernel_name="python3",
            progress_bar=False,
        )
        seconds = time.perf_counter() - start
        timings.append({"notebook": str(rel), "seconds": round(seconds, 1), "budget": CHAPTER_BUDGET_S})
        print(f"    {seconds:.1f} s", flush=True)
    return timings


def print_budgets(timings: list[dict]) -> None:
    total = sum(t["seconds"] for t in timings)
    print("\nNotebook execution times (budget per notebook and for the course, 2 CPU cores)")
    print(f"{'notebook':<52} {'seconds':>8} {'budget':>7}")
    for t in timings:
        flag = "" if t["seconds"] <= t["budget"] else "  OVER BUDGET"
        print(f"{t['notebook']:<52} {t['seconds']:>8.1f} {t['budget']:>7}{flag}")
    flag = "" if total <= COURSE_BUDGET_S else "  OVER BUDGET"
    print(f"{'total':<52} {total:>8.1f} {COURSE_BUDGET_S:>7}{flag}\n", flush=True)


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
    parser.add_argument("--only", help="execute only notebooks whose file name contains this")
    parser.add_argument("--no-site", action="store_true", help="skip the website build")
    parser.add_argument("--no-execute", action="store_true", help="reuse _build/executed")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a papermill parameter for every chapter (value parsed as JSON if it can be)")
    args = parser.parse_args(argv)

    parameters = {}
    for name, value in args.p:
        try:
            parameters[name] = json.loads(value)
        except json.JSONDecodeError:
            parameters[name] = value

    start = time.perf_counter()
    if not args.no_execute:
        timings = execute(notebooks_to_execute(args.only), parameters)
        if args.only is None:
            (BUILD / "timings.json").write_text(json.dumps(timings, indent=1))
        print_budgets(timings)
    if not args.no_site:
        build_site()
    print(f"build finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
