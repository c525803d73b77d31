"""Grading the student's code cannot reach: a check of every submission's source, outside the kernel.

nbgrader runs a student's cells and the instructor's tests in one kernel, so code in a
submission can decide how the tests run: an IPython AST transformer that wraps every later
cell in ``try/except``, a patched ``torch.testing.assert_close``, a rebound ``AssertionError``,
an object whose ``__eq__`` is always true, ``sys.settrace``. Nothing done inside that kernel
can be trusted to catch it, so this check reads the submission's source instead, in the
grading process, before the notebook runs. What it looks for is written in RULES below, in
the words the student and the instructor are shown.

Two kinds of finding:

* **tampering** (anything that could change the kernel, the interpreter, a module or the
  tests): the submission is *held for review*. Its code is not run at all (each of its cells
  is replaced by a ``raise``), every test scores 0, and the instructor's report names the cell,
  the line and the rule. An instructor who finds it harmless re-grades by hand.
* **delegation** (the answer is somebody else's: the course's ``helpers``, a library that
  implements it, a reference function defined in a test cell, a call the assignment forbids):
  the tests that call the functions of that cell score 0, and the feedback says why.

Honest answers trigger neither: ``tests/test_grading.py`` grades every instructor solution
through this check, and the assignments' introductions state the rules.

The check also makes warnings free: nbgrader fails a test cell that printed anything to
stderr, so a correct answer that triggers a harmless ``UserWarning`` lost its points. After the
notebook runs, stderr in a test cell is moved to stdout (still shown, no longer counted).

Two nbgrader preprocessors, wired in by ``nbgrader_config.py``: ``IntegrityCheck`` before
``Execute`` and ``IntegrityScore`` after it. The findings of each student are also written to
``<report_directory>/<assignment>/<student>.json`` for ``tools/grade.py``'s table.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import json
import os
import re

import nbformat
from IPython.core.inputtransformer2 import TransformerManager
from nbgrader.preprocessors import NbGraderPreprocessor
from traitlets import Dict, Unicode

# Modules an answer may import (and their submodules); everything else is refused.
ALLOWED_MODULES = {"math", "cmath", "torch", "numpy", "typing", "itertools", "functools",
                   "collections", "random", "time", "matplotlib"}
# Modules that already implement what the assignments ask for.
DELEGATES = {
    "helpers": "the course's own implementation of these functions",
    "diffusers": "the library the tests compare your answer with",
    "transformers": "a library that implements it for you",
    "peft": "a library that implements it for you",
}
# Built-in functions that reach past the answer into the kernel, the interpreter or the disk.
TAMPER_BUILTINS = {
    "exec": "runs code the check cannot see", "eval": "runs code the check cannot see",
    "compile": "builds code the check cannot see", "__import__": "imports behind the check's back",
    "globals": "rewrites the notebook's variables", "locals": "rewrites variables behind the check's back",
    "vars": "reaches into modules' variables", "getattr": "reaches attributes by name",
    "setattr": "changes attributes of objects", "delattr": "deletes attributes of objects",
    "open": "reads or writes files", "breakpoint": "stops the grading kernel",
    "input": "waits for input that never comes", "exit": "stops the grading kernel",
    "quit": "stops the grading kernel", "memoryview": "reaches into raw memory",
    "get_ipython": "reaches the kernel that runs the tests",
}
# Attribute names through which a module leads to the interpreter (torch.sys, np.os, ...).
TAMPER_ATTRIBUTES = {
    "sys", "os", "builtins", "importlib", "inspect", "ctypes", "ctypeslib", "gc", "subprocess",
    "IPython", "settrace", "setprofile", "cpp_extension", "load_inline", "load_library", "library",
    "overrides", "compile", "f_globals", "f_locals", "f_back", "f_code", "gi_frame", "tb_frame",
}
ALLOWED_DUNDERS = {"__init__", "__name__", "__repr__", "__str__"}
ALLOWED_MAGICS = {"time", "timeit", "matplotlib"}
DUNDER = re.compile(r"^__\w+__$")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing the check refused: where, and why, in words for the student and instructor."""

    kind: str  # "tampering" or "delegation"
    cell: str  # the answer cell's grade_id, or "added cell N"
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.cell}, line {self.line}: {self.what}"


