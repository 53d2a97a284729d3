"""The seams between modules, read from the source with ``ast`` (no import runs).

A public module's ``_private`` names are its own: another module that needs
one is missing a public seam (a helper, a property, a callback).  Shared
modules (``_execution.runtime``, ``_core.validate``, ``_core.context``,
``_core.windows``, ``_core.decorate``, ``_core.extras``, ``stores.clients``:
``SHARED``) and underscore modules exist to be shared inside the package, so
their names are fair game.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "datapunk_recovery"

#: Today's remaining ``from M import _x`` / ``M._x`` reach-ins, as
#: ``(importing module, imported module, name)``, each with why it is still
#: there.  Remove an entry when its seam lands: a stale entry fails too.
KNOWN: dict[tuple[str, str, str], str] = {}

#: Private attributes read on objects of another module (``thing._x`` where
#: this module defines no ``_x`` of its own), as ``(importing module, name)``;
#: ``"*"`` allows the name in every module.
KNOWN_ATTRIBUTES: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute module a ``from ... import`` names."""
    if level == 0:
        return module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


#: The layer packages: their modules are named without an underscore, and those
#: that were public in 0.2.0 keep their ``_private`` names to themselves.
LAYERS = {f"{PACKAGE}._core", f"{PACKAGE}._execution"}

#: Modules shared inside the package (underscore modules before issue 15's
#: layout), whose names are fair game.
SHARED = {
    f"{PACKAGE}._core.validate",
    f"{PACKAGE}._core.windows",
    f"{PACKAGE}._core.context",
    f"{PACKAGE}._core.extras",
    f"{PACKAGE}._core.decorate",
    f"{PACKAGE}._execution.runtime",
    f"{PACKAGE}.stores.clients",
}


def _is_public_module(module: str) -> bool:
    if module in SHARED:
        return False
    for layer in LAYERS:
        if module.startswith(f"{layer}."):
            module = PACKAGE + module[len(layer) :]
    return not any(_is_private(part) for part in module.split("."))


def _sources() -> list[tuple[str, bool, ast.Module]]:
    return [
        (_module_name(path), path.name == "__init__.py", ast.parse(path.read_text("utf-8")))
        for path in sorted((SRC / PACKAGE).rglob("*.py"))
    ]


def _own_names(tree: ast.Module) -> set[str]:
    """Every name a module defines, assigns, takes as a parameter or spells in a string."""
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store | ast.Del):
            own.add(node.attr)
        elif isinstance(node, ast.arg):
            own.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            own.add(node.value)  # __slots__ entries, getattr names
    return own


