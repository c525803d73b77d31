"""The built website, loaded page by page in headless Chromium, as a reader would see it."""

from __future__ import annotations

import functools
import http.server
import re
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest

from conftest import ROOT

# sphinx-thebe's script is included twice by Jupyter Book 1 and redeclares a constant;
# it is harmless (thebe is off) and the only page error we accept.
BENIGN_PAGE_ERRORS = ("Identifier 'THEBE_JS_URL' has already been declared",)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(site_dir):
    handler = functools.partial(_QuietHandler, directory=str(site_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()




def site_pages(site_dir: Path) -> list[str]:
    return sorted(
        str(p.relative_to(site_dir)) for p in site_dir.rglob("*.html")
        if not p.relative_to(site_dir).parts[0].startswith("_")
    )


PHONE_WIDTH = 390  # px: a common phone's CSS width
# The first elements that reach past the right edge from a box that does not scroll them.
PAST_THE_EDGE = """w => Array.from(document.querySelectorAll('article *')).filter(e => e.getBoundingClientRect().right > w + 1
    && getComputedStyle(e.parentElement).overflowX === 'visible').slice(0, 3).map(e => e.tagName + '.' + e.className)"""


@pytest.fixture(scope="module")
def loaded(browser, server, site_dir):
    """Load every page once; record requests, errors, images, maths and links."""
    results = {}
    for rel in site_pages(site_dir):
        page = browser.new_page()
        record = {"failed": [], "external": [], "errors": []}
        page.on("requestfailed", lambda r, rec=record: rec["failed"].append(r.url))
        page.on("response", lambda r, rec=record: rec["failed"].append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.on("pageerror", lambda e, rec=record: rec["errors"].append(str(e)))

        def block_external(route, rec=record):
            if route.request.url.startswith(server) or route.request.url.startswith("data:"):
                route.continue_()
            else:
                rec["external"].append(route.request.url)
                route.abort()

        page.route("**/*", block_external)
        page.goto(f"{server}/{rel}", wait_until="networkidle")
        page.evaluate("document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager')")
        page.wait_for_load_state("networkidle")
        page.wait_for_function("!window.MathJax || !MathJax.startup || MathJax.startup.promise", timeout=10000)
        page.evaluate("window.MathJax && MathJax.startup ? MathJax.startup.promise : null")
        record["url"] = page.url
        record["images"] = page.evaluate("Array.from(document.images).map(i => [i.src.slice(0, 80), i.complete && i.naturalWidth > 0])")
        record["alts"] = page.evaluate("Array.from(document.querySelectorAll('article img')).map(i => [i.getAttribute('src'), i.getAttribute('alt')])")
        record["stderr"] = page.evaluate("Array.from(document.querySelectorAll('.output.stderr')).map(o => o.innerText)")
        record["math_nodes"] = page.locator(".math").count()
        record["math_unrendered"] = page.evaluate("Array.from(document.querySelectorAll('.math')).filter(m => !m.querySelector('mjx-container')).length")
        record["math_errors"] = page.locator("mjx-merror").count()
        record["links"] = page.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
        record["text"] = page.inner_text("body")
        page.set_viewport_size({"width": PHONE_WIDTH, "height": 844})  # the same page on a phone
        page.wait_for_timeout(200)
        record["phone"] = (page.evaluate("document.documentElement.scrollWidth"), page.evaluate(PAST_THE_EDGE, PHONE_WIDTH))
        results[rel] = record
        page.close()
    return results


def test_the_site_has_the_course_pages(site_dir):
    pages = site_pages(site_dir)
    for expected in ("index.html", "chapters/intro.html", "chapters/notation.html", "chapters/errata.html",
                     "chapters/references.html", "chapters/01_forward_process.html",
                     "assignments/schedule_math/schedule_math.html"):
        assert expected in pages


def test_citations_resolve_to_the_references_page(loaded):
    """Every {cite} became a link into the bibliography; the references page lists the entries."""
    refs = loaded["chapters/references.html"]
    assert refs["text"].count("[") >= 40, "the references page lists the bibliography"  # one label per entry
    cited = [l for rel, rec in loaded.items() if rel.startswith("chapters/0") for l in rec["links"]
             if "references.html#id" in l]
    assert len(cited) >= 40, f"only {len(cited)} citation links in the chapters"
    errata = loaded["chapters/errata.html"]["text"]
    assert "What the lecture notes get wrong" in errata and "Peebles" in errata


def test_pages_load_with_no_failed_or_external_requests_and_no_errors(loaded):
    for rel, rec in loaded.items():
        assert not rec["failed"], f"{rel}: failed requests {rec['failed']}"
        assert not rec["external"], f"{rel}: requests leave the site {rec['external']}"
        errors = [e for e in rec["errors"] if not any(b in e for b in BENIGN_PAGE_ERRORS)]
        assert not errors, f"{rel}: page errors {errors}"


def test_every_image_loads(loaded):
    for rel, rec in loaded.items():
        broken = [src for src, ok in rec["images"] if not ok]
        assert not broken, f"{rel}: images that did not load {broken}"
    chapter = loaded["chapters/01_forward_process.html"]
    assert len(chapter["images"]) >= 6, "chapter 1 shows its figures"


def test_every_figure_says_what_it_shows(loaded):
    """A screen reader reads an image's alt text: a description, not nothing and not a file name."""
    file_name = re.compile(r"^[\w./-]*\.(png|jpe?g|gif|svg)$|^[0-9a-f]{32,}", re.I)
    for rel, rec in loaded.items():
        bad = [(src[:60], alt) for src, alt in rec["alts"] if not alt or not alt.strip() or file_name.search(alt.strip())]
        assert not bad, f"{rel}: {len(bad)} of {len(rec['alts'])} images without a description, e.g. {bad[:2]}"
    chapter = loaded["chapters/01_forward_process.html"]["alts"]
    assert any("against" in alt for _, alt in chapter), "plots are described by their axes"


MAX_STDERR_LINES = 5


def test_pages_show_no_progress_bars_or_other_stderr_spam(loaded):
    """Training prints one summary line on a page; a live bar's redraws belong to interactive use."""
    for rel, rec in loaded.items():
        lines = [line for block in rec["stderr"] for line in block.splitlines() if line.strip()]
        assert len(lines) <= MAX_STDERR_LINES, (
            f"{rel}: {len(rec['stderr'])} stderr blocks, {len(lines)} lines, e.g. {lines[:3]}")


def test_pages_fit_a_phone_width(loaded):
    """At a phone's width no page scrolls sideways: wide tables, maths and figures scroll in their own box."""
    wide = {rel: rec["phone"] for rel, rec in loaded.items() if rec["phone"][0] > PHONE_WIDTH + 1}
    assert not wide, f"pages wider than {PHONE_WIDTH} px (scroll width, first elements past the edge): {wide}"


RAW_TEX = re.compile(r".{0,40}(\$\$|\\(frac|sqrt|bar|hat|mathbb|varepsilon|alpha|nabla)\b).{0,20}")


def test_no_maths_is_left_as_raw_tex(site_dir):
    """A display formula the markdown parser did not see (e.g. a $$ line glued to the paragraph above
    it inside a list) reaches the page as TeX source, outside any maths node MathJax renders."""
    import html

    raw = {}
    for rel in site_pages(site_dir):
        page = (site_dir / rel).read_text(encoding="utf-8")
        page = re.sub(r"<(pre|code|script|style)[^>]*>.*?</\1>", "", page, flags=re.S)
        page = re.sub(r'<(span|div) class="math[^"]*">.*?</\1>', "", page, flags=re.S)
        text = html.unescape(re.sub(r"<[^>]+>", " ", page))
        hits = [m.group(0) for m in RAW_TEX.finditer(text)]
        if hits:
            raw[rel] = hits[:2]
    assert not raw, f"TeX left unrendered: {raw}"


def test_maths_is_rendered_by_the_vendored_mathjax(loaded):
    for rel, rec in loaded.items():
        assert rec["math_unrendered"] == 0, f"{rel}: {rec['math_unrendered']} formulas left as TeX"
        assert rec["math_errors"] == 0, f"{rel}: MathJax errors"
    assert loaded["chapters/01_forward_process.html"]["math_nodes"] >= 20


def test_internal_links_are_whole(loaded, server, site_dir):
    for rel, rec in loaded.items():
        for href in rec["links"]:
            if not href.startswith(server):
                continue
            parts = urlsplit(href)
            target = site_dir / unquote(parts.path).lstrip("/")
            if target.is_dir():
                target = target / "index.html"
            assert target.exists(), f"{rel}: broken link {href}"
            if parts.fragment and target.suffix == ".html":
                html = target.read_text(encoding="utf-8")
                assert f'id="{parts.fragment}"' in html, f"{rel}: missing anchor {href}"


def test_chapter_numbers_are_glued_from_the_computation(loaded):
    """The prose quotes numbers computed by the notebook (myst-nb glue), never left empty."""
    text = loaded["chapters/01_forward_process.html"]["text"]
    assert re.search(r"x1 = \[0\.863, -0\.396\]", text)
    assert re.search(r"gets there at\s+t\s*=\s*\d{3}", text), "the glued step number is in the prose"


def test_player_plays_without_a_kernel(browser, server):
    page = browser.new_page()
    page.goto(f"{server}/chapters/01_forward_process.html", wait_until="networkidle")
    img = page.locator(".animation img").first
    first = img.get_attribute("src")
    page.locator(".animation button[title='Next frame']").first.click()
    assert img.get_attribute("src") != first, "the player's next-frame button changes the frame"
    page.close()


def test_student_pages_show_no_solutions_or_hidden_tests(loaded):
    cells = [c for path in sorted(ROOT.glob("solutions/*/*.ipynb")) for c in nbformat.read(path, as_version=4).cells]
    secret, public = [], []
    for cell in cells:
        text = cell.source
        for marker, end in (("### BEGIN SOLUTION", "### END SOLUTION"), ("### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS")):
            pattern = re.escape(marker) + r"(.*?)" + re.escape(end)
            for block in re.findall(pattern, text, re.S):
                secret += [line.strip() for line in block.splitlines() if len(line.strip()) > 12]
            text = re.sub(pattern, "", text, flags=re.S)
        public.append(text)
    # Lines that also appear in what students may see (e.g. `except ValueError:` in a visible
    # test) prove nothing; every other solution or hidden-test line must stay off the page.
    public_text = "\n".join(public)
    secret = [line for line in secret if line not in public_text]
    assert secret, "the source notebook has solution and hidden-test lines to look for"
    student = {rel: rec for rel, rec in loaded.items() if rel.startswith("assignments/")}
    assert student
    for rel, rec in student.items():
        for forbidden in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
            assert forbidden not in rec["text"], f"{rel} shows {forbidden!r}"
        leaked = [line for line in secret if line in rec["text"]]
        assert not leaked, f"{rel} shows solution or hidden-test lines: {leaked[:3]}"


def test_every_bundled_photograph_is_attributed():
    """A photograph added to helpers.PHOTOS needs its source and licence on the licences page."""
    import helpers

    page = (ROOT / "chapters" / "licences.md").read_text(encoding="utf-8")
    rows = {m.group(1) for m in re.finditer(r"^\| (.+?) \|", page, flags=re.M)}
    named = {name for row in rows for name in re.findall(r"`(\w+)`", row)}  # first column: `chelsea` (the cat)
    assert set(helpers.PHOTOS) <= named, sorted(set(helpers.PHOTOS) - named)
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")


EXERCISE = re.compile(r'<div class="exercise admonition" id="(ex-[\w-]+)">')
SOLUTION = re.compile(r'<div class="solution dropdown admonition" id="[^"]+">\s*<p class="admonition-title">Solution to'
                      r'<a class="reference internal" href="#(ex-[\w-]+)">')
CHAPTER_PAGE = re.compile(r"^chapters/\d\d_\w+\.html$")


def test_every_chapter_page_has_exercises_each_with_a_worked_solution(site_dir):
    """sphinx-exercise blocks: every exercise of a chapter page is answered by a dropdown solution after it."""
    chapters = [rel for rel in site_pages(site_dir) if CHAPTER_PAGE.match(rel)]
    assert len(chapters) == len([p for p in (ROOT / "chapters").glob("[0-9][0-9]_*.md")])
    problems = {}
    for rel in chapters:
        page = (site_dir / rel).read_text(encoding="utf-8")
        exercises, solutions = EXERCISE.findall(page), SOLUTION.findall(page)
        solved = {m.group(1): m.start() for m in SOLUTION.finditer(page)}
        asked = {m.group(1): m.start() for m in EXERCISE.finditer(page)}
        if not exercises or sorted(exercises) != sorted(solutions) or any(solved[k] < asked[k] for k in asked):
            problems[rel] = (exercises, solutions)
        body = re.findall(r'<div class="solution dropdown admonition".*?<section id="solution-content">(.*?)</section>\s*</div>',
                          page, flags=re.S)
        if any(len(re.sub(r"<[^>]+>", "", b).split()) < 30 for b in body):  # a worked answer, not a stub
            problems[rel] = "a solution shorter than 30 words"
    assert not problems, problems


def test_a_solution_stays_hidden_until_the_reader_opens_it(browser, server):
    page = browser.new_page()
    page.goto(f"{server}/chapters/01_forward_process.html", wait_until="networkidle")
    solution = page.locator(".solution.dropdown").first
    content = solution.locator("#solution-content")
    assert not content.is_visible(), "the solution is shown before the reader asks for it"
    solution.locator("button.toggle-button").click()  # sphinx-togglebutton's button (the title links to the exercise)
    content.wait_for(state="visible", timeout=5000)
    assert content.locator(".cell").count() > 0, "the first solution of chapter 1 computes on the page"
    page.close()