@dataclasses.dataclass
class Context:
    """What the instructor's notebook defines, against which a submission is read."""

    setup_bindings: dict[str, str | None]  # name -> module it is bound to (None: not a module)
    test_functions: set[str]  # functions and classes defined in test cells (references)
    answer_names: dict[str, set[str]]  # answer cell -> the names it is meant to define
    forbidden: dict[str, str]  # attribute or name -> why the assignment forbids it

    @classmethod
    def from_source(cls, source_nb, forbidden: dict[str, str] | None = None) -> "Context":
        setup, tests, answers = {}, set(), {}
        for cell in source_nb.cells:
            meta = cell.metadata.get("nbgrader", {})
            if cell.cell_type != "code" or not meta:
                continue
            tree = parse(cell.source)
            if tree is None:
                continue
            if meta.get("solution"):
                answers[meta["grade_id"]] = module_bindings(tree).keys()
            elif meta.get("grade"):
                tests |= {n.name for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
            else:
                setup |= module_bindings(tree)
        return cls(setup, tests, {k: set(v) for k, v in answers.items()}, dict(forbidden or {}))


def parse(source: str) -> ast.Module | None:
    """The cell as the kernel runs it: the magics this check allows become plain statements, the
    rest of IPython's syntax (other magics, shell commands) becomes the get_ipython() calls
    IPython makes of it, and top-level await is accepted as IPython accepts it. None if IPython
    could not run it either (a syntax error fails the tests by itself)."""
    lines = []
    for line in source.splitlines():
        stripped = line.lstrip()
        magic = re.match(r"%%?(\w+)\s*(.*)", stripped)
        if magic and magic.group(1) in ALLOWED_MAGICS:
            line = line[: len(line) - len(stripped)] + (magic.group(2) or "pass")
        lines.append(line)
    try:
        code = TransformerManager().transform_cell("\n".join(lines) + "\n")
        return compile(code, "<cell>", "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    except (SyntaxError, ValueError):
        return None


SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef,
          ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def module_nodes(tree: ast.Module):
    """Every node that runs in the notebook's global scope: not inside a function, class,
    lambda or comprehension (a def or class statement itself is included: it binds its name)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if node is tree or not isinstance(node, SCOPES):
            stack.extend(ast.iter_child_nodes(node))


def module_bindings(tree: ast.Module) -> dict[str, str | None]:
    """Names a cell binds in the global scope -> the module an import binds them to (else None)."""
    bound: dict[str, str | None] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            bound.update(dict.fromkeys(node.names))
    for node in module_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound[node.name] = None
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound[node.id] = None
    return bound


def local_bindings(func) -> set[str]:
    """Names a function binds itself: parameters, assignments, nested defs, imports."""
    args = func.args
    names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg] if a}
    for stmt in func.body if isinstance(func.body, list) else [func.body]:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names |= {a.asname or a.name.split(".")[0] for a in node.names}
    return names


def loads(tree: ast.Module) -> list[tuple[ast.Name, frozenset | None]]:
    """Every name read, with the names the functions around it bind locally (None: global scope)."""
    found = []

    def visit(node, bound):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            bound = (bound or frozenset()) | local_bindings(node)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            found.append((node, bound))
        for child in ast.iter_child_nodes(node):
            visit(child, bound)

    visit(tree, None)
    return found


def check_cell(label: str, source: str, ctx: Context) -> list[Finding]:
    """Every rule, applied to one cell of student code."""
    found: list[Finding] = []

    def flag(kind, node, what):
        found.append(Finding(kind, label, getattr(node, "lineno", 1), what))

    for number, line in enumerate(source.splitlines(), 1):
        magic = re.match(r"\s*(%%?|!)(\w*)", line)
        if magic and not (magic.group(1) != "!" and magic.group(2) in ALLOWED_MAGICS):
            found.append(Finding("tampering", label, number,
                                 f"`{line.strip()[:40]}`: IPython magics and shell commands other than "
                                 "%time and %timeit are not run in a graded answer"))
    tree = parse(source)
    if tree is None:
        return found  # a syntax error fails the tests by itself

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if isinstance(node, ast.Import):
                imported = [(a.name, a.name) for a in node.names]
            else:
                imported = [(node.module or "", f"{node.module}.{a.name}") for a in node.names]
            for module, full in imported:
                top = module.split(".")[0]
                if top in DELEGATES:
                    flag("delegation", node, f"imports `{module}`, {DELEGATES[top]}; write the answer yourself")
                elif top not in ALLOWED_MODULES or getattr(node, "level", 0):
                    flag("tampering", node, f"imports `{module or '.'}`; an answer may import only "
                         + ", ".join(sorted(ALLOWED_MODULES)))
                elif any(part.startswith("_") for part in full.split(".")):
                    flag("tampering", node, f"imports the private `{full}`")
                elif any(part in TAMPER_ATTRIBUTES | TAMPER_BUILTINS.keys() for part in full.split(".")):
                    flag("tampering", node, f"imports `{full}`, which reaches the interpreter or changes how torch runs")
                for part in full.split("."):
                    if part in ctx.forbidden:
                        flag("delegation", node, f"uses `{part}`: {ctx.forbidden[part]}")
        elif isinstance(node, ast.ClassDef):
            flag("tampering", node, f"defines a class (`{node.name}`): the assignments ask for functions, "
                 "and a class can decide how its results compare (`__eq__`)")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and DUNDER.match(node.name) \
                and node.name not in ALLOWED_DUNDERS:
            flag("tampering", node, f"defines `{node.name}`, which changes how Python treats an object")
        elif isinstance(node, ast.Attribute):
            attr = node.attr
            if isinstance(node.ctx, (ast.Store, ast.Del)):
                flag("tampering", node, f"assigns to or deletes the attribute `.{attr}`: an answer may not change "
                     "attributes of objects or modules (use in-place tensor methods such as `.zero_()` or "
                     "`torch.nn.init.zeros_`)")
            elif DUNDER.match(attr) and attr not in ALLOWED_DUNDERS:
                flag("tampering", node, f"uses `.{attr}`, which reaches Python's internals")
            elif attr.startswith("_") and not DUNDER.match(attr):
                flag("tampering", node, f"uses the private attribute `.{attr}`")
            elif attr in TAMPER_ATTRIBUTES:
                flag("tampering", node, f"uses `.{attr}`, which reaches the interpreter or changes how torch runs")
            if attr in ctx.forbidden:
                flag("delegation", node, f"uses `{attr}`: {ctx.forbidden[attr]}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "type" \
                and len(node.args) == 3:
            flag("tampering", node, "builds a class with `type(name, bases, namespace)`")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and DUNDER.match(node.value) \
                and node.value not in ALLOWED_DUNDERS:
            flag("tampering", node, f"names `{node.value}`, which reaches Python's internals")

    for node, bound in loads(tree):
        name = node.id
        if bound is not None and name in bound:
            continue  # the answer's own local variable of that name
        if name in TAMPER_BUILTINS:
            flag("tampering", node, f"uses `{name}`, which {TAMPER_BUILTINS[name]}")
        elif DUNDER.match(name) and name not in ALLOWED_DUNDERS:
            flag("tampering", node, f"uses `{name}`, which reaches Python's internals")
        elif name in ctx.forbidden:
            flag("delegation", node, f"uses `{name}`: {ctx.forbidden[name]}")
        elif name in ctx.test_functions and bound is not None:  # trying the tests' toys outside an answer is fine
            flag("delegation", node, f"calls `{name}`, the reference a test cell defines; write your own")

    # Global bindings that replace what the tests rely on.
    builtin_names = set(dir(builtins))
    expected = ctx.answer_names.get(label, set())
    for name, module in module_bindings(tree).items():
        if name in expected:
            continue
        if name in ctx.setup_bindings and (module is None or module != ctx.setup_bindings[name]):
            flag("tampering", tree, f"rebinds `{name}`, which the assignment's set-up cell defines and the tests use")
        elif name in builtin_names:
            flag("tampering", tree, f"rebinds the built-in `{name}` for the whole notebook")
    return sorted(set(found), key=lambda f: (f.line, f.what))


def student_cells(nb, source_nb) -> list[tuple[str, str, int]]:
    """(label, source, index) of every code cell the student wrote or could have changed:
    answer cells, and any cell that is not exactly one of the instructor's locked or test cells."""
    instructor = {c.metadata["nbgrader"].get("grade_id"): c.source for c in source_nb.cells
                  if c.cell_type == "code" and c.metadata.get("nbgrader")
                  and not c.metadata["nbgrader"].get("solution")}
    cells, added = [], 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        meta = cell.metadata.get("nbgrader", {})
        if not meta.get("solution") and is_instructors(cell.source, instructor.get(meta.get("grade_id"))):
            continue
        if meta.get("solution") and meta.get("grade_id"):
            label = meta["grade_id"]
        else:
            added += 1
            label = f"added cell {added} (cell {index + 1} of the notebook)"
        cells.append((label, cell.source, index))
    return cells


def is_instructors(source: str, original: str | None) -> bool:
    """The instructor's cell, as written or as nbgrader restores a deleted one (comment lines first)."""
    if original is None or not source.endswith(original):
        return False
    prefix = source[: len(source) - len(original)]
    if prefix and not prefix.endswith("\n"):
        return False  # "#" + the original would comment out its first line
    return all(not line.strip() or line.lstrip().startswith("#") for line in prefix.splitlines())


def check_notebook(nb, source_nb, forbidden: dict[str, str] | None = None) -> list[Finding]:
    """Every finding in a submission, read against the instructor's notebook."""
    ctx = Context.from_source(source_nb, forbidden)
    return [f for label, source, _ in student_cells(nb, source_nb) for f in check_cell(label, source, ctx)]


def affected_tests(findings: list[Finding], source_nb) -> dict[str, list[Finding]]:
    """Test cell -> the findings that cost it its points. Tampering, or anything in a cell that
    is not an answer, costs every test; a delegation costs the tests that call that answer."""
    ctx = Context.from_source(source_nb)
    tests = {}
    for cell in source_nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type == "code" and meta.get("grade") and not meta.get("solution"):
            tree = parse(cell.source)
            used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} if tree else set()
            tests[meta["grade_id"]] = used
    cost = {test: [] for test in tests}
    for finding in findings:
        defines = ctx.answer_names.get(finding.cell)
        for test, used in tests.items():
            if finding.kind == "tampering" or defines is None or used & defines:
                cost[test].append(finding)
    return {test: f for test, f in cost.items() if f}


# ------------------------------------------------------------------------------ nbgrader
def source_notebook(directory: str, assignment: str, notebook: str):
    return nbformat.read(os.path.join(directory, assignment, f"{notebook}.ipynb"), as_version=4)


class IntegrityCheck(NbGraderPreprocessor):
    """Before the notebook runs: read the student's code; a tampering submission is not run."""

    source_directory = Unicode(help="the instructor's notebooks (solutions/)").tag(config=True)
    report_directory = Unicode(help="where <assignment>/<student>.json findings are written").tag(config=True)
    forbidden = Dict(help="assignment -> {name: why the assignment forbids it}").tag(config=True)

    def preprocess(self, nb, resources):
        info = resources["nbgrader"]
        source_nb = source_notebook(self.source_directory, info["assignment"], info["notebook"])
        findings = check_notebook(nb, source_nb, self.forbidden.get(info["assignment"], {}))
        held = [f for f in findings if f.kind == "tampering"]
        if held:
            reason = "; ".join(map(str, held))[:2000]
            for label, _, index in student_cells(nb, source_nb):
                nb.cells[index].source = (f"raise RuntimeError({('Not run: this submission is held for review. ' + reason)!r})")
        report = {"student": info["student"], "assignment": info["assignment"],
                  "held_for_review": bool(held), "findings": [dataclasses.asdict(f) for f in findings]}
        resources.setdefault("integrity", {})["findings"] = findings
        resources["integrity"]["source_nb"] = source_nb
        if self.report_directory:
            folder = os.path.join(self.report_directory, info["assignment"])
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"{info['student']}.json"), "w") as f:
                json.dump(report, f, indent=1)
        return nb, resources


