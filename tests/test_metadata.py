"""What the package index shows: metadata that is true, links that work there, a changelog."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import datapunk_recovery

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
SITE = "https://datapunk.github.io/datapunk-recovery/"
REPO = "https://github.com/datapunk/datapunk-recovery"


def test_the_version_is_one_and_the_changelog_has_it() -> None:
    assert PROJECT["version"] == datapunk_recovery.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    versions = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog, flags=re.M)
    assert versions[0] == PROJECT["version"]
    assert versions[-1] == "0.1.0"
    for version in versions:
        assert re.search(rf"^\[{re.escape(version)}\]: https://", changelog, flags=re.M)


def test_the_index_page_links_to_docs_changelog_and_issues() -> None:
    urls = PROJECT["urls"]
    assert {"Homepage", "Documentation", "Changelog", "Issues"} <= set(urls)
    assert urls["Documentation"] == SITE
    assert all(url.startswith("https://") for url in urls.values())
    assert PROJECT["keywords"]


def test_classifiers_say_only_what_ci_tests() -> None:
    classifiers = PROJECT["classifiers"]
    versions = {c.rsplit(" :: ", 1)[1] for c in classifiers if re.search(r":: 3\.\d+$", c)}
    assert versions == {"3.11"}  # the interpreter CI runs (scripts/test.sh, python3.11)
    assert PROJECT["requires-python"] == ">=3.11"
    assert "Typing :: Typed" in classifiers
    assert (ROOT / "src" / "datapunk_recovery" / "py.typed").exists()
    assert {"Framework :: AsyncIO", "Framework :: Trio", "Framework :: Pytest"} <= set(classifiers)
    # The licence is a PEP 639 expression, which supersedes "License ::" classifiers.
    assert PROJECT["license"] == "MIT"
    assert not [c for c in classifiers if c.startswith("License ::")]


def test_every_readme_link_works_on_the_package_index() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)]+)\)", readme)
    assert links
    for link in links:
        assert link.startswith("https://"), f"relative link {link!r} breaks on the index page"
        if link.startswith(SITE):
            page = link[len(SITE) :].strip("/") or "index"
            assert (ROOT / "docs" / f"{page}.md").exists(), link
        elif link.startswith(f"{REPO}/blob/main/"):
            assert (ROOT / link[len(f"{REPO}/blob/main/") :]).exists(), link
