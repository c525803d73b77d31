"""The bibliography: every citation resolves, every entry is cited and complete, and no page
names a paper ("Ho et al. (2020)", "Nichol & Dhariwal 2021") without citing it.

Reads the sources (chapters/*.md, references.bib, the book's config), not the built site: the
`-W` site build already fails on an unknown key; these checks catch what it does not (an
uncited name, an unused entry, an entry without a venue) in a second, without a build.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
import yaml
from pybtex.database import parse_file

from conftest import ROOT

BIB = ROOT / "references.bib"
PAGES = sorted((ROOT / "chapters").glob("*.md"))

# {cite}`key`, {cite:p}`a,b`, {cite:t}`{pre}key{post}` ... (sphinxcontrib-bibtex roles)
CITE_ROLE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]*)`")
ANY_ROLE = re.compile(r"\{[a-z][\w:.-]*\}`[^`]*`")
FENCE = re.compile(r"^(`{3,}|~{3,})")

SURNAME = r"[A-Z][A-Za-z'’-]+"
YEAR = r"\(?\s*(?:19|20)\d\d\b"
# How prose names a paper. "et al." has lost its full stop by the time these run (see `sentences`).
NAMED_PAPER = [
    re.compile(rf"\b{SURNAME} et al\b"),                                   # Ho et al, with or without a year
    re.compile(rf"\b{SURNAME}(?:,\s+{SURNAME})*,?\s+(?:&|and)\s+{SURNAME},?\s*{YEAR}"),  # Nichol & Dhariwal 2021
    re.compile(rf"\b{SURNAME}\s+\((?:19|20)\d\d\)"),                        # Canny (1986)
]
VENUE_FIELDS = ("journal", "booktitle", "eprint", "howpublished")


def prose_paragraphs(path: Path) -> list[str]:
    """The page's markdown outside front matter and fenced code, one string per paragraph."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and lines[0] == "---":
        end = lines.index("---", 1)
        lines = lines[end + 1:]
    kept, fence = [], None
    for line in lines:
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            kept.append("")
        elif fence is not None:
            if line.strip() == fence:
                fence = None
        else:
            kept.append(line)
    text = "\n".join(kept)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def cited_keys(paragraph: str) -> list[str]:
    keys = []
    for body in CITE_ROLE.findall(paragraph):
        body = re.sub(r"\{[^}]*\}", "", body)  # pre- and post-text
        keys += [k.strip() for k in body.split(",") if k.strip()]
    return keys


def sentences(paragraph: str) -> list[str]:
    """Sentences with cite roles as CITE, other roles, inline code and maths blanked out."""
    text = CITE_ROLE.sub(" CITE ", paragraph)
    text = ANY_ROLE.sub(" role ", text)
    text = re.sub(r"`[^`]*`", " code ", text)
    text = re.sub(r"\$\$.*?\$\$", " math ", text)
    text = re.sub(r"\$[^$]*\$", " math ", text)
    text = re.sub(r"\bet al\.", "et al", text)  # not a sentence end
    return re.split(r"(?<=[.!?])\s+(?=[A-Z*(\[])", text)


@pytest.fixture(scope="module")
def bib():
    return parse_file(str(BIB), bib_format="bibtex")


@pytest.fixture(scope="module")
def citations() -> dict[str, list[str]]:
    """Cited key -> the pages that cite it."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        for paragraph in prose_paragraphs(page):
            for key in cited_keys(paragraph):
                found.setdefault(key, []).append(page.name)
    return found


def test_the_pages_cite_and_the_bibliography_has_entries(bib, citations):
    assert len(citations) >= 30, sorted(citations)
    assert len(bib.entries) >= 30


def test_every_cited_key_has_an_entry(bib, citations):
    missing = {key: pages for key, pages in citations.items() if key not in bib.entries}
    assert not missing, f"cited but not in references.bib: {missing}"


def test_every_entry_is_cited_somewhere(bib, citations):
    unused = sorted(set(bib.entries) - set(citations))
    assert not unused, f"in references.bib but cited by no page: {unused}"


def test_no_page_names_a_paper_without_citing_it():
    uncited = []
    for page in PAGES:
        for paragraph in prose_paragraphs(page):
            for sentence in sentences(paragraph):
                if "CITE" in sentence:
                    continue
                for pattern in NAMED_PAPER:
                    for m in pattern.finditer(sentence):
                        uncited.append(f"{page.name}: '{m.group(0)}' in: {sentence[:160]}")
    assert not uncited, "papers named without a {cite} role:\n" + "\n".join(uncited)


def test_the_uncited_pattern_finds_what_it_should():
    """The check above is only as good as its patterns: these must be caught, these not."""
    caught = ["The U-Net of Ronneberger et al. (2015) answers all three.",
              "Cosine (Improved DDPM, Nichol & Dhariwal 2021): choose it.",
              "DDIM (Song, Meng & Ermon, 2021) finds a family.",
              "the velocity (Salimans & Ho, 2022) determines the rest.",
              "Lin et al. 2024 fix it.", "Hu et al. observed that.", "The Canny (1986) detector."]
    passed = ["DDIM {cite:p}`song2021denoising` finds a family.",
              "{cite:t}`ronneberger2015unet` answer all three, as Ronneberger et al. (2015) say.",
              "chapters 2 and 3 (2024 steps) agree.", "Stable Diffusion 1.x and SD3 differ.",
              "the loss is `Ho et al. 2020` in code", "$x_0$ and $x_T$ 2020"]

    def flagged(text):
        return any(p.search(s) for s in sentences(text) if "CITE" not in s for p in NAMED_PAPER)

    assert all(flagged(t) for t in caught), [t for t in caught if not flagged(t)]
    assert not any(flagged(t) for t in passed), [t for t in passed if flagged(t)]


def _ascii_lower(text: str) -> str:
    return re.sub(r"[^a-z]", "", unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower())


def test_every_entry_is_complete_and_keyed_by_surname_and_year(bib):
    problems = []
    for key, entry in bib.entries.items():
        authors = entry.persons.get("author", [])
        fields = {name.lower(): value for name, value in entry.fields.items()}
        if not authors:
            problems.append(f"{key}: no author")
            continue
        for field in ("title", "year"):
            if not fields.get(field, "").strip():
                problems.append(f"{key}: no {field}")
        if not any(fields.get(field, "").strip() for field in VENUE_FIELDS):
            problems.append(f"{key}: no venue ({'/'.join(VENUE_FIELDS)})")
        year = fields.get("year", "")
        m = re.fullmatch(r"([a-z]+)((?:19|20)\d\d)([a-z]+)", key)
        surname = _ascii_lower("".join(authors[0].prelast_names + authors[0].last_names))
        if not m or m.group(1) != surname or m.group(2) != year:
            problems.append(f"{key}: key is not first author's surname ({surname}) + year ({year}) + a word")
    assert not problems, "\n".join(problems)


def test_the_book_is_wired_to_the_bibliography():
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    assert "references.bib" in config["bibtex_bibfiles"]
    assert config["sphinx"]["config"]["bibtex_reference_style"] == "author_year"
    toc = (ROOT / "_toc.yml").read_text(encoding="utf-8")
    assert "file: chapters/references" in toc
    assert "```{bibliography}" in (ROOT / "chapters" / "references.md").read_text(encoding="utf-8")
