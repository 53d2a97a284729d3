"""Write docs/api/: one page per public module, and print the API part of mkdocs.yml's nav.

A public module is every module of ``datapunk_recovery`` whose dotted path has
no part starting with an underscore (``__init__`` stands for its package),
the layer packages ``_core`` and ``_execution`` aside: their modules are
public unless listed in ``INTERNAL`` (the modules shared inside the package).
``tests/test_docs.py`` checks that docs/api/ and the nav hold exactly them, so
after adding a module run::

    python scripts/api_pages.py            # writes the pages, prints the nav
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
API = ROOT / "docs" / "api"

#: Nav sections of the API reference, in the order of the guides; a module
#: goes to the first section whose prefix it has.
SECTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("Front door", ("strategies", "config", "durations")),
    ("Retries", ("errors", "backoff", "policy", "engine", "attempts", "stats")),
    ("Circuit breakers", ("breaker",)),
    ("Flow control", ("budget", "flow", "deadline", "timeout")),
    ("Network", ("network",)),
    ("Cache", ("cache",)),
    ("Database", ("database",)),
    ("Resource", ("resource",)),
    ("State stores", ("stores",)),
    ("Observability", ("events", "telemetry", "redact")),
    ("Testing", ("testing", "pytest_plugin", "clock")),
    ("Lab", ("chaos", "simulate", "demo")),
    ("Command line", ("cli",)),
]

#: The layer packages: folders that show a layer, not a part of a module's name.
LAYERS = ("_core", "_execution")

#: Modules of the layer packages (and stores/) shared inside the package only.
INTERNAL = {
    "_core.validate",
    "_core.windows",
    "_core.context",
    "_core.extras",
    "_core.decorate",
    "_execution.runtime",
    "_execution.decision",
    "_execution.pause",
    "stores.clients",
}


def is_public(dotted: str) -> bool:
    """Whether a dotted path below ``datapunk_recovery`` (a module or an object in
    one) is public: no private part once the layer package is set aside."""
    if any(dotted == m or dotted.startswith(f"{m}.") for m in INTERNAL):
        return False
    parts = dotted.split(".")
    if parts[0] in LAYERS:
        parts = parts[1:]
    return not any(part.startswith("_") for part in parts)


def _key(module: str) -> str:
    """A module's name without its layer package (``_core.errors`` -> ``errors``)."""
    top, _, rest = module.partition(".")
    return rest if top in LAYERS and rest else module


def public_modules() -> list[str]:
    """Every public module, as a dotted path without the ``datapunk_recovery.`` prefix."""
    found = []
    for path in sorted((SRC / "datapunk_recovery").rglob("*.py")):
        parts = list(path.relative_to(SRC / "datapunk_recovery").with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            if not parts:
                continue  # the package itself: the guides are its documentation
        if parts in ([layer] for layer in LAYERS) or not is_public(".".join(parts)):
            continue  # a layer package holds no API of its own
        found.append(".".join(parts))
    return found


def page(module: str) -> Path:
    """docs/api/ path of ``module``'s page: a package's is ``<package>/index.md``."""
    parts = module.split(".")
    is_package = (SRC / "datapunk_recovery" / Path(*parts) / "__init__.py").exists()
    return (
        API.joinpath(*parts, "index.md")
        if is_package
        else API.joinpath(*parts[:-1], f"{parts[-1]}.md")
    )


def text(module: str) -> str:
    """A page's source: the module's documentation only; its heading (level 1,
    from mkdocs.yml's options) names the module once and anchors references to it."""
    dotted = f"datapunk_recovery.{module}"
    options = ""
    if page(module).name == "index.md":
        # A package's page shows what the package itself defines, not what it
        # re-exports from its modules (they have their own pages).
        own = defined_in_package(module)
        members = "[" + ", ".join(own) + "]" if own else "false"
        options = f"\n    options:\n      members: {members}"
    return f"::: {dotted}{options}\n"


def _is_private_sibling(node: ast.ImportFrom) -> bool:
    """Whether an import in a package's ``__init__`` reads one of its private modules."""
    return node.level == 1 and (node.module or "").startswith("_")


def defined_in_package(module: str) -> list[str]:
    """Public names a package's ``__init__`` defines itself, or re-exports from its
    private modules (``from ._switch import armed``: a private module has no page,
    so the package's page is their home); not what its public modules define."""
    import ast

    init = SRC / "datapunk_recovery" / Path(*module.split(".")) / "__init__.py"
    tree = ast.parse(init.read_text(encoding="utf-8"))
    kinds = ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, kinds):
            names.append(node.name)
        elif isinstance(node, ast.ImportFrom) and _is_private_sibling(node):
            names.extend(alias.asname or alias.name for alias in node.names)
    return [name for name in names if not name.startswith("_")]


def section(module: str) -> str:
    top = _key(module).split(".")[0]
    for title, prefixes in SECTIONS:
        if top in prefixes:
            return title
    raise SystemExit(f"scripts/api_pages.py: no nav section for {module!r}: add it to SECTIONS")


def nav() -> list[str]:
    """The lines of the API part of mkdocs.yml's nav (indented for its place)."""
    lines = ["  - API reference:"]
    for title, prefixes in SECTIONS:
        modules = [m for m in public_modules() if section(m) == title]
        modules.sort(
            key=lambda m: (prefixes.index(_key(m).split(".")[0]), _key(m).count("."), _key(m))
        )
        lines.append(f"      - {title}:")
        for module in modules:
            rel = page(module).relative_to(ROOT / "docs").as_posix()
            lines.append(f"          - {module}: {rel}")
    return lines


def main() -> int:
    for module in public_modules():
        target = page(module)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text(module), encoding="utf-8")
    sys.stdout.write("\n".join(nav()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
