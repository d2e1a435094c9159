"""Every Python block of the README and of the documentation pages (docs/) runs as written: each block in a
fresh interpreter, in a scratch directory, with the blocks before it in the same section (a section's
examples build on each other). A section is a page's level-2 heading, or the whole page where it has none.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def sections() -> dict[str, list[str]]:
    """The ``python`` code blocks, by "page: section"."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        text = page.read_text()
        section = "top"
        for part in re.split(r"^(## .*)$", text, flags=re.M):
            if part.startswith("## "):
                section = part[3:].strip()
                continue
            blocks = re.findall(r"^```python\n(.*?)^```", part, flags=re.M | re.S)
            if blocks:
                found[f"{page.relative_to(ROOT)}: {section}"] = blocks
    return found


SECTIONS = sections()


def test_the_pages_have_examples_to_run():
    assert sum(len(blocks) for blocks in SECTIONS.values()) >= 8
    assert sum(len(b) for name, b in SECTIONS.items() if name.startswith("README.md")) >= 2
    assert len(SECTIONS["docs/toolchain.md: top"]) == 5, "compile, export, ONNX, autocast, DDP"


@pytest.mark.parametrize("section", list(SECTIONS))
def test_section_runs_as_written(section, tmp_path):
    script = "\n\n".join(SECTIONS[section])
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{section}:\n{result.stderr[-4000:]}"


def test_the_documentation_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: every page in the navigation, every link and anchor resolves, the API
    reference renders from the docstrings, and the README's variants table is included where it belongs."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    sites = (tmp_path / "site" / "dropout-sites" / "index.html").read_text()
    assert "DropConnect per unit" in sites, "the variants table, included from the README"
    assert "Long short-term memory" in (tmp_path / "site" / "api" / "index.html").read_text()