class IntegrityScore(NbGraderPreprocessor):
    """After the notebook ran: the findings fail the tests they cost; warnings cost nothing."""

    def preprocess(self, nb, resources):
        findings = resources.get("integrity", {}).get("findings", [])
        source_nb = resources.get("integrity", {}).get("source_nb")
        costs = affected_tests(findings, source_nb) if findings else {}
        for cell in nb.cells:
            meta = cell.metadata.get("nbgrader", {})
            if cell.cell_type != "code" or not meta.get("grade") or meta.get("solution"):
                continue
            for output in cell.outputs:  # nbgrader fails a test on any stderr: a warning is not an error
                if output.output_type == "stream" and output.name == "stderr":
                    output.name = "stdout"
                    output.text = "".join(f"[stderr, not counted] {line}\n" for line in output.text.splitlines())
            cost = costs.get(meta.get("grade_id"))
            if cost:
                held = any(f.kind == "tampering" for f in cost)
                title = "HeldForReview" if held else "NotYourAnswer"
                lines = [str(f) for f in cost]
                cell.outputs.insert(0, nbformat.v4.new_output(
                    "error", ename=title, evalue="; ".join(lines)[:2000],
                    traceback=[f"{title}: this test scores 0 because the submission's code"] + lines))
        return nb, resources


class HideHiddenTests(NbGraderPreprocessor):
    """For the feedback students get: hidden tests are not printed, and a failed test shows its
    message, not the traceback through the hidden lines."""

    def preprocess_cell(self, cell, resources, index):
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type == "code" and meta.get("grade") and not meta.get("solution"):
            cell.source = re.sub(r"(?ms)^([ \t]*)### BEGIN HIDDEN TESTS\n.*?### END HIDDEN TESTS[^\n]*",
                                 r"\1# (hidden tests, not shown)", cell.source)
            for output in cell.outputs:
                if output.output_type == "error":
                    output.traceback = [f"{output.ename}: {output.evalue}"]
        return cell, resources
