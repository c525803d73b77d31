"""Run chapters with other seeds and thread counts and report every check, passed or failed.

    python tools/spread.py --only 08                       # seeds 1 and 2, at 1 and 2 threads
    python tools/spread.py --only 02 --only 03 --runs 1:1 2:1 --jobs 2
    python tools/spread.py --report                        # the table of everything run so far

A chapter's last cell asserts what its prose says about the run (who wins, above which
threshold). A training run's numbers move with the seed, the thread count and the CPU, so each
such assertion must hold across that variation with a margin (README, "Reproducibility"). This
tool measures the margin. Every ``assert`` statement in a chapter becomes a recorded check that
never stops the notebook: for ``assert a < b`` it records the values of ``a`` and ``b``, whether
the comparison held and its slack relative to the larger operand, so one run reports *every*
check, not only the first that fails. An ``and`` of comparisons is recorded term by term.

Each run (``seed:threads``) executes in its own papermill process with ``OMP_NUM_THREADS`` and
``torch.set_num_threads`` at the thread count and its own model cache (``helpers.zoo`` retrains
there, so the cached models vary with the threads as they would on another machine). Results go
to ``_build/spread/<chapter>/seed<S>-t<N>.json``; ``--report`` prints the table from them and
writes it to ``_build/spread/report.md``. Runs at one thread may go two at a time (``--jobs 2``)
on two cores; runs at two threads should go alone (two heavy processes collapse on two cores).
Exit status 1 if any check failed in any run.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "_build" / "spread"

# Injected as the notebook's first cell: records checks instead of raising, into $SPREAD_RESULTS.
RECORDER = r'''
import ast as _ast, json as _json, operator as _op, os as _os
import torch as _torch
_torch.set_num_threads(int(_os.environ["SPREAD_THREADS"]))
_SPREAD_OPS = {_ast.Lt: _op.lt, _ast.LtE: _op.le, _ast.Gt: _op.gt, _ast.GtE: _op.ge, _ast.Eq: _op.eq,
               _ast.NotEq: _op.ne, _ast.Is: _op.is_, _ast.IsNot: _op.is_not, _ast.In: lambda a, b: a in b,
               _ast.NotIn: lambda a, b: a not in b}
_SPREAD_SEEN = {}


def _spread_number(v):
    try:
        return float(v)
    except Exception:
        return None


def _spread_check(where, source, scope):
    """Record one assert: each term of an ``and``, with its operands' values and relative slack."""
    test = _ast.parse(source, mode="eval").body
    terms = test.values if isinstance(test, _ast.BoolOp) and isinstance(test.op, _ast.And) else [test]
    ev = lambda node: eval(compile(_ast.Expression(node), "<check>", "eval"), scope)
    n = _SPREAD_SEEN[where] = _SPREAD_SEEN.get(where, 0) + 1
    records = []
    for term in terms:
        rec = {"where": where, "instance": n, "source": source, "term": _ast.unparse(term)}
        try:
            if isinstance(term, _ast.Compare):
                values = [ev(term.left)] + [ev(c) for c in term.comparators]
                pairs = list(zip(term.ops, values, values[1:]))
                rec["ok"] = all(bool(_SPREAD_OPS[type(o)](a, b)) for o, a, b in pairs)
                nums = [_spread_number(v) for v in values]
                rec["values"] = [x if x is not None else repr(v)[:60] for x, v in zip(nums, values)]
                slacks = []
                for o, a, b in zip(term.ops, nums, nums[1:]):
                    if a is None or b is None or type(o) not in (_ast.Lt, _ast.LtE, _ast.Gt, _ast.GtE):
                        continue
                    gap = (b - a) if type(o) in (_ast.Lt, _ast.LtE) else (a - b)
                    slacks.append(gap / (max(abs(a), abs(b)) or 1.0))
                rec["margin"] = min(slacks) if slacks else None
            else:
                rec["ok"], rec["values"], rec["margin"] = bool(ev(term)), [], None
        except Exception as error:  # a check that cannot even be evaluated is a failure
            rec["ok"], rec["values"], rec["margin"], rec["error"] = False, [], None, repr(error)[:200]
        records.append(rec)
        if not rec["ok"]:
            break  # as Python's `and`: later terms may assume this one
    with open(_os.environ["SPREAD_RESULTS"], "a") as f:
        for rec in records:
            f.write(_json.dumps(rec) + "\n")
