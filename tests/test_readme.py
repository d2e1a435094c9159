"""Every Python block in the README runs as written: each block in a fresh interpreter, in a scratch
directory, with the blocks before it in the same section (a section's examples build on each other)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def sections() -> dict[str, list[str]]:
    """The README's ``python`` code blocks, by the level-2 section they stand in."""
    found: dict[str, list[str]] = {}
    section = "top"
    for part in re.split(r"^(## .*)$", README.read_text(), flags=re.M):
        if part.startswith("## "):
            section = part[3:].strip()
            continue
        blocks = re.findall(r"^```python\n(.*?)^```", part, flags=re.M | re.S)
        if blocks:
            found[section] = blocks
    return found


SECTIONS = sections()


def test_the_readme_has_examples_to_run():
    assert sum(len(blocks) for blocks in SECTIONS.values()) >= 8
    assert len(SECTIONS["Works with PyTorch's tools: compile, export, ONNX, autocast, DDP"]) == 5


@pytest.mark.parametrize("section", list(SECTIONS))
def test_readme_section_runs_as_written(section, tmp_path):
    script = "\n\n".join(SECTIONS[section])
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{section}:\n{result.stderr[-4000:]}"
