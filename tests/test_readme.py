"""The README and the files a host reads, checked against what they describe."""

import re

from support import ROOT


def readme_headings():
    """The README's headings, outside its fenced code blocks."""
    headings, fenced = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            headings.append(line)
    return headings


def test_readme_headings_are_plain_text():
    headings = readme_headings()
    assert "### GET /get-status/<sid>" in headings
    assert [h for h in headings if re.search(r"&[a-z]+;|&#", h)] == []


def test_python_version_for_hosts_is_the_one_the_code_is_written_for():
    target = re.search(r'target-version = "py3(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert (ROOT / ".python-version").read_text().strip() == f"3.{target.group(1)}"
