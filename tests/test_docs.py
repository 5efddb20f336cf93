"""The docs name only what is shipped: every file of the repository they mention, every
page they link, and the example files load."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

from enrichflow.config import load_job
from localbatch import Simulation

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHIPPED = re.compile(r"\b((?:configs|data|docs|bench|tests)/[\w.-]+(?:/[\w.-]+)*\.\w+)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_file_and_page_a_doc_names_is_shipped(page):
    text = page.read_text()
    named = {match for match in SHIPPED.findall(text) if "*" not in match}
    missing = [name for name in sorted(named) if not (REPO / name).exists()]
    linked = [link for link in LINK.findall(text) if "://" not in link]
    broken = [link for link in linked if not (page.parent / link).exists()]
    assert not missing and not broken, (missing, broken)


def test_the_example_files_load():
    Simulation.from_yaml(REPO / "configs" / "faults.example.yaml")
    for job in (REPO / "configs").glob("*.yaml"):
        if job.name != "faults.example.yaml":
            load_job(str(job))
