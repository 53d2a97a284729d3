"""Rewrite Sphinx roles in docstrings as cross-references mkdocstrings renders.

mkdocstrings (the API pages of the docs site) does not render reStructuredText
roles: ``:class:`~datapunk_recovery._core.errors.CircuitOpenError``` showed as raw
text.  This script rewrites, in docstrings only (module, class, function and
attribute docstrings, found with ``ast``; no other line is touched):

- ``:class:`~a.b.C``` / ``:meth:`C.m``` / ``:func:`f``` / ``:mod:`.x``` ...
  into a Markdown cross-reference ``[`C`][a.b.C]`` that mkdocs-autorefs links
  to the object's API page.  The target is resolved as Sphinx would (the
  enclosing class, the module, its parent packages, the package root, then a
  unique suffix match for ``.name``) and must be an object the API pages show
  (public, with a docstring); otherwise the role becomes plain code
  (``` `C` ```), never a broken link.  ``~`` keeps only the last component as
  the text, as in Sphinx.
- ``See ``docs/breaker.md``.`` into a link to that guide on the docs site
  (``[docs/breaker.md](https://datapunk.github.io/datapunk-recovery/breaker/)``).
- the reStructuredText escape ``\\ `` after a literal (``OSError``\\ s) into
  nothing.

It is idempotent (a second run changes nothing), so it can be re-run after
merging branches that added docstrings with roles::

    python scripts/docstring_roles.py          # rewrite src/ in place
    python scripts/docstring_roles.py --check  # exit 1 if anything would change

``tests/test_docs.py`` checks that the built site shows no role.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import api_pages

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
DOCS = ROOT / "docs"
PACKAGE = "datapunk_recovery"
#: The longest line (ruff's line-length).
LIMIT = 100

ROLE = re.compile(r":(?:py:)?(class|meth|func|mod|attr|data|exc|obj|const):`(~?)([^`<>]+)`")
DOC_PATH = re.compile(r"``docs/([\w/.-]+)\.md``")
LITERAL = re.compile(r"(``[^`]+``)")
LINK_OR_CODE = re.compile(r"\[`[^`]*`\]\[[^\]]*\]|\[[^\]]*\]\[[^\]]*\]|``[^`]+``|`[^`]+`")


@cache
def package() -> Any:
    import griffe

    return griffe.load(PACKAGE, search_paths=[str(SRC)], resolve_aliases=True)


def _lookup(path: str) -> Any | None:
    try:
        obj = package()[path.removeprefix(f"{PACKAGE}.")] if path != PACKAGE else package()
    except Exception:
        return None
    try:
        while getattr(obj, "is_alias", False):
            obj = obj.final_target
    except Exception:
        return None
    return obj


def _shown(obj: Any) -> bool:
    """Whether the API pages show ``obj`` (so a cross-reference to it resolves)."""
    if not api_pages.is_public(obj.path.removeprefix(f"{PACKAGE}.")):
        return False
    if obj.is_module:
        return True
    return obj.docstring is not None


@cache
def _all_paths() -> tuple[str, ...]:
    found: list[str] = []

    def walk(obj: Any) -> None:
        for member in obj.members.values():
            if getattr(member, "is_alias", False):
                continue
            found.append(member.path)
            if member.is_module or member.is_class:
                walk(member)

    walk(package())
    return tuple(found)


#: What kind of object each role names (griffe's kinds).
KINDS = {
    "class": {"class"},
    "exc": {"class"},
    "meth": {"function", "attribute"},
    "func": {"function", "class", "attribute"},
    "mod": {"module"},
    "attr": {"attribute", "function"},
    "data": {"attribute"},
    "const": {"attribute"},
    "obj": {"class", "function", "attribute", "module"},
}


def resolve(target: str, module: str, owner: str | None, role: str = "obj") -> str | None:
    """The canonical path of ``target`` written in ``module`` (inside class ``owner``)."""
    kinds = KINDS.get(role, KINDS["obj"])
    name = target.lstrip(".")
    candidates: list[str] = []
    if target.startswith(f"{PACKAGE}.") or target == PACKAGE:
        candidates.append(target)
    else:
        if owner:
            candidates.append(f"{module}.{owner}.{name}")
        parts = module.split(".")
        for i in range(len(parts), 0, -1):
            candidates.append(".".join([*parts[:i], name]))
    for candidate in candidates:
        obj = _lookup(candidate)
        if obj is not None and _shown(obj) and obj.kind.value in kinds:
            return str(obj.path)
    if target.startswith("."):
        matches = [p for p in _all_paths() if p.endswith(f".{name}")]
        shown = {
            str(o.path)
            for p in matches
            if (o := _lookup(p)) is not None and _shown(o) and o.kind.value in kinds
        }
        if len(shown) == 1:
            return shown.pop()
    return None


#: Where the docs site is published (mkdocs.yml's site_url).
SITE = "https://datapunk.github.io/datapunk-recovery/"


def guide_url(rel: str) -> str | None:
    """The site's URL of docs/``rel``.md, or None if there is no such page.

    Absolute, so that the link works in the API pages at any depth, in an
    editor's hover and on the package index alike.
    """
    if not (DOCS / f"{rel}.md").exists():
        return None
    page = rel.removesuffix("index").rstrip("/")
    return f"{SITE}{page}/" if page else SITE


def _docstring_lines(tree: ast.Module) -> list[tuple[int, int, str | None]]:
    """(first line, last line, enclosing class) of every docstring-like string."""
    spans: list[tuple[int, int, str | None]] = []

    def visit(body: list[ast.stmt], owner: str | None) -> None:
        for node in body:
            if (
                isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                spans.append((node.lineno, node.end_lineno or node.lineno, owner))
            elif isinstance(node, ast.ClassDef):
                visit(node.body, node.name if owner is None else f"{owner}.{node.name}")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.If | ast.Try):
                visit(node.body, owner)

    visit(tree.body, None)
    return spans


def convert_text(
    text: str, module: str, owner: str | None, unresolved: list[str], *, links: bool = True
) -> str:
    def role(match: re.Match[str]) -> str:
        tilde, target = match.group(2), match.group(3).strip()
        shown = target.lstrip(".")
        if tilde:
            shown = shown.rsplit(".", 1)[-1]
        if match.group(1) in ("meth", "func") and not shown.endswith(")"):
            shown += "()"
        path = resolve(target, module, owner, match.group(1)) if links else None
        if path is None and not links:
            return f"`{shown}`"
        if path is None:
            unresolved.append(f"{module}: {match.group(0)}")
            return f"`{shown}`"
        return f"[`{shown}`][{path}]"

    def doc(match: re.Match[str]) -> str:
        url = guide_url(match.group(1))
        if url is None:
            return match.group(0)
        return f"[docs/{match.group(1)}.md]({url})"

    # Only outside ``literals``: a literal may show a role on purpose.
    pieces = LITERAL.split(text)
    for i in range(0, len(pieces), 2):
        piece = ROLE.sub(role, pieces[i])
        if i > 0:
            piece = piece.removeprefix("\\\\ ")  # ``OSError``\\ s: an RST escape
        pieces[i] = piece
    for i in range(1, len(pieces), 2):
        pieces[i] = DOC_PATH.sub(doc, pieces[i])
    return "".join(pieces)


def wrap(line: str, limit: int = LIMIT) -> str:
    """``line`` split at spaces (outside links and literals) so each part fits in ``limit``."""
    body = line.rstrip("\n")
    end = line[len(body) :]
    if len(body) <= limit:
        return line
    indent = body[: len(body) - len(body.lstrip())]
    stripped = body.lstrip()
    if re.match(r"(?:[-*+]|\d+\.) ", stripped):
        indent += " " * (len(re.match(r"(?:[-*+]|\d+\.) ", stripped).group(0)))
    protected = [(m.start(), m.end()) for m in LINK_OR_CODE.finditer(body)]
    parts: list[str] = []
    while len(body) > limit:
        cut = -1
        for i in range(min(limit, len(body) - 1), len(indent), -1):
            if body[i] == " " and not any(a <= i < b for a, b in protected):
                cut = i
                break
        if cut <= len(indent):
            break
        parts.append(body[:cut].rstrip())
        body = indent + body[cut + 1 :].lstrip()
        protected = [(m.start(), m.end()) for m in LINK_OR_CODE.finditer(body)]
    parts.append(body)
    return "\n".join(parts) + end


def convert_file(path: Path, unresolved: list[str]) -> str:
    source = path.read_text(encoding="utf-8")
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    module = ".".join(parts)
    lines = source.splitlines(keepends=True)
    for first, last, owner in _docstring_lines(ast.parse(source)):
        for i in range(first - 1, last):
            converted = convert_text(lines[i], module, owner, unresolved)
            if i == first - 1 and len(converted.rstrip("\n")) > LIMIT:
                # The summary line stays one line: its roles become plain code.
                converted = convert_text(lines[i], module, owner, unresolved, links=False)
            if converted != lines[i]:
                converted = wrap(converted)
            lines[i] = converted
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if needed")
    parser.add_argument("-v", "--verbose", action="store_true", help="list roles left as code")
    args = parser.parse_args(argv)
    unresolved: list[str] = []
    changed = []
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        new = convert_file(path, unresolved)
        if new != path.read_text(encoding="utf-8"):
            changed.append(path)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    for path in changed:
        print(f"{'would rewrite' if args.check else 'rewrote'} {path.relative_to(ROOT)}")
    if args.verbose:
        for item in unresolved:
            print(f"left as code (not shown on the API pages): {item}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