'''


class _AssertsToChecks(ast.NodeTransformer):
    """``assert test, msg`` -> ``_spread_check("cell:line", "test", globals())``, outside functions."""

    def __init__(self, cell: int):
        self.cell = cell

    def visit_FunctionDef(self, node):  # asserts inside functions stay asserts
        return node

    visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = visit_FunctionDef

    def visit_Assert(self, node: ast.Assert):
        call = ast.parse(f"_spread_check({f'{self.cell}:{node.lineno}'!r}, {ast.unparse(node.test)!r}, globals())").body[0]
        return ast.copy_location(call, node)


def instrument(source: Path, target: Path) -> None:
    """The chapter as a notebook whose asserts are recorded checks, with the recorder cell first."""
    import jupytext
    import nbformat

    nb = jupytext.read(source)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "assert" not in cell.source:
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:  # IPython magics: leave the cell alone
            continue
        cell.source = ast.unparse(ast.fix_missing_locations(_AssertsToChecks(i).visit(tree)))
    nb.cells.insert(0, nbformat.v4.new_code_cell(RECORDER))
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)


def run_one(chapter: Path, seed: int, threads: int, parameters: list[tuple[str, str]], timeout: int) -> dict:
    folder = OUT / chapter.stem
    tag = f"seed{seed}-t{threads}"
    notebook, executed, results = folder / f"{tag}.in.ipynb", folder / f"{tag}.ipynb", folder / f"{tag}.json"
    instrument(chapter, notebook)
    results.unlink(missing_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                        "SPREAD_THREADS": str(threads), "SPREAD_RESULTS": str(results.with_suffix(".jsonl")),
                        "COURSE_CACHE": str(OUT / f"cache-t{threads}-seed{seed}"), "HF_HUB_OFFLINE": "1",
                        "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    results.with_suffix(".jsonl").unlink(missing_ok=True)
    command = [sys.executable, "-m", "papermill", str(notebook), str(executed), "-k", "python3", "--cwd",
               str(ROOT / "chapters"), "--no-progress-bar", "-p", "seed", str(seed)]
    for name, value in parameters:
        command += ["-p", name, value]
    print(f"--- {chapter.stem} seed {seed}, {threads} thread(s)", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        error = None if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1][:300]
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout} s"
    seconds = time.perf_counter() - start
    checks = [json.loads(line) for line in results.with_suffix(".jsonl").read_text().splitlines()] \
        if results.with_suffix(".jsonl").exists() else []
    record = {"chapter": chapter.stem, "seed": seed, "threads": threads, "seconds": round(seconds, 1),
              "error": error, "parameters": parameters, "checks": checks}
    results.write_text(json.dumps(record, indent=1))
    failed = [c for c in checks if not c["ok"]]
    print(f"    {chapter.stem} seed {seed} t{threads}: {seconds:.0f} s, {len(checks)} checks, {len(failed)} failed"
          + (f", ERROR {error}" if error else ""), flush=True)
    return record


def report() -> bool:
    """Print and write the table of every recorded run; True if every check held everywhere."""
    runs = [json.loads(p.read_text()) for p in sorted(OUT.glob("*/seed*-t*.json"))]
    lines, all_ok = [], True
    for chapter in sorted({r["chapter"] for r in runs}):
        mine = sorted((r for r in runs if r["chapter"] == chapter), key=lambda r: (r["threads"], r["seed"]))
        tags = [f"s{r['seed']}/t{r['threads']}" for r in mine]
        lines += [f"\n### {chapter}", "", "runs: " + ", ".join(f"{t} ({r['seconds']:.0f} s{', ERROR ' + r['error'] if r['error'] else ''})"
                                                          for t, r in zip(tags, mine)), "",
                  "| check | " + " | ".join(tags) + " | min margin |", "|---|" + "---|" * (len(tags) + 1)]
        all_ok &= all(r["error"] is None for r in mine)
        # A check is known by its text and how often that text came before it in the run (a loop's
        # passes, or the same test in two places), not by its cell, so edits between runs keep rows aligned.
        keyed, keys = [], []
        for r in mine:
            seen, by_key = {}, {}
            for c in r["checks"]:
                k = (c["term"], seen.setdefault(c["term"], 0))
                seen[c["term"]] += 1
                by_key[k] = c
                if k not in keys:
                    keys.append(k)
            keyed.append(by_key)
        for k in keys:
            cells, margins = [], []
            for by_key in keyed:
                c = by_key.get(k)
                if c is None:
                    cells.append("–")
                    continue
                vals = " vs ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in c["values"]) or ("ok" if c["ok"] else "")
                cells.append(("" if c["ok"] else "**FAIL** ") + vals + (f" ({c['error']})" if c.get("error") else ""))
                all_ok &= c["ok"]
                if c["margin"] is not None:
                    margins.append(c["margin"])
            term = k[0].replace("|", "\\|")
            lines.append(f"| `{term}` | " + " | ".join(cells) + f" | {min(margins):+.0%} |" if margins else
                         f"| `{term}` | " + " | ".join(cells) + " | |")
    text = "\n".join(lines) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.md").write_text(text)
    print(text)
    return all_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="chapters whose file name contains this (repeatable)")
    parser.add_argument("--runs", nargs="+", default=["1:1", "2:1", "1:2", "2:2"], metavar="SEED:THREADS")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (2 only for one-thread runs on two cores)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="another papermill parameter for every run")
    parser.add_argument("--report", action="store_true", help="only print the table of the runs recorded so far")
    args = parser.parse_args(argv)
    if not args.report:
        chapters = [md for md in sorted((ROOT / "chapters").glob("0*.md"))
                    if not args.only or any(o in md.name for o in args.only)]
        if not chapters:
            parser.error(f"--only {args.only} matches no chapter")
        try:
            runs = [tuple(int(x) for x in r.split(":")) for r in args.runs]
        except ValueError:
            parser.error(f"--runs takes SEED:THREADS pairs such as 1:1; got {args.runs}")
        # Each run goes through the chapters in order (later chapters load what earlier ones cached).
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda r: [run_one(ch, r[0], r[1], args.p, args.timeout) for ch in chapters], runs))
    return 0 if report() else 1


if __name__ == "__main__":
    sys.exit(main())
