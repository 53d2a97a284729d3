"""The README and the tutorials run as pasted, with the base install only.

Each file's ```python blocks run in order, cumulatively (one namespace, as if
pasted one after the other into one script), in a fresh interpreter, from an
empty folder, with every optional dependency blocked (as if no extra were
installed) and no server.  A block that needs a file writes it first; async
code sits inside ``asyncio.run``.

The fence rule, so that no block escapes by changing its language:

- every fenced block names its language (an untagged fence fails);
- Python is tagged ``python``, and only ``python``: ``py``, ``python3``,
  ``pycon``, ``ipython``... fail;
- a ``text`` block that parses as Python statements fails too.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PASTED = [
    ROOT / "README.md",
    ROOT / "docs" / "testing.md",
    *sorted((ROOT / "docs" / "tutorials").glob("*.md")),
]
"""The files whose Python blocks a newcomer pastes."""

OPTIONAL = (
    "redis",
    "asyncpg",
    "psycopg",
    "psycopg_pool",
    "httpx",
    "httpcore",
    "aiohttp",
    "prometheus_client",
    "opentelemetry",
    "structlog",
    "rich",
    "matplotlib",
    "trio",
    "numpy",
)
"""Every optional dependency: the blocks run as if none were installed."""

PSEUDO_PYTHON = {"py", "py3", "python3", "pycon", "ipython", "ipython3", "pyi", "python-repl"}

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    language: str
    code: str


def blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path`` with the line its code starts on."""
    found: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence, language = match["fence"], match["info"].strip().split(" ")[0].lower()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].lstrip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        found.append(Block(path, start + 1, language, "\n".join(body) + "\n"))
    return found


def looks_like_python(code: str) -> bool:
    """Whether ``code`` parses as Python with at least one statement beyond a bare name."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    return any(
        not isinstance(node, ast.Expr) or isinstance(node.value, ast.Call) for node in tree.body
    )


_RUNNER = """
import importlib.abc, json, sys
BLOCKED = set(json.loads(sys.argv[1]))

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]
namespace = {"__name__": "__main__"}
for label, code in json.loads(sys.stdin.read()):
    exec(compile(code, label, "exec"), namespace)
"""


def run_blocks(path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the Python blocks of ``path`` in a fresh interpreter, in ``cwd``."""
    code = [
        (f"{path.relative_to(ROOT)}:{block.line}", block.code)
        for block in blocks(path)
        if block.language == "python"
    ]
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATAPUNK_RECOVERY", "PYTHON"))
    }
    env["PYTHONPATH"] = str(ROOT / "src")
    return subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(OPTIONAL)],
        input=json.dumps(code),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


@pytest.mark.parametrize("path", PASTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs_as_pasted_without_extras(path: Path, tmp_path: Path) -> None:
    assert any(block.language == "python" for block in blocks(path)), "no python block"
    done = run_blocks(path, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", PASTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_block_hides_python_behind_another_fence(path: Path) -> None:
    bad = []
    for block in blocks(path):
        where = f"{path.relative_to(ROOT)}:{block.line}"
        if not block.language:
            bad.append(f"{where}: a fence without a language")
        elif block.language in PSEUDO_PYTHON:
            bad.append(f"{where}: tag Python as 'python', not {block.language!r}")
        elif block.language == "text" and looks_like_python(block.code):
            bad.append(f"{where}: Python in a 'text' block")
    assert not bad, "\n".join(bad)


def test_the_block_runner_blocks_every_extra(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python\nimport redis\n```\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(OPTIONAL)],
        input=json.dumps([("page.md:2", "import redis\n")]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "blocked" in done.stderr


def test_the_fence_rule_catches_an_untagged_or_disguised_block(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```\nx = 1\n```\n\n```pycon\n>>> 1\n```\n\n```text\nimport os\n```\n\n"
        "```text\nretry -> breaker\n```\n",
        encoding="utf-8",
    )
    found = blocks(page)
    assert [b.language for b in found] == ["", "pycon", "text", "text"]
    assert [looks_like_python(b.code) for b in found[2:]] == [True, False]