def _reach_ins() -> tuple[set[tuple[str, str, str]], set[tuple[str, str]]]:
    """``from M import _x`` / ``M._x`` of a public package module, and ``obj._x`` reads."""
    sources = _sources()
    modules = {name for name, _, _ in sources}
    found: set[tuple[str, str, str]] = set()
    attributes: set[tuple[str, str]] = set()
    for here, is_package, tree in sources:
        package_names: dict[str, str] = {}  # local name -> the package module it is
        other_names: set[str] = set()  # names bound by imports from outside the package
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(here, is_package, node.level, node.module)
                for alias in node.names:
                    local = alias.asname or alias.name
                    if not source.startswith(PACKAGE):
                        other_names.add(local)
                    elif f"{source}.{alias.name}" in modules:
                        package_names[local] = f"{source}.{alias.name}"
                    elif _is_private(alias.name) and _is_public_module(source) and source != here:
                        found.add((here, source, alias.name))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(PACKAGE):
                        package_names[alias.asname or alias.name] = alias.name
                    else:
                        other_names.add((alias.asname or alias.name).split(".")[0])
        own = _own_names(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in package_names:
                source = package_names[value.id]
                if _is_public_module(source) and source != here:
                    found.add((here, source, node.attr))
                continue
            if isinstance(value, ast.Name) and (
                value.id in {"self", "cls"} or value.id in other_names
            ):
                continue
            if node.attr not in own:
                attributes.add((here, node.attr))
    return found, attributes


def test_the_scan_resolves_relative_imports_and_tells_private_modules() -> None:
    assert _resolve("datapunk_recovery.flow.adaptive", False, 1, "bulkhead") == (
        "datapunk_recovery.flow.bulkhead"
    )
    assert _resolve("datapunk_recovery.stores", True, 2, "breaker") == "datapunk_recovery.breaker"
    assert _resolve("datapunk_recovery.database.sqlite", False, 1, None) == (
        "datapunk_recovery.database"
    )
    assert _is_public_module("datapunk_recovery.flow.bulkhead")
    assert _is_public_module("datapunk_recovery._core.errors")
    assert not _is_public_module("datapunk_recovery._execution.runtime")
    assert not _is_public_module("datapunk_recovery.database._replay")
    assert not _is_private("__init__")


def test_no_module_imports_another_modules_private_name() -> None:
    found, attributes = _reach_ins()
    new = sorted(found - KNOWN.keys())
    stale = sorted(KNOWN.keys() - found)
    assert not new, f"private names read across modules (add a public seam): {new}"
    assert not stale, f"exceptions no longer needed (remove them from KNOWN): {stale}"
    allowed_everywhere = {name for where, name in KNOWN_ATTRIBUTES if where == "*"}
    strays = sorted(
        (where, name)
        for where, name in attributes
        if name not in allowed_everywhere and (where, name) not in KNOWN_ATTRIBUTES
    )
    assert not strays, f"another module's private attribute read (add a public seam): {strays}"
    used = attributes | {("*", name) for _, name in attributes}
    stale_attributes = sorted(KNOWN_ATTRIBUTES.keys() - used)
    assert not stale_attributes, f"exceptions no longer needed: {stale_attributes}"


def _imports_of(module: str) -> set[str]:
    """The package modules ``module`` imports, wherever the import statement is."""
    for here, is_package, tree in _sources():
        if here != module:
            continue
        imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported.add(_resolve(here, is_package, node.level, node.module))
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        return imported
    raise AssertionError(f"no module {module}")


def test_the_retry_engine_finds_its_gate_in_the_core_not_in_a_budget() -> None:
    from datapunk_recovery import budget
    from datapunk_recovery._core import policy

    for part in ("engine", "decision", "attempts"):  # the decorator, the decision, the block
        module = f"datapunk_recovery._execution.{part}"
        assert "datapunk_recovery.budget" not in _imports_of(module), module
    assert "datapunk_recovery.budget" not in _imports_of("datapunk_recovery.flow.hedging")
    assert budget.RetryGate is policy.RetryGate  # the documented path keeps working
    assert isinstance(budget.TokenBudget(), policy.RetryGate)


def _import_graph() -> dict[str, set[str]]:
    """Package module -> the package modules it imports (in functions and TYPE_CHECKING too)."""
    sources = _sources()
    modules = {name for name, _, _ in sources}
    graph: dict[str, set[str]] = {}
    for here, is_package, tree in sources:
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(here, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    edges.add(sub if sub in modules else source)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
        graph[here] = {m for m in edges if m in modules and m != here}
    return graph


def _cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: set[frozenset[str]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.add(frozenset(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_database_pool_and_transaction_import_no_circle() -> None:
    graph = _import_graph()
    pool, transaction = "datapunk_recovery.database.pool", "datapunk_recovery.database.transaction"
    assert transaction in {m for m in graph if pool in graph[m]}  # the face uses the pool
    assert transaction not in graph[pool]
    assert not [g for g in _cycles(graph) if pool in g or transaction in g]


#: Import circles still in the code (a deferred or TYPE_CHECKING import counts), each
#: with why.  A new circle fails; so does a listed one that has gone.
KNOWN_CYCLES: dict[frozenset[str], str] = {}


def test_no_new_import_circle_appears_anywhere_in_the_package() -> None:
    cycles = _cycles(_import_graph())
    assert not sorted(map(sorted, cycles - KNOWN_CYCLES.keys())), "new import circle"
    assert not sorted(map(sorted, KNOWN_CYCLES.keys() - cycles)), "a listed circle has gone"


#: What spawns a task or waits on asyncio / trio (or blocks a thread) directly: the
#: execution layer's job.  ``None``: every name of that library.
_WAITING: dict[str, frozenset[str] | None] = {
    "asyncio": frozenset(
        {
            "Condition",
            "Event",
            "Queue",
            "Semaphore",
            "TaskGroup",
            "create_task",
            "ensure_future",
            "gather",
            "get_running_loop",
            "shield",
            "sleep",
            "timeout",
            "timeout_at",
            "to_thread",
            "wait",
            "wait_for",
        }
    ),
    "trio": frozenset(
        {
            "CancelScope",
            "Event",
            "fail_after",
            "lowlevel",
            "move_on_after",
            "open_memory_channel",
            "open_nursery",
            "sleep",
            "to_thread",
        }
    ),
    "anyio": None,
    "threading": frozenset({"Barrier", "Condition", "Event", "Semaphore", "Thread", "Timer"}),
    "time": frozenset({"sleep"}),
    "concurrent.futures": None,
}

#: Methods that spawn or schedule whatever object they are called on (a loop, a nursery).
_SPAWNING = {"create_task", "run_in_executor", "call_later", "call_at", "start_soon"}


def _waits(tree: ast.Module) -> bool:
    """Whether a module waits itself: ``asyncio.sleep``, an alias, ``from asyncio import sleep``."""
    aliases: dict[str, str] = {}  # local name -> waiting library
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in _WAITING:
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module in _WAITING and not node.level:
            names = _WAITING[node.module]
            if names is None or any(alias.name in names for alias in node.names):
                return True
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        if node.attr in _SPAWNING:
            return True  # loop.create_task(...), nursery.start_soon(...)
        if isinstance(node.value, ast.Name) and node.value.id in aliases:
            names = _WAITING[aliases[node.value.id]]
            if names is None or node.attr in names:
                return True
    return False


#: Modules that still wait on a library themselves, each with why.
KNOWN_WAITING: dict[str, str] = {
    "datapunk_recovery._execution.runtime": "the execution layer: the one place that should",
}


def test_only_the_execution_layer_spawns_tasks_or_waits_on_asyncio_or_trio() -> None:
    waiting = {here for here, _, tree in _sources() if _waits(tree)}
    assert sorted(waiting - KNOWN_WAITING.keys()) == [], (
        "wait through datapunk_recovery._execution.runtime"
    )
    assert sorted(KNOWN_WAITING.keys() - waiting) == [], "a listed module no longer waits itself"


def test_the_waiting_check_sees_aliases_and_imported_names() -> None:
    for source in (
        "import asyncio as aio\nasync def f():\n    await aio.sleep(1)\n",
        "from asyncio import wait_for\n",
        "from trio import sleep as nap\n",
        "import time\ntime.sleep(1)\n",
        "import anyio\nanyio.run(f)\n",
        "def f(loop):\n    loop.run_in_executor(None, print)\n",
        "import threading\nthreading.Event().wait(1)\n",
    ):
        assert _waits(ast.parse(source)), source
    for source in (
        "import asyncio\nasyncio.CancelledError\n",
        "import time\ntime.monotonic()\n",
        "import threading\nthreading.Lock()\n",
        "from .._execution import runtime as _runtime\n_runtime.sleep_sync(1)\n",
    ):
        assert not _waits(ast.parse(source)), source


def test_every_top_level_module_sits_in_one_import_linter_layer() -> None:
    """A new module must be placed in a layer, or lint-imports would not check it."""
    import tomllib

    config = tomllib.loads((SRC.parent / "pyproject.toml").read_text("utf-8"))
    (layers,) = [c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    placed = [
        name.strip() for layer in layers["layers"] for name in layer.replace("|", ":").split(":")
    ]
    top = {
        path.stem if path.is_file() else path.name
        for path in (SRC / PACKAGE).iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").exists()
    }
    assert sorted(placed) == sorted(set(placed)), "a module sits in two layers"
    assert sorted(top - set(placed)) == [], "modules in no layer"
    assert sorted(set(placed) - top) == [], "layers name modules that do not exist"
