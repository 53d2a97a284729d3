"""The documentation site builds with `mkdocs build --strict` and reads well.

Strict mode fails on a broken link and on a page missing from the nav
(``validation.nav.omitted_files: warn`` in mkdocs.yml); the tests below read
the built site for what strict mode does not see.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import api_pages  # noqa: E402
import docstring_roles  # noqa: E402

needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None, reason="needs the docs extra"
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once for this module's tests."""
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT / "src")},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@needs_mkdocs
def test_site_builds_strictly(site: Path) -> None:
    assert (site / "strategies" / "index.html").exists()


def test_every_public_module_has_an_api_page_in_the_nav() -> None:
    mkdocs = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(p for p in (ROOT / "docs" / "api").rglob("*.md"))
    expected = sorted(api_pages.page(m) for m in api_pages.public_modules())
    assert pages == expected, "run: python scripts/api_pages.py"
    for module in api_pages.public_modules():
        page = api_pages.page(module)
        assert page.read_text(encoding="utf-8") == api_pages.text(module)
        assert page.relative_to(ROOT / "docs").as_posix() in mkdocs, module
    assert "\n".join(api_pages.nav()) in mkdocs, "run: python scripts/api_pages.py"


def test_the_nav_has_a_deliberate_order() -> None:
    mkdocs = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = mkdocs[mkdocs.index("\nnav:\n") : mkdocs.index("\nvalidation:")]
    sections = re.findall(r"^  - ([^:\n]+):", nav, flags=re.M)
    assert sections == [
        "Getting started",
        "The four recoveries",
        "Primitives",
        "Operations",
        "The lab",
        "Benchmarks",
        "Migration",
        "API reference",
    ]


@needs_mkdocs
def test_each_api_page_names_its_module_once(site: Path) -> None:
    for module in api_pages.public_modules():
        rel = api_pages.page(module).relative_to(ROOT / "docs").with_suffix("")
        html_path = site / (rel.parent if rel.name == "index" else rel) / "index.html"
        html = html_path.read_text(encoding="utf-8")
        headings = re.findall(r"<h[1-6][^>]*>(.*?)</h[1-6]>", html, flags=re.S)
        named = [h for h in headings if re.search(rf"datapunk_recovery\.{re.escape(module)}<", h)]
        assert len(named) == 1, (module, named)


ROLE_IN_HTML = re.compile(r":(?:py:)?(?:class|meth|func|mod|attr|data|exc|obj|const):(?:<code>|`)")
UNRESOLVED = re.compile(r"\[(?:<code>)?[\w.()]+(?:</code>)?\]\[[\w.\-]*\]")


@needs_mkdocs
def test_no_page_shows_a_sphinx_role_or_an_unresolved_reference(site: Path) -> None:
    bad = []
    for page in sorted(site.rglob("*.html")):
        html = page.read_text(encoding="utf-8")
        for pattern in (ROLE_IN_HTML, UNRESOLVED):
            bad.extend(f"{page.relative_to(site)}: {m.group(0)}" for m in pattern.finditer(html))
    assert not bad, "run: python scripts/docstring_roles.py\n" + "\n".join(bad[:20])


def test_docstrings_hold_no_role_left_to_convert() -> None:

    assert docstring_roles.main(["--check"]) == 0, "run: python scripts/docstring_roles.py"


def test_docstring_links_to_the_guides_name_pages_that_exist() -> None:
    site = "https://datapunk.github.io/datapunk-recovery/"
    for path in sorted((ROOT / "src").rglob("*.py")):
        for url in re.findall(rf"\]\(({re.escape(site)}[^)]*)\)", path.read_text()):
            page = url[len(site) :].strip("/") or "index"
            assert (ROOT / "docs" / f"{page}.md").exists(), f"{path.name}: {url}"
