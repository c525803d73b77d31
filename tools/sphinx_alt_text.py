"""Sphinx extension: every figure a notebook displayed gets its description as ``<img alt>``.

``helpers.alt_text`` stores a description in each figure output's metadata,
``{"image/png": {"alt": "..."}}``. MyST-NB names the image file it writes by the SHA-256 of
the image's bytes but reads only width and height from that metadata, so this extension reads
the executed notebook behind each page, maps each image's hash to its description, and sets
``alt`` on the page's image nodes that have none. (Jupyter Book loads it through
``sphinx.local_extensions`` in ``_config.yml``; ``tools/build.py`` stages it beside the book.)
"""

from __future__ import annotations

import hashlib
import json
from binascii import a2b_base64
from pathlib import Path

from docutils import nodes

IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif")


def descriptions(notebook: dict) -> dict[str, str]:
    """{SHA-256 of an image output's bytes: its alt text} for a notebook's outputs."""
    found = {}
    for cell in notebook.get("cells", []):
        for output in cell.get("outputs", []):
            for mime in IMAGE_TYPES:
                alt = output.get("metadata", {}).get(mime, {}).get("alt")
                content = output.get("data", {}).get(mime)
                if alt and content:
                    content = "".join(content) if isinstance(content, list) else content
                    found[hashlib.sha256(a2b_base64(content)).hexdigest()] = alt
    return found


def add_alt_text(app, doctree) -> None:
    source = Path(app.env.doc2path(app.env.docname))
    if source.suffix != ".ipynb":
        return
    alts = descriptions(json.loads(source.read_text(encoding="utf-8")))
    for image in doctree.findall(nodes.image):
        if not image.get("alt"):
            alt = alts.get(Path(image["uri"]).stem)
            if alt:
                image["alt"] = alt


def setup(app):
    app.connect("doctree-read", add_alt_text)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
