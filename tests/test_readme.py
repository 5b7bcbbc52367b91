"""The README and the files a host reads, checked against what they describe."""

import re

from conftest import ROOT


def headings_of(path):
    """The headings of a Markdown file, outside its fenced code blocks."""
    headings, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            headings.append(line)
    return headings


def test_headings_are_plain_text():
    assert "## GET /get-status/<sid>" in headings_of(ROOT / "docs" / "api.md")
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert [h for h in headings_of(path) if re.search(r"&[a-z]+;|&#", h)] == [], path


def test_python_version_for_hosts_is_the_one_the_code_is_written_for():
    target = re.search(r'target-version = "py3(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert (ROOT / ".python-version").read_text().strip() == f"3.{target.group(1)}"
